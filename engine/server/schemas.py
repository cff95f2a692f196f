"""Request bodies of the OpenAI endpoints: strict pydantic models, and their errors as one line each.

Every field is either honoured or refused: an OpenAI field dllama-api does not implement is accepted only at
its neutral value (e.g. `tools: []`, `store: false`) and otherwise answered with a 400
naming it; a field OpenAI does not define is refused as unknown (vLLM ignores unknown fields with a logged
warning instead; here a silently ignored field counts as a defect). `user`, an end-user identifier, is
accepted and not used.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from engine.server.errors import ApiError

MAX_STOPS = 16
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20  # as vLLM's default limit (OpenAI's own: 20 for chat, 5 for completions)
RequestT = TypeVar("RequestT", bound="SamplingRequest")


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("dllama_" + kind, message)


class _Strict(BaseModel):
    """No silent coercion ("5" is not 5), no NaN or infinities, no unknown fields."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


def _neutral_only(v: Any, field: str, neutral: dict[str, tuple[tuple[Any, ...], str]]) -> Any:
    """`v` when it is one of the field's neutral values (the feature not asked for), else a refusal."""
    allowed, why = neutral[field]
    if any(v == a and type(v) is type(a) for a in allowed):
        return v
    raise _fail("unsupported", f"{why} (accepted only as {' or '.join(json.dumps(a) for a in allowed)})")


_MESSAGE_NEUTRAL = {  # fields of a message the OpenAI client sends back from a response it received
    "name": ((None,), "participant names are not supported"),
    "refusal": ((None,), "refusals are not supported"),
    "function_call": ((None,), "function calls are not supported (use tool calls)"),
    "audio": ((None,), "audio is not supported"),
    "annotations": ((None, []), "annotations are not supported"),
}


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """A call an assistant message made (as the response gave it)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    """One turn; content is a string or a list of text parts (joined with newlines, as vLLM does); an
    assistant turn with tool calls may have none."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: Any = None
    refusal: Any = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    @field_validator(*_MESSAGE_NEUTRAL, mode="before")
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        return _neutral_only(v, info.field_name, _MESSAGE_NEUTRAL)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, str) or v is None:
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

    def check(self, where: str) -> None:
        """Rules across a message's fields, as ApiError 400 naming the field."""
        if self.content is None and not self.tool_calls:
            raise ApiError(
                400, f"{where}.content: required (null only beside tool_calls)", param=where + ".content"
            )
        if self.tool_calls and self.role != "assistant":
            raise ApiError(
                400, f"{where}.tool_calls: only assistant messages make tool calls", where + ".tool_calls"
            )
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ApiError(
                400,
                f"{where}.tool_call_id: required in tool messages, and only there",
                where + ".tool_call_id",
            )
        for i, call in enumerate(self.tool_calls or []):
            try:
                args = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                args = None
            if not isinstance(args, dict):
                param = f"{where}.tool_calls[{i}].function.arguments"
                raise ApiError(400, f"{param}: must be a JSON object as text", param)

    def as_template_input(self) -> dict[str, Any]:
        """The dict a chat template expects (HF's convention: tool-call arguments as objects); OpenAI's
        "developer" role is a system message."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        out["content"] = self.content or ""
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


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
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None  # an end-user identifier (OpenAI uses it against abuse): accepted, not used

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((k for k in v or {} if not re.fullmatch(r"[0-9]{1,9}", k)), None)
        if bad is not None:
            raise _fail("logit_bias_key", f"keys must be token ids as decimal strings (got {bad!r})")
        return v

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

    def check(self) -> None:
        """Rules across fields, as ApiError 400 naming the field."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")

    @property
    def bias(self) -> dict[int, float]:
        """logit_bias with integer token ids."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens; None: until EOS or the context is full."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def logprob_count(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return None


_CHAT_NEUTRAL = {
    "parallel_tool_calls": ((None, True), "only parallel tool calls are supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "store": ((None, False), "stored completions are not supported"),
    "metadata": ((None,), "metadata is only for stored completions, which are not supported"),
    "service_tier": ((None,), "service tiers are not supported"),
    "reasoning_effort": ((None,), "reasoning effort is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
}


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    """JSON mode: the reply is one JSON object."""

    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    """OpenAI's `json_schema` object; `strict` is accepted either way: the schema is always enforced."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    """The reply is JSON text valid against a schema."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no parameters
    strict: bool | None = None  # accepted either way: a forced call's arguments always follow the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator(*_CHAT_NEUTRAL, mode="before")
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        return _neutral_only(v, info.field_name, _CHAT_NEUTRAL)

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise _fail("messages_empty", "must hold at least one message")
        return v

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: only allowed when logprobs is true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            m.check(f"messages[{i}]")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ApiError(400, "tool_choice: a required or named tool needs tools", param="tool_choice")
        names = [t.function.name for t in self.tools or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            message = f"tool_choice: no tool is named {choice.function.name!r} (tools: {', '.join(names)})"
            raise ApiError(400, message, param="tool_choice")
        if (
            self.tool_mode != "none"
            and self.response_format is not None
            and self.response_format.type != "text"
        ):
            raise ApiError(400, "response_format: not together with tools", param="response_format")

    @property
    def tool_mode(self) -> str:
        """ "none" (no tools offered), "auto", "required", or the name of the tool to call."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_tools(self) -> list[FunctionDef]:
        """The tools one of which must be called: all ("required"), the named one, or none (auto, none)."""
        mode, tools = self.tool_mode, [t.function for t in self.tools or []]
        if mode == "named":
            assert isinstance(self.tool_choice, NamedToolChoice)
            return [f for f in tools if f.name == self.tool_choice.function.name]
        return tools if mode == "required" else []

    @property
    def logprob_count(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def json_constraint(self) -> tuple[bool, dict[str, Any] | None]:
        """(whether the reply must be JSON, the schema it must match: None for any JSON object)."""
        fmt = self.response_format
        if isinstance(fmt, JsonSchemaFormat):
            return True, fmt.json_schema.json_schema
        return isinstance(fmt, JsonObjectFormat), None


_COMPLETION_NEUTRAL = {
    "echo": ((None, False), "echoing the prompt is not supported"),
    "suffix": ((None, ""), "suffixes (insertion) are not supported"),
    "best_of": ((None, 1), "best_of is not supported"),
}


class CompletionRequest(SamplingRequest):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if isinstance(v, list):
            raise _fail("prompt_list", "give one prompt: a string or a list of one string")
        return v

    @field_validator(*_COMPLETION_NEUTRAL, mode="before")
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        return _neutral_only(v, info.field_name, _COMPLETION_NEUTRAL)

    @property
    def logprob_count(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return self.logprobs


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
        req = model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['ctx']['error']}") from None
        if not err["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        param = _param(err["loc"])
        if err["type"] == "extra_forbidden":
            message = f"{param}: unknown field: dllama-api does not support it (remove it from the request)"
            raise ApiError(400, message, param=param) from None
        plain = err["type"] == "missing" or err["type"].startswith("dllama_")
        got = "" if plain else f" (got {_short(err.get('input'))})"
        raise ApiError(400, f"{param}: {err['msg']}{got}", param=param) from None
    req.check()
    return req


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
