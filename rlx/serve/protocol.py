"""The OpenAI request bodies `rlx serve` accepts, validated strictly, and its error bodies.

Every way a request can be wrong is a 4xx with OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) naming the field, never a 500 and never a
silently accepted value: a body that is not JSON, a field of the wrong type (`"5"` for an integer;
pydantic's strict mode), a value out of range (`SamplingParams.validate`, the engine's own check),
a feature rlx does not implement (`echo`, `suffix`, `best_of` > 1, `tools`) rather than ignoring it.
Unknown fields are ignored, as vLLM and llama-server do, so clients that send extras still work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlx.runtime.requests import RequestError, SamplingParams

MAX_N = 4
MAX_STOPS = 4

# HTTP status -> OpenAI error type
ERROR_TYPES: dict[int, str] = {400: "invalid_request_error", 401: "authentication_error",
                               404: "invalid_request_error", 413: "invalid_request_error",
                               500: "internal_error", 503: "service_unavailable"}


@dataclass
class APIError(Exception):
    """An error answered to the client (status, OpenAI-shaped body, extra headers)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaSpec(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    ignore_eos: bool = False          # vLLM's extension
    return_token_ids: bool = False    # vLLM's extension: each choice carries its token ids

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise bad_request(f"stop holds {len(stops)} strings; at most {MAX_STOPS}", "stop")
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", "stop")
        return stops

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """Text parts joined: every template reads a string; "developer" is OpenAI's new "system"."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True  # vLLM's extension
    tools: list[Any] | None = None
    tool_choice: Any = None


# feature rlx does not implement: (request field, is it asked for?, what to say)
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("echo", lambda r: getattr(r, "echo", False), "echo is not supported"),
    ("suffix", lambda r: getattr(r, "suffix", None), "suffix (insertion) is not supported"),
    ("best_of", lambda r: (getattr(r, "best_of", None) or 1) > 1, "best_of > 1 is not supported; use n"),
    ("tools", lambda r: getattr(r, "tools", None), "tool calling is not supported"),
    ("tool_choice", lambda r: getattr(r, "tool_choice", None) not in (None, "none"), "tool calling is not supported"),
)


def parse_body(raw: bytes, model: type[_Strict]) -> Any:
    """The request body as `model`, or an `APIError` 400 naming what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}",
                          code="invalid_json")
    try:
        request: Any = model.model_validate(data)  # every request model has `n` (checked below)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where or 'body'}: {first['msg']}", where.split(".")[0] or None) from None
    for name, asked, message in _UNSUPPORTED:
        if asked(request):
            raise bad_request(message, name, "unsupported")
    if not 1 <= request.n <= MAX_N:
        raise bad_request(f"n must be in 1..{MAX_N}, got {request.n}", "n")
    return request


def _logit_bias(bias: Mapping[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
    return out


# SamplingParams field -> the request field a client sets
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "logprobs": "logprobs", "stop_ids": "stop"}


def sampling_params(request: CompletionRequest | ChatRequest, *, max_new_tokens: int, logprobs: int | None,
                    vocab_size: int, index: int = 0) -> SamplingParams:
    """The engine's settings for choice `index` of `request` (seed + index, so n choices differ
    and each is reproducible). Defaults are OpenAI's: temperature 1, top_p 1."""
    given = {name: getattr(request, name) for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                                       "frequency_penalty", "repetition_penalty")}
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        seed=None if request.seed is None else request.seed + index,
        logit_bias=_logit_bias(request.logit_bias),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        **{"temperature": 1.0, **{k: v for k, v in given.items() if v is not None}},
    )
    try:
        return params.validate(vocab_size)
    except RequestError as err:
        param = _PARAM_NAMES.get(err.param or "", err.param)
        if param == "max_tokens" and isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
            param = "max_completion_tokens"
        if param == "logprobs" and isinstance(request, ChatRequest):
            param = "top_logprobs"
        raise bad_request(err.message.replace(err.param or "", param or "", 1), param) from None


def max_new_tokens(request: CompletionRequest | ChatRequest, prompt_len: int, max_seq: int) -> int:
    """How many tokens to generate: the request's limit (completions default to OpenAI's 16, chat
    to the rest of the context); a prompt or a limit past the context is a 400, not a truncation."""
    where = "messages" if isinstance(request, ChatRequest) else "prompt"
    if prompt_len < 1:
        raise bad_request("the prompt is empty", where)
    if prompt_len >= max_seq:
        raise bad_request(f"the prompt is {prompt_len} tokens; this model's context is {max_seq} tokens, "
                          "which leaves no room to generate", where, "context_length_exceeded")
    asked = request.max_tokens
    param = "max_tokens"
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        asked, param = request.max_completion_tokens, "max_completion_tokens"
    if asked is None:
        return 16 if isinstance(request, CompletionRequest) else max_seq - prompt_len
    if asked < 1:
        raise bad_request(f"{param} must be an integer >= 1, got {asked}", param)
    if prompt_len + asked > max_seq:
        raise bad_request(f"the prompt ({prompt_len} tokens) plus {param} ({asked}) is past this model's context "
                          f"of {max_seq} tokens", param, "context_length_exceeded")
    return asked
