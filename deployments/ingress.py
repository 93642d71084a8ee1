"""OpenAI-compatible ingress (FastAPI through `serve.ingress`): the Serve deployment and thin routes. The
gateway's concerns live in deployments/gateway/: errors.py (the error shape, request id, body size, the 500
of last resort), parsing.py (body checks and schemas), auth.py (keys and scopes), budgets.py + cost.py
(reserve a request's maximum cost before dispatch, settle after). No `from __future__ import annotations`
here: FastAPI must see real types in the route signatures that Serve rewrites.

    POST /v1/chat/completions   scope route. model "router" routes; a pool model's name calls that model
                                 routing preference per request: {"routing": {"preference": {"quality", "cost"}}}
                                 a cost cap per request: {"routing": {"max_cost_usd": 0.01}} (400 if no model fits)
                                 stream: true answers with server-sent events
    GET  /v1/models             scope route. "router" and every pool model
    GET  /v1/budget             scope route. the caller's own budget: spend, reservations, period, pacing z
    POST /v1/feedback           scope route, on the caller's own decisions
    GET  /health                {"status": "ok"}; the policy, tau, models and learning state for admin only
    GET  /v1/learner/stats, /v1/learner/installs, /v1/routing/events    scope admin
    POST /v1/learner/flush, /v1/learner/reset                           scope admin

State-changing routes (POST) take `content-type: application/json` only (415 otherwise): a browser cannot
send that cross-origin without a preflight, so a page on another origin cannot reset the policy.

Every error is JSON {"error": {"message", "type", "code", "request_id"}} (deployments/gateway/errors.py):
400 / 413 / 415 / 422 bad input, 401 / 403 keys and scopes, 429 budget or rate limit, 503 overloaded (with
Retry-After), 502 the model failed (a fixed message and the model's name; the details in the server log),
504 it ran past `router.model_timeout_s`. A stream answers those as status codes too: routing, admission and
the first upstream item happen before the 200; a failure mid-stream ends it with an error event and [DONE].
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path

import ray
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from banditrouter.config import AppConfig
from banditrouter.schemas import new_id
from banditrouter.threads import limit_blas_threads
from deployments import conversation
from deployments.backends import BackendError, CompletionRequest, CompletionResult
from deployments.gateway import errors, parsing
from deployments.gateway.auth import KeyStore, Principal, optional_principal, require_admin, require_route
from deployments.gateway.errors import ApiError, request_id
from deployments.gateway.parsing import require_json
from deployments.router import ModelTimeout, QueueFull, RouteRequest

log = logging.getLogger("ray.serve")

app = FastAPI(title="banditrouter", version="0.1.0")


def _bind(asgi_app) -> None:
    """The first request in a replica hands the app (Serve's copy of it) the deployment's state."""
    serve.get_replica_context().servable_object.bind(asgi_app)


errors.install(app, _bind)

HIDDEN_EVENT_FIELDS = ("context", "turn_context")
"""Raw embeddings: never sent to clients (events keep `context_ref`)."""
PATH_FIELDS = ("path", "checkpoint")
"""Server file paths in learner / buffer stats: only the file's name goes out."""


def _cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's traceback wrapper (a RayTaskError is also an instance
    of its cause's class, which is how `except ModelTimeout` catches it)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _one_line(text: str, limit: int = 200) -> str:
    return (text.splitlines() or [""])[0][:limit]


def _failure(e: BaseException, model: str, max_cost: float, cfg: AppConfig) -> tuple[ApiError, float]:
    """The answer to a failed dispatch and what it cost (to settle): 0 when nothing reached an upstream or it
    billed nothing, the reserved maximum when it may have billed (a timeout, a replica that died mid-call)."""
    cause = _cause(e)
    if isinstance(e, QueueFull):  # the router's pool (ACQB) or the chosen model's queue is full
        retry = getattr(cause, "retry_after_s", None) or 1.0
        message = _one_line(str(cause)) or "the router's queue is full; retry later"  # our own text: which queue, how full
        return ApiError(503, message, "overloaded", "queue_full", retry_after_s=retry), 0.0
    if isinstance(e, BackPressureError):  # Serve's max_queued_requests
        retry = getattr(cfg.router, "backpressure_retry_after_s", 1.0)
        return ApiError(503, "the gateway is overloaded; retry later", "overloaded", "overloaded", retry_after_s=retry), 0.0
    if isinstance(e, DeploymentUnavailableError):  # the app is being deployed or torn down
        return ApiError(503, "the service is not available right now; retry", "overloaded", "unavailable", retry_after_s=1.0), 0.0
    failed = getattr(cause, "model", None) or model
    if isinstance(e, ModelTimeout):  # our own exception: its message names the model and the limit
        message = _one_line(str(cause)) or _timeout_message(failed, cfg)
        return ApiError(504, message, "timeout_error", "model_timeout"), max_cost
    if isinstance(e, BackendError) and getattr(cause, "status", None) == 504:  # the upstream's own timeout
        return ApiError(504, _one_line(str(cause)), "timeout_error", "model_timeout"), max_cost
    if isinstance(e, BackendError):
        if getattr(cause, "client_error", False):  # the upstream refused the request itself (its message is URL-free)
            return ApiError(400, _one_line(getattr(cause, "message", str(cause))), code="upstream_refused"), 0.0
        return ApiError(502, f"model {failed!r} failed to answer; retry later or call another model", "upstream_error"), 0.0
    if isinstance(e, RayServeException) and not isinstance(e, BackendError | ModelTimeout):
        # the router replica is unavailable (restarting, a rolling update): nothing was dispatched
        return ApiError(503, "the router is not available right now; retry", "overloaded", "unavailable", retry_after_s=1.0), 0.0
    if isinstance(e, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        return ApiError(502, f"model {failed!r} became unavailable; retry", "upstream_error", "replica_unavailable"), max_cost
    raise e


def _timeout_message(model: str, cfg: AppConfig) -> str:
    return f"model {model!r} did not answer within {cfg.router.model_timeout_s:g} s"


async def _settle(ticket, cost: float) -> None:
    await asyncio.shield(ticket.settle(cost))  # a client that goes away must not cancel the ledger's update


def _without_paths(stats):
    if isinstance(stats, dict):
        return {k: (Path(v).name if k in PATH_FIELDS and isinstance(v, str) else _without_paths(v)) for k, v in stats.items()}
    return stats


def http_proxy() -> str:
    """What hands this replica its HTTP requests: "serve" (Serve's proxy actor, over a Ray call) or "haproxy"
    (`server.proxy: haproxy`: HAProxy, over HTTP to the replica's own server). Serve reads the flag from the
    environment its processes start with, so this is what the cluster runs, whatever the config asked for."""
    from ray.serve._private import constants

    return "haproxy" if constants.RAY_SERVE_ENABLE_HA_PROXY else "serve"


# ---------------------------------------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------------------------------------
@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: AppConfig, router, models: dict, embedder=None):
        limit_blas_threads()
        from banditrouter.metrics import GatewayMetrics
        from deployments.gateway.budgets import Gate
        from deployments.gateway.cost import CostModel

        self.cfg = cfg
        self.limits = cfg.gateway.limits
        if router is None:  # router.fused: the router lives in this replica (deployments/inprocess.py)
            from deployments.inprocess import InProcessRouter
            from deployments.router import Router

            router = InProcessRouter(Router.func_or_class(cfg, embedder, models))
        self.router = router
        self.models = models
        self.model_cfgs = {m.name: m for m in cfg.models}
        self.default_preference = cfg.policy.default_preference.as_tuple()
        # app.state is Serve's copy of the app, reachable only once requests come: `bind` hands these over
        self.keystore = KeyStore.from_config(cfg.gateway.auth)
        self.metrics = GatewayMetrics()
        self.gate = Gate(cfg, metrics=self.metrics)
        self.costs = CostModel.from_config(cfg)
        self.buffer = self.learner = None
        if cfg.learning.enabled:
            from learner.actors import get_or_create_buffer, get_or_create_learner

            self.buffer = get_or_create_buffer(cfg)
            self.learner = get_or_create_learner(cfg)

    async def check_health(self) -> None:
        """A fused router's health check (Serve calls this on the ingress replica): it starts the router's weight
        sync and decision shipper, as the router deployment's own check does."""
        from deployments.inprocess import InProcessRouter

        if isinstance(self.router, InProcessRouter):  # (a handle answers hasattr for any name)
            await self.router.check_health()

    def __del__(self):
        """Replica shutdown: a fused router's queued decisions go to its spill (as a router replica's do)."""
        from deployments.inprocess import InProcessRouter

        router = getattr(self, "router", None)
        if isinstance(router, InProcessRouter):
            router.close()

    def bind(self, asgi_app) -> None:
        state = asgi_app.state
        state.keystore, state.limits, state.metrics = self.keystore, self.limits, self.metrics
        state.gateway_ready = True

    # -- chat ---------------------------------------------------------------------------------------------
    def _reachable(self, model: str) -> list:
        return list(self.model_cfgs.values()) if model == "router" else [self.model_cfgs[model]]

    def _reachable_names(self, model: str) -> list[str]:
        return list(self.models) if model == "router" else [model]

    async def _chat_request(self, request: Request) -> tuple[parsing.ChatRequest, dict | None]:
        """The validated body and its passthrough fields (n, tools, ...), refused where a reachable model can't."""
        body = parsing.parse_chat(parsing.loads_object(await request.body(), self.limits), self.limits)
        if body.model != "router" and body.model not in self.models:
            raise ApiError(
                404, f"unknown model {body.model!r}; use 'router' or one of {list(self.models)}", code="model_not_found"
            )
        passthrough = body.passthrough()
        parsing.check_passthrough(passthrough, self._reachable(body.model))
        if body.stream and passthrough and (passthrough.get("n", 1) > 1 or "tools" in passthrough):
            field = "n" if passthrough.get("n", 1) > 1 else "tools"
            msg = f"{field}: a streamed answer carries one text choice; use stream: false"
            raise ApiError(400, msg, code="unsupported_parameter")
        return body, passthrough

    @app.post("/v1/chat/completions")
    async def chat_completions(
        self, request: Request, principal: Principal = Depends(require_route), _json: None = Depends(require_json)
    ):
        rid = request_id(request)
        body, passthrough = await self._chat_request(request)
        messages = [m.forwarded() for m in body.messages]
        try:  # the latest user turn (+ router.context_turns - 1 earlier ones, newest first), not all turns joined
            conv = conversation.parse(messages, self.cfg.router.context_turns)
        except ValueError as e:  # e.g. the only user text is whitespace
            raise ApiError(422, f"messages: {e}") from None
        # the cap the maximum cost assumes is the cap sent upstream, so the reservation bounds the bill
        max_tokens = body.max_tokens or self.limits.max_tokens
        from deployments.gateway.cost import input_token_bound

        n = (passthrough or {}).get("n", 1)
        in_tokens = input_token_bound(messages, passthrough)  # tools / response_format are billed as input too
        # per model: what a timed-out call there may have cost; the reservation is the largest the request may reach
        # (after routing.max_cost_usd and, for a zcl key, its remaining budget leave out models: budgets.Gate)
        bounds = {m: n * self.costs.max_cost(m, in_tokens, max_tokens) for m in self._reachable_names(body.model)}
        user = body.user or self._header_user(request)  # (before admission: a refusal here reserves nothing)
        routed = body.model == "router"
        ticket = await self.gate.admit_request(principal, bounds, routed=routed, max_cost_usd=body.max_cost_usd())
        max_cost = ticket.max_cost_usd
        spent, handed_over = max_cost, False
        try:
            if routed:
                req = RouteRequest(
                    request_id=rid,
                    messages=messages,
                    prompt=conv.routing_text,
                    preference=body.preference(self.default_preference),
                    max_tokens=max_tokens,
                    temperature=body.temperature,
                    user=user,
                    turn=conv.turn,
                    history_refs=conv.history_refs,
                    arrived_at=time.time(),
                    key_id=principal.key_id,
                    timeout_cost_usd=bounds,
                    allowed_models=ticket.allowed_models,
                    pacing_z=ticket.pacing_z,
                    **({"passthrough": passthrough} if passthrough else {}),
                )
                if body.stream:
                    resp = await self._stream_routed(req, ticket, max_cost)
                    handed_over = True
                    return resp
                out = await self.router.route.remote(req)
                spent = out["result"].cost_usd
                return self._completion(out["result"], out["routing"]["model"], out["routing"])
            creq = CompletionRequest(
                request_id=rid,
                messages=messages,
                prompt=conv.routing_text,
                max_tokens=max_tokens,
                temperature=body.temperature,
                passthrough=passthrough,
            )
            if body.stream:
                resp = await self._stream_direct(body.model, creq, ticket, max_cost)
                handed_over = True
                return resp
            try:
                result = await asyncio.wait_for(self.models[body.model].complete.remote(creq), self.cfg.router.model_timeout_s)
            except asyncio.TimeoutError:
                raise ModelTimeout(_timeout_message(body.model, self.cfg)) from None
            spent = result.cost_usd
            return self._completion(result, body.model, None)
        except (
            QueueFull,
            ModelTimeout,
            BackendError,
            RayServeException,  # BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
        ) as e:
            err, spent = _failure(e, body.model, max_cost, self.cfg)
            log.warning("request %s: %s answered %d: %r", rid, body.model, err.status, _cause(e))
            raise err from None
        finally:
            if not handed_over:
                await _settle(ticket, spent)

    def _completion(self, result: CompletionResult, model: str, routing: dict | None) -> JSONResponse:
        info = dict(result.info)
        choices = info.pop("choices", None)  # an upstream's own choices (n > 1), when it returned them
        message: dict = {"role": "assistant", "content": result.text}
        if info.get("tool_calls"):  # where OpenAI clients read them (the content is then usually empty)
            message["tool_calls"] = info.pop("tool_calls")
        finish = info.pop("finish_reason", None) or "stop"
        body = {
            "id": f"chatcmpl-{(routing or {}).get('decision_id') or uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices or [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": self._usage(result),
            "backend": info,
        }
        headers = {}
        if routing is not None:
            body["routing"] = routing
            headers["x-decision-id"] = routing["decision_id"]
        return JSONResponse(body, headers=headers)

    @staticmethod
    def _usage(result: CompletionResult) -> dict:
        usage = {
            "prompt_tokens": result.input_tokens,
            "completion_tokens": result.output_tokens,
            "total_tokens": result.input_tokens + result.output_tokens,
        }
        if result.info.get("usage_estimated"):
            usage["estimated"] = True  # the upstream omitted usage: counts (and cost) are estimates
        return usage

    # -- streaming ----------------------------------------------------------------------------------------
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

    async def _sse(self, rid: str, cid: str, model: str, first, items, routing: dict | None, ticket, max_cost: float):
        """The event stream. `first`: the item already taken from `items` before the 200 went out (None: none).
        A failure mid-stream ends it with `data: {"error": {...}}` and `data: [DONE]`; the ticket is settled
        here in any case (the reserved maximum unless the final result said what the call cost)."""
        spent = max_cost
        try:
            yield self._chunk(cid, model, {"role": "assistant", "content": ""}, **({"routing": routing} if routing else {}))
            final = None
            try:
                pending = [first] if first is not None else []
                while True:
                    if pending:
                        item = pending.pop()
                    else:
                        try:
                            item = await items.__anext__()
                        except StopAsyncIteration:
                            break
                    if isinstance(item, CompletionResult):
                        final = item
                        continue
                    yield self._chunk(cid, model, {"content": item})
            except Exception as e:
                try:
                    err, _ = _failure(e, model, max_cost, self.cfg)
                except Exception:
                    err = ApiError(500, errors.INTERNAL_ERROR, "server_error", "internal_error")
                log.warning("request %s: stream from %s failed midway: %r", rid, model, _cause(e))
                body = {"error": {"message": err.message, "type": err.type, "code": err.code, "request_id": rid}}
                yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
            extra = {}
            if final is not None:
                spent = final.cost_usd
                extra["usage"] = self._usage(final)
                if routing:
                    extra["routing"] = {**routing, "cost_usd": final.cost_usd}
            yield self._chunk(cid, model, {}, "stop", **extra)
            yield "data: [DONE]\n\n"
        finally:
            aclose = getattr(items, "aclose", None)  # the fused router's own generator holds a model slot:
            if aclose is not None:  # give it back now when the client leaves (a handle's stream is Serve's)
                with contextlib.suppress(Exception):
                    await aclose()
            await _settle(ticket, spent)

    async def _stream_routed(self, req: RouteRequest, ticket, max_cost: float) -> StreamingResponse:
        """The router's stream yields the routing dict only once the request holds a model slot and the
        model's first item is in: a full queue, a failed or timed-out model is still a status code here."""
        gen = self.router.options(stream=True).route_stream.remote(req)
        routing = await gen.__anext__()
        cid = f"chatcmpl-{routing['decision_id']}"
        headers = {"x-decision-id": routing["decision_id"]}
        events = self._sse(req.request_id, cid, routing["model"], None, gen, routing, ticket, max_cost)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _stream_direct(self, model: str, creq: CompletionRequest, ticket, max_cost: float) -> StreamingResponse:
        gen = self.models[model].options(stream=True).stream.remote(creq)
        try:  # the first item before the 200: a failing or silent model is a 502 / 504 status code
            first = await asyncio.wait_for(gen.__anext__(), self.cfg.router.model_timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()
            raise ModelTimeout(_timeout_message(model, self.cfg)) from None
        except StopAsyncIteration:
            first = None
        events = self._sse(creq.request_id, f"chatcmpl-{uuid.uuid4().hex}", model, first, gen, None, ticket, max_cost)
        return StreamingResponse(events, media_type="text/event-stream")

    # -- the rest -----------------------------------------------------------------------------------------
    def _header_user(self, request: Request) -> str | None:
        """The `x-user-id` header, under the same length limit as the body's `user` (422 beyond it)."""
        user = request.headers.get("x-user-id")
        if user is not None and len(user) > self.limits.max_user_chars:
            raise ApiError(422, f"x-user-id: at most {self.limits.max_user_chars} characters")
        return user

    @app.get("/v1/models")
    async def list_models(self, principal: Principal = Depends(require_route)):
        now = int(time.time())
        names = ["router", *self.models]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": now, "owned_by": "banditrouter"} for n in names],
        }

    @app.get("/v1/budget")
    async def budget(self, principal: Principal = Depends(require_route)):
        """The caller's own budget: {"key_id", "budget_usd", "period", "pacing", "spent_usd", "reserved_usd",
        "period_start", "period_end" (epoch seconds; end null for total), "z" (zcl: the current bin's fraction
        spent), "bin"}. A key without a budget: 200 with budget_usd and every figure null."""
        return await self.gate.budget_status(principal)

    @app.get("/health")
    async def health(self, principal: Principal | None = Depends(optional_principal)):
        if principal is None or not principal.has("admin"):
            return {"status": "ok"}
        info = await self.router.info.remote()
        return {
            "status": "ok",
            "policy": info["policy"],
            "policy_version": info["policy_version"],
            "tau": info["tau"],
            "learning": self.buffer is not None,
            "models": list(self.models),
            "serve_handles": info.get("serve_handles"),
            "embedder_calls": info.get("embedder_calls"),
            "http_proxy": http_proxy(),
        }

    def _learning(self):
        if self.buffer is None:
            raise ApiError(404, "online learning is off in this deployment (learning.enabled: false)", code="learning_disabled")

    @app.post("/v1/feedback")
    async def feedback(
        self, request: Request, principal: Principal = Depends(require_route), _json: None = Depends(require_json)
    ):
        """{"decision_id": str, "score": float in [0, 1], "user"?: str}. Only the key (and user, when the
        decision had one) that made the request may score it (403 otherwise). Idempotent per decision; a
        second, different score 409; NaN / out of range 422. Feedback for a decision the buffer does not hold
        yet is held for `learning.feedback_hold_s`: 202 {"status": "held"}; an unknown id is 404 only when the
        hold is off or full. Every refusal of a score is counted at the buffer."""
        rid = request_id(request)
        self._learning()
        fb = parsing.parse_feedback(parsing.loads_object(await request.body(), self.limits))
        user = fb.user or self._header_user(request)
        # the event id is fixed here, so a call Ray retries (buffer restarting) cannot record it twice
        out = await self.buffer.add_feedback.remote(fb.decision_id, fb.score, new_id(), key_id=principal.key_id, user=user)
        code = out.pop("code")
        if code >= 400:
            kind = {403: "permission_error", 404: "not_found_error", 409: "conflict_error"}.get(code, "invalid_request_error")
            raise ApiError(code, out["message"], kind, out["reason"])
        return JSONResponse({**out, "request_id": rid}, status_code=code)

    @app.get("/v1/learner/stats")
    async def learner_stats(self, principal: Principal = Depends(require_admin)):
        self._learning()
        learner, buffer = await asyncio.gather(self.learner.stats.remote(), self.buffer.stats.remote())
        return {"learner": _without_paths(learner), "buffer": _without_paths(buffer)}

    @app.get("/v1/learner/installs")
    async def learner_installs(self, principal: Principal = Depends(require_admin)):
        """When each router replica installed each version, and the staleness of that install."""
        self._learning()
        return {"installs": await self.learner.installs_log.remote()}

    @app.post("/v1/learner/flush")
    async def learner_flush(self, principal: Principal = Depends(require_admin), _json: None = Depends(require_json)):
        """Consume the whole log now, update, commit and export the checkpoint (end of a run)."""
        self._learning()
        return _without_paths(await self.learner.flush.remote())

    @app.post("/v1/learner/reset")
    async def learner_reset(self, principal: Principal = Depends(require_admin), _json: None = Depends(require_json)):
        """Cold start: the learner replaces the policy with an untrained one; routers install it."""
        self._learning()
        return {"version": await self.learner.reset.remote()}

    @app.get("/v1/routing/events")
    async def events(self, n: int = Query(100, ge=1, le=10_000), principal: Principal = Depends(require_admin)):
        """The router replica's most recent decision events, without raw embeddings (for inspection, tests)."""
        events = await self.router.recent_events.remote(n)
        return {"events": [{k: v for k, v in e.items() if k not in HIDDEN_EVENT_FIELDS} for e in events]}
