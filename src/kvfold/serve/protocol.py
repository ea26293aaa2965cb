"""The OpenAI wire format: request bodies (validated with pydantic) and the response objects and stream chunks.

Fields kvfold cannot honour (n > 1, logprobs, echo, penalties, logit_bias, tools, JSON mode) are refused with 400
rather than silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 4


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with this HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


class KVFoldOptions(BaseModel):
    """The `kvfold` extension of a request body."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None = 0: greedy (reproducible by default)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch.Generator's range
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    kvfold: KVFoldOptions | None = None
    # Accepted only at their neutral value:
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    response_format: Any = None

    def refused(self) -> str | None:
        """The first field set to something kvfold does not do, if any."""
        neutral = {"n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                   "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                   "logit_bias": (None, {}), "tools": (None, [])}
        for name, allowed in neutral.items():
            if getattr(self, name) not in allowed:
                return name
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings", code="invalid_stop")
        return tuple(stops)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]


def parse_body(raw: bytes, cls: type[_Common]) -> _Common:
    """Bytes of a request body -> a validated request, or APIError 400 naming what is wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        request = cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise APIError(400, f"invalid request: {problems}") from None
    refused = request.refused()
    if refused:
        raise APIError(400, f"'{refused}' is not supported by kvfold serve; leave it out", code="unsupported_parameter")
    return request


class Reply:
    """Builds the response object or the stream chunks of one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if chat else "text_completion"

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def final(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
                  if self.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
        return {**self._base(self.object), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**self._base("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse({**self._base("text_completion"), "choices": [choice]})

    def usage_chunk(self, usage: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._base(obj), "choices": [], "usage": usage})


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {...}` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
