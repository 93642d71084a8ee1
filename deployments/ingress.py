"""OpenAI-compatible ingress (FastAPI through `serve.ingress`). No `from __future__ import annotations` here:
FastAPI must see real types in the route signatures that Serve rewrites.

    POST /v1/chat/completions   model "router" routes; a pool model's name calls that model directly
                                 routing preference per request: {"routing": {"preference": {"quality", "cost"}}}
                                 stream: true answers with server-sent events
    GET  /v1/models             "router" and every pool model
    GET  /health

Every error is JSON {"error": {"message", "type", "code", "request_id"}} with a 4xx/5xx status (a routed
model that fails: 502; one that runs past `router.model_timeout_s`: 504); the
request id is also in the `x-request-id` header, which Serve's proxy sets (from the request's own
`x-request-id` when it sends one).
"""

import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve

from banditrouter.config import AppConfig
from banditrouter.schemas import new_id
from deployments import conversation
from deployments.backends import BackendError, CompletionRequest, CompletionResult
from deployments.router import ModelTimeout, QueueFull, RouteRequest

app = FastAPI(title="banditrouter", version="0.1.0")


# ---------------------------------------------------------------------------------------------------------
# request schema (pydantic at the HTTP boundary)
# ---------------------------------------------------------------------------------------------------------
class PreferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    quality: float = Field(..., ge=0)
    cost: float = Field(..., ge=0)


class RoutingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preference: PreferenceIn | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str = Field(..., min_length=1)
    messages: list[MessageIn] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    user: str | None = None
    routing: RoutingIn | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, messages):
        if not any(_text(m) for m in messages if m.role == "user"):
            raise ValueError("messages must include a user message with text content")
        return messages


def _text(m: MessageIn) -> str:
    return conversation.content_text(m.content)  # the same text the router reads (deployments/conversation.py)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error(request_id: str, e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "code": e.code, "request_id": request_id}}
    return JSONResponse(body, status_code=e.status)  # Serve's proxy sets the x-request-id header


def _request_id(request: Request) -> str:
    """The id Serve's proxy assigned (the client's x-request-id when it sent one): the same id the proxy
    puts in the response's x-request-id header."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex[:16]}"


def _cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's traceback wrapper (a RayTaskError is also an instance
    of its cause's class, which is how `except ModelTimeout` catches it)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------------------------------------
@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: AppConfig, router, models: dict):
        self.cfg = cfg
        self.router = router
        self.models = models
        self.default_preference = cfg.policy.default_preference.as_tuple()
        self.buffer = self.learner = None
        if cfg.learning.enabled:
            from learner.actors import get_or_create_buffer, get_or_create_learner

            self.buffer = get_or_create_buffer(cfg)
            self.learner = get_or_create_learner(cfg)

    async def _json_object(self, request: Request) -> dict:
        """The body as a JSON object (NaN/Infinity kept as floats, for the validators to refuse), or a 400."""
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            data = json.loads(text, parse_constant=lambda c: float("nan"))
        except json.JSONDecodeError as e:
            raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    async def _parse(self, request: Request) -> ChatRequest:
        data = await self._json_object(request)
        try:
            body = ChatRequest.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e)) from None
        pref = body.routing.preference if body.routing else None
        if pref is not None and pref.quality + pref.cost <= 0:
            raise ApiError(422, "routing.preference: quality and cost must not both be zero")
        if body.model != "router" and body.model not in self.models:
            raise ApiError(
                404, f"unknown model {body.model!r}; use 'router' or one of {list(self.models)}", code="model_not_found"
            )
        return body

    def _preference(self, body: ChatRequest) -> tuple[float, float]:
        pref = body.routing.preference if body.routing else None
        if pref is None:
            return self.default_preference
        total = pref.quality + pref.cost
        return (pref.quality / total, pref.cost / total)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        request_id = _request_id(request)
        try:
            body = await self._parse(request)
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            # the latest user turn (+ router.context_turns - 1 earlier ones, newest first), not all turns joined
            try:
                conv = conversation.parse(messages, self.cfg.router.context_turns)
            except ValueError as e:  # e.g. the only user text is whitespace
                raise ApiError(422, f"messages: {e}") from None
            prompt = conv.routing_text
            if body.model == "router":
                req = RouteRequest(
                    request_id=request_id,
                    messages=messages,
                    prompt=prompt,
                    preference=self._preference(body),
                    max_tokens=body.max_tokens,
                    temperature=body.temperature,
                    user=body.user or request.headers.get("x-user-id"),
                    turn=conv.turn,
                    history_refs=conv.history_refs,
                    arrived_at=time.time(),
                )
                if body.stream:
                    return await self._stream_routed(request_id, req)
                out = await self.router.route.remote(req)
                return self._completion(request_id, out["result"], out["routing"]["model"], out["routing"])
            creq = CompletionRequest(
                request_id=request_id, messages=messages, prompt=prompt, max_tokens=body.max_tokens, temperature=body.temperature
            )
            if body.stream:
                return await self._stream_direct(request_id, body.model, creq)
            result = await self.models[body.model].complete.remote(creq)
            return self._completion(request_id, result, body.model, None)
        except ApiError as e:
            return _error(request_id, e)
        except QueueFull as e:  # the router's pool (ACQB) or the chosen model's queue is full
            full = _cause(e)
            resp = _error(request_id, ApiError(503, str(full) or "the router's queue is full; retry later", "overloaded"))
            resp.headers["Retry-After"] = str(max(1, int(getattr(full, "retry_after_s", 1))))  # RFC 9110 delay-seconds
            return resp
        except BackendError as e:
            return _error(request_id, ApiError(502, f"model backend failed: {_cause(e)}", "upstream_error"))
        except ModelTimeout as e:
            return _error(request_id, ApiError(504, str(_cause(e)), "timeout_error", "model_timeout"))

    def _completion(self, request_id: str, result: CompletionResult, model: str, routing: dict | None) -> JSONResponse:
        body = {
            "id": f"chatcmpl-{(routing or {}).get('decision_id') or uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": result.input_tokens,
                "completion_tokens": result.output_tokens,
                "total_tokens": result.input_tokens + result.output_tokens,
            },
            "backend": result.info,
        }
        headers = {}
        if routing is not None:
            body["routing"] = routing
            headers["x-decision-id"] = routing["decision_id"]
        return JSONResponse(body, headers=headers)

    @staticmethod
    def _chunk(cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    async def _sse(self, cid: str, model: str, items, routing: dict | None):
        yield self._chunk(cid, model, {"role": "assistant", "content": ""}, **({"routing": routing} if routing else {}))
        final = None
        async for item in items:
            if isinstance(item, CompletionResult):
                final = item
                continue
            yield self._chunk(cid, model, {"content": item})
        extra = {}
        if final is not None:
            extra["usage"] = {
                "prompt_tokens": final.input_tokens,
                "completion_tokens": final.output_tokens,
                "total_tokens": final.input_tokens + final.output_tokens,
            }
            if routing:
                extra["routing"] = {**routing, "cost_usd": final.cost_usd}
        yield self._chunk(cid, model, {}, "stop", **extra)
        yield "data: [DONE]\n\n"

    async def _stream_routed(self, request_id: str, req: RouteRequest) -> StreamingResponse:
        gen = self.router.options(stream=True).route_stream.remote(req)
        routing = await gen.__anext__()  # decided before the first byte, so errors can still be a status code
        cid = f"chatcmpl-{routing['decision_id']}"
        headers = {"x-decision-id": routing["decision_id"]}
        return StreamingResponse(self._sse(cid, routing["model"], gen, routing), media_type="text/event-stream", headers=headers)

    async def _stream_direct(self, request_id: str, model: str, creq: CompletionRequest) -> StreamingResponse:
        gen = self.models[model].options(stream=True).stream.remote(creq)
        return StreamingResponse(self._sse(f"chatcmpl-{uuid.uuid4().hex}", model, gen, None), media_type="text/event-stream")

    @app.get("/v1/models")
    async def list_models(self):
        now = int(time.time())
        names = ["router", *self.models]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": now, "owned_by": "banditrouter"} for n in names],
        }

    @app.get("/health")
    async def health(self):
        info = await self.router.info.remote()
        return {
            "status": "ok",
            "policy": info["policy"],
            "policy_version": info["policy_version"],
            "tau": info["tau"],
            "learning": self.buffer is not None,
            "models": list(self.models),
        }

    def _learning(self):
        if self.buffer is None:
            raise ApiError(404, "online learning is off in this deployment (learning.enabled: false)", code="learning_disabled")

    async def _if_learning(self, request: Request, call):
        """`await call()` when learning is on; the 404 JSON error otherwise."""
        try:
            self._learning()
        except ApiError as e:
            return _error(_request_id(request), e)
        return await call()

    @app.post("/v1/feedback")
    async def feedback(self, request: Request):
        """{"decision_id": str, "score": float in [0, 1]}. Idempotent per decision; a second, different score
        409; NaN / out of range 422. Feedback for a decision the buffer does not hold yet (the router delivers
        decisions after answering) is held for `learning.feedback_hold_s`: 202 {"status": "held"}; an unknown
        id is 404 only when the hold is off or full. Every refusal is counted at the buffer."""
        request_id = _request_id(request)
        try:
            self._learning()
            data = await self._json_object(request)
            decision_id, score = data.get("decision_id"), data.get("score")
            if not isinstance(decision_id, str) or not decision_id:
                raise ApiError(422, "decision_id: a non-empty string is required")
            if "score" not in data:
                raise ApiError(422, "score: required, a number in [0, 1]")
            # the event id is fixed here, so a call Ray retries (buffer restarting) cannot record it twice
            out = await self.buffer.add_feedback.remote(decision_id, score, new_id())
            code = out.pop("code")
            if code >= 400:
                kind = {404: "not_found_error", 409: "conflict_error"}.get(code, "invalid_request_error")
                raise ApiError(code, out["message"], kind, out["reason"])
            return JSONResponse({**out, "request_id": request_id}, status_code=code)
        except ApiError as e:
            return _error(request_id, e)

    @app.get("/v1/learner/stats")
    async def learner_stats(self, request: Request):
        async def both():
            return {"learner": await self.learner.stats.remote(), "buffer": await self.buffer.stats.remote()}

        return await self._if_learning(request, both)

    @app.get("/v1/learner/installs")
    async def learner_installs(self, request: Request):
        """When each router replica installed each version, and the staleness of that install."""

        async def installs():
            return {"installs": await self.learner.installs_log.remote()}

        return await self._if_learning(request, installs)

    @app.post("/v1/learner/flush")
    async def learner_flush(self, request: Request):
        """Consume the whole log now, update, commit and export the checkpoint (end of a run)."""
        return await self._if_learning(request, lambda: self.learner.flush.remote())

    @app.post("/v1/learner/reset")
    async def learner_reset(self, request: Request):
        """Cold start: the learner replaces the policy with an untrained one; routers install it."""

        async def reset():
            return {"version": await self.learner.reset.remote()}

        return await self._if_learning(request, reset)

    @app.get("/v1/routing/events")
    async def events(self, n: int = 100):
        """The router replica's most recent decision events (for inspection and tests)."""
        return {"events": await self.router.recent_events.remote(min(max(n, 1), 10_000))}
