"""Chat messages -> prompt token ids: through the checkpoint's chat template (dlmc.chat) when its
tokenizer_config.json has one; a model without a template reads the messages' text contents joined
by a space, roles dropped (for the embedded model a one-message chat is the completion of its text).
"""

from __future__ import annotations

from typing import Any

from dlmc.errors import DlmcError
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
    """The prompt ids of a conversation; a template error is a 400 naming the template."""
    if tokenizer.chat_template is None:
        text = " ".join(t for t in (message_text(m) for m in messages) if t)
        return tokenizer.encode(text)
    if not messages:
        raise ApiError(400, "messages is empty", param="messages")
    # Templates read message['content'] as a string; fields the client did not set are left out.
    plain = [{k: v for k, v in m.items() if v is not None} | {"content": message_text(m)} for m in messages]
    try:
        return tokenizer.encode_chat(plain)
    except DlmcError as e:
        raise ApiError(400, str(e), param="messages") from None
