"""The OpenAI API's request bodies (pydantic, as FastAPI parses them), response shapes and error body.

Only what `dlmc serve` implements is modelled. Decoder settings beyond the OpenAI fields arrive as
extra body fields (the `openai` client's `extra_body`): the common ones are typed here, any other
field of the decoder's config dataclass passes through as an extra and the config checks it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI error body's fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class DecoderFields(BaseModel):
    """Decoder settings beyond the OpenAI fields; unknown extras are decoder config fields or errors."""

    model_config = ConfigDict(extra="allow")

    decoder: str | None = None
    block_length: int | None = None
    steps: int | None = None
    threshold: float | None = None
    factor: float | None = None
    remasking: str | None = None
    stop_at_eos: bool | None = None  # None: the server's default, on


class _Request(DecoderFields):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: not read

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# Fields the server accepts but cannot honour: a request that sets them is refused, never half-served.
UNSUPPORTED: dict[str, Any] = {
    "n": 1, "stop": None, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
    "best_of": None, "tools": None, "logit_bias": None, "presence_penalty": None, "frequency_penalty": None,
}
_DECODER_FIELDS = set(DecoderFields.model_fields)


def check_supported(request: _Request) -> None:
    for name, default in UNSUPPORTED.items():
        value = getattr(request, name, default)
        if value not in (default, None) and not (name.endswith("penalty") and value == 0):
            raise ApiError(400, f"{name}={value!r} is not supported by this server", param=name)
    if isinstance(request, ChatRequest) and request.response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format is not supported by this server", param="response_format")


def decoder_options(request: _Request, max_tokens: int | None) -> dict[str, Any]:
    """The decoder config fields this request sets: max_tokens as the generation length, temperature,
    top_p, and the decoder fields (typed and extra). The decoder name is not among them."""
    options: dict[str, Any] = {}
    if max_tokens is not None:
        options["gen_length"] = max_tokens  # decoder_config renames it max_new_tokens where needed
    for name in ("temperature", "top_p", *(_DECODER_FIELDS - {"decoder"})):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    for name, value in (request.model_extra or {}).items():
        if name in ("gen_length", "max_new_tokens"):
            raise ApiError(400, f"{name}: give the generation length as max_tokens", param=name)
        options[name] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
    return options


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion_response(id: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """A completion, or one chunk of a streamed one (the same object, as in the OpenAI API)."""
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def chat_response(id: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None, usage: dict | None = None,
               choices: bool = True) -> dict:
    return {
        "id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
        "usage": usage,
    }
