"""Request bodies of the OpenAI endpoints: strict pydantic models, and their errors as one line each."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from engine.server.errors import ApiError

MAX_STOPS = 16
RequestT = TypeVar("RequestT", bound="SamplingRequest")


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("dllama_" + kind, message)


class _Strict(BaseModel):
    """No silent coercion ("5" is not 5), no NaN or infinities; fields a client may add are ignored."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    """One turn; content is a string or a list of text parts (joined with newlines, as vLLM does)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise _fail("content_type", "must be a string or a list of text parts")
        texts = []
        for i, part in enumerate(v):
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not is_text or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _fail("content_part", f"part {i} ({kind!r}) is not a text part: only text is supported")
            texts.append(part["text"])
        return "\n".join(texts)

    def as_template_input(self) -> dict[str, str]:
        """The dict a chat template expects; OpenAI's "developer" role is a system message."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    n: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is None:
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise _fail("stop_type", "must be a string or a list of strings")
        if len(v) > MAX_STOPS:
            raise _fail("stop_count", f"at most {MAX_STOPS} stop strings (got {len(v)})")
        if any(s == "" for s in v):
            raise _fail("stop_empty", "stop strings must not be empty")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise _fail("n_unsupported", f"only n=1 is supported (got {v})")
        return v

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens; None: until EOS or the context is full."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise _fail("messages_empty", "must hold at least one message")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise _fail("logprobs_unsupported", "logprobs are not supported")
        return v


class CompletionRequest(SamplingRequest):
    prompt: str
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if isinstance(v, list):
            raise _fail("prompt_list", "give one prompt: a string or a list of one string")
        return v

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        if v:
            raise _fail("unsupported", f"{info.field_name} is not supported")
        return v


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_body(model: type[RequestT], body: bytes) -> RequestT:
    """The validated request, or an ApiError 400 naming the first offending field."""
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['ctx']['error']}") from None
        if not err["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        param = _param(err["loc"])
        plain = err["type"] == "missing" or err["type"].startswith("dllama_")
        got = "" if plain else f" (got {_short(err.get('input'))})"
        raise ApiError(400, f"{param}: {err['msg']}{got}", param=param) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
