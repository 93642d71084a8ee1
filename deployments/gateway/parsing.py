"""Request bodies at the gateway's edge: what a body must be before pydantic, the router or Ray see it.

Checks run in this order, each before the step it protects:

1. size: `gateway.limits.max_body_bytes` (413), from Content-Length and from the bytes actually read
   (the ingress's middleware; `loads_object` checks again);
2. UTF-8 (400);
3. nesting depth: a scan of the text for bracket depth (strings skipped, no recursion) refuses a body
   nested deeper than `max_json_depth` (422) before `json.loads` could raise `RecursionError`;
4. JSON (400), with integer literals longer than `MAX_INT_DIGITS` parsed as floats (inf past 1e308), so
   `json.loads` never meets CPython's 4,300-digit int limit (a `ValueError`) and no validator meets an
   int too large for a float (`OverflowError`): the schemas refuse such numbers as not finite / too large;
5. text: every string must be valid Unicode (a lone surrogate such as "\\ud800" is refused with its path,
   422), because the tokenizer, the embedder and the upstream's JSON encoder cannot take one;
6. the schema (422), with the size limits that depend on the config (messages, chars per message,
   max_tokens, user) read from the validation context.

Only known message fields (role, content, name, tool_calls, tool_call_id) are forwarded to the router and the
models: a message's other fields are dropped here, so no client-built structure reaches Ray's serialiser.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from deployments import conversation
from deployments.gateway.errors import ApiError

MAX_INT_DIGITS = 19
"""Integer literals with more digits than this (beyond int64) are parsed as floats."""

PASSTHROUGH_FIELDS = ("n", "tools", "tool_choice", "response_format")
"""OpenAI request fields forwarded to upstreams that support them (`CompletionRequest.passthrough`)."""

BACKEND_PASSTHROUGH: dict[str, frozenset[str]] = {
    "replay": frozenset(),  # a replay log holds one logged text answer per prompt: no tools, no formats, n = 1
    "openai": frozenset(PASSTHROUGH_FIELDS),
    "vllm": frozenset(PASSTHROUGH_FIELDS),
}
"""Which passthrough fields each backend kind can honour."""


# ---------------------------------------------------------------------------------------------------------
# raw body -> JSON object
# ---------------------------------------------------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than `limit`. Strings are skipped, so brackets inside
    them do not count; no recursion, and it stops at the first bracket past the limit."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _parse_int(digits: str) -> int | float:
    # float("1" * 5000) is inf, not an error: the schemas refuse it as not finite
    return float(digits) if len(digits.lstrip("-")) > MAX_INT_DIGITS else int(digits)


def _surrogate_path(obj: Any, path: str = "body") -> str | None:
    """The path of the first string (value or key) that is not valid Unicode, or None. The depth was checked
    already, so the recursion is bounded by `max_json_depth`."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path != "body" else str(k)
            if _surrogate_path(k, where) is not None:
                return f"{path} (a key)"
            found = _surrogate_path(v, where)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _surrogate_path(v, f"{path}.{i}")
            if found is not None:
                return found
    return None


def loads_object(raw: bytes, limits) -> dict[str, Any]:
    """The body as a JSON object (NaN/Infinity kept as floats, for the validators to refuse), or an ApiError:
    413 too large, 400 not UTF-8 / not JSON / not an object, 422 nested too deeply / not valid Unicode."""
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}", code="body_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    if json_depth_exceeds(text, limits.max_json_depth):
        raise ApiError(422, f"request body nests deeper than {limits.max_json_depth} levels", code="json_too_deep")
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=lambda c: float("nan"))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError):  # unreachable after the checks above; kept so no parser error is a 500
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    bad = _surrogate_path(data)
    if bad is not None:
        raise ApiError(422, f"{bad}: text must be valid Unicode (it holds a lone surrogate such as \\ud800)", code="invalid_text")
    return data


def require_json(request: Request) -> None:
    """FastAPI dependency of the state-changing routes: `content-type: application/json` or 415. A browser
    sends a cross-origin POST without a preflight only as text/plain, a form or no body, so a page on another
    origin cannot reach these routes (CSRF)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415,
            f"content-type must be application/json (got {media[:64]!r})" if media else "content-type: application/json required",
            code="unsupported_media_type",
        )


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# schemas (pydantic at the HTTP boundary); limits come from the validation context {"limits": LimitsConfig}
# ---------------------------------------------------------------------------------------------------------
def _limits(info: ValidationInfo):
    return (info.context or {}).get("limits")


class PreferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    quality: float = Field(..., ge=0)
    cost: float = Field(..., ge=0)

    @model_validator(mode="after")
    def _not_both_zero(self):
        if self.quality <= 0 and self.cost <= 0:
            raise ValueError("quality and cost must not both be zero")
        return self

    def normalised(self) -> tuple[float, float]:
        """(quality, cost) summing to 1. Divided by the larger weight first, so {1e308, 1e308} is (0.5, 0.5)
        rather than an overflowing sum."""
        top = max(self.quality, self.cost)
        q, c = self.quality / top, self.cost / top
        return (q / (q + c), c / (q + c))


class RoutingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    preference: PreferenceIn | None = None
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        strict=True,
        description="The most this request may cost, USD: models whose maximum cost for it is higher are not used.",
    )


class MessageIn(BaseModel):
    """An OpenAI chat message. Other fields a client sends (e.g. `refusal`, `annotations` from a previous
    response) are dropped, never forwarded."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _chars(cls, content, info: ValidationInfo):
        limits = _limits(info)
        if limits is not None and content is not None:
            n = len(content) if isinstance(content, str) else len(conversation.content_text(content))
            if n > limits.max_message_chars:
                raise ValueError(f"holds {n} characters of text; the limit is {limits.max_message_chars}")
        return content

    def forwarded(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str = Field(..., min_length=1, max_length=256)
    messages: list[MessageIn] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    user: str | None = None
    routing: RoutingIn | None = None
    n: int | None = Field(None, ge=1, le=128)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages, info: ValidationInfo):
        limits = _limits(info)
        if limits is not None and len(messages) > limits.max_messages:
            raise ValueError(f"{len(messages)} messages; the limit is {limits.max_messages}")
        if not any(conversation.content_text(m.content).strip() for m in messages if m.role == "user"):
            raise ValueError("messages must include a user message with text content")
        return messages

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v, info: ValidationInfo):
        limits = _limits(info)
        if limits is not None and v is not None and v > limits.max_tokens:
            raise ValueError(f"must be at most {limits.max_tokens}")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v, info: ValidationInfo):
        limits = _limits(info)
        if limits is not None and v is not None and len(v) > limits.max_user_chars:
            raise ValueError(f"is {len(v)} characters; the limit is {limits.max_user_chars}")
        return v

    def preference(self, default: tuple[float, float]) -> tuple[float, float]:
        pref = self.routing.preference if self.routing else None
        return default if pref is None else pref.normalised()

    def max_cost_usd(self) -> float | None:
        """`routing.max_cost_usd`: a positive finite number (the schema refuses anything else), or None."""
        return self.routing.max_cost_usd if self.routing else None

    def passthrough(self) -> dict[str, Any] | None:
        """The passthrough fields the request set (n = 1 is every backend's default and is not forwarded)."""
        out = {f: getattr(self, f) for f in PASSTHROUGH_FIELDS if getattr(self, f) is not None}
        if out.get("n") == 1:
            del out["n"]
        return out or None

    def prompt_chars(self) -> int:
        """Characters the upstream reads: every message's text, plus tool and format definitions."""
        n = sum(len(conversation.content_text(m.content)) for m in self.messages)
        extra = {k: v for k, v in (("tools", self.tools), ("response_format", self.response_format)) if v is not None}
        return n + (len(json.dumps(extra)) if extra else 0)


def parse_chat(data: dict[str, Any], limits) -> ChatRequest:
    try:
        return ChatRequest.model_validate(data, context={"limits": limits})
    except ValidationError as e:
        raise ApiError(422, validation_message(e)) from None


def check_passthrough(passthrough: dict[str, Any] | None, models: list) -> None:
    """400 naming the first field a model the request can reach cannot honour (`models`: `ModelConfig`s)."""
    if not passthrough:
        return
    for field in passthrough:
        for m in models:
            if field not in BACKEND_PASSTHROUGH.get(m.backend, frozenset()):
                reach = "the router can route to" if len(models) > 1 else "the request names"
                raise ApiError(
                    400,
                    f"{field}: model {m.name!r} ({m.backend} backend), which {reach}, cannot honour {field!r}; "
                    f"leave it out, or call a model whose backend supports it (openai, vllm)",
                    code="unsupported_parameter",
                )


class FeedbackIn(BaseModel):
    """`score` stays as sent (any JSON value): the buffer validates it, so every refusal is counted there."""

    model_config = ConfigDict(extra="ignore")
    decision_id: str = Field(..., min_length=1, max_length=128)
    score: Any = Field(...)
    user: str | None = Field(None, max_length=256)


def parse_feedback(data: dict[str, Any]) -> FeedbackIn:
    if "score" not in data:
        raise ApiError(422, "score: required, a number in [0, 1]")
    try:
        return FeedbackIn.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_message(e)) from None
