"""Chat messages -> prompt token ids.

A placeholder rendering, kept in this one function so that real chat templates (the Jinja2
`chat_template` of tokenizer_config.json, another engineer's work) can replace it: the messages'
text contents joined by a space, roles dropped, which is how a base model without a template reads a
conversation. For the embedded model a one-message chat is the completion of that message's text.
"""

from __future__ import annotations

from typing import Any

from dlmc.serve.openai_types import ApiError
from dlmc.tokenizer import TextTokenizer


def message_text(message: dict[str, Any]) -> str:
    """A message's content: a string, or the text of its {"type": "text"} parts."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    if any(part.get("type") != "text" for part in content):
        raise ApiError(400, "messages: only text content parts are supported", param="messages")
    return "".join(part.get("text", "") for part in content)


def render_chat(tokenizer: TextTokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt ids of a conversation (see the module docstring: to be replaced by chat templates)."""
    text = " ".join(t for t in (message_text(m) for m in messages) if t)
    return tokenizer.encode(text)
