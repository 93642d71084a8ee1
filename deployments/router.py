"""Router deployment: embeds the prompt (through the batched embedder), asks the policy, dispatches to the
chosen model through a bounded per-model admission queue, and emits a DecisionEvent.

Admission is capacity-aware: at most `max_in_flight_per_model` requests run on a model at once and at most
`queue_capacity` wait; beyond that the request is refused (503) rather than queued without bound. Which
waiting request goes next is FIFO here; ACQB's scheduling replaces that rule.

The response never waits on the learning path: the decision goes to a `DecisionShipper`
(`deployments/delivery.py`) that delivers it to the buffer in the background, with a bounded timeout and a
local spill. A model call that fails (`BackendError`, a dead model replica, any exception) or runs past
`router.model_timeout_s` is still a decision: it is logged with outcome "error" / "timeout" and an outcome
event of that kind (value 0), so the policy learns that the arm fails, and then the error goes to the caller
(502 / 504 at the ingress for a backend error or a timeout).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray import serve

from banditrouter.config import AppConfig
from banditrouter.embeddings import text_key
from banditrouter.schemas import DecisionEvent, FeedbackEvent, new_id
from deployments.backends import CompletionRequest, CompletionResult
from deployments.events import make_sink

logger = logging.getLogger("ray.serve")


class QueueFull(RuntimeError):
    pass


class ModelTimeout(RuntimeError):
    """The routed model did not answer within `router.model_timeout_s`; the ingress answers 504."""


class AdmissionQueue:
    def __init__(self, max_in_flight: int, capacity: int):
        self.slots = asyncio.Semaphore(max_in_flight)
        self.capacity = capacity
        self.waiting = 0

    async def __aenter__(self):
        if self.slots.locked():
            if self.waiting >= self.capacity:
                raise QueueFull
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.slots.acquire()
        return self

    async def __aexit__(self, *exc):
        self.slots.release()


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    messages: list
    prompt: str
    preference: tuple[float, float]
    max_tokens: int | None = None
    temperature: float | None = None
    user: str | None = None


@serve.deployment(name="router")
class Router:
    def __init__(self, cfg: AppConfig, embedder, models: dict):
        from banditrouter.policies import load_checkpoint

        self.cfg = cfg
        # its own random stream per replica: exploring replicas must not draw the same arms in lockstep
        self.policy = load_checkpoint(cfg.policy.checkpoint, seed=secrets.randbits(31), expect=cfg.policy.name)
        missing = [m for m in self.policy.models if m not in models]
        if missing:
            raise ValueError(f"policy {cfg.policy.checkpoint} routes to {missing}, which the pool does not serve")
        self.embedder = embedder
        self.models = models
        self.queues = {m: AdmissionQueue(cfg.router.max_in_flight_per_model, cfg.router.queue_capacity) for m in models}
        self.sink = make_sink(cfg.router.events_path)
        self.pool_version = text_key(",".join(sorted(models)))[:12]
        self.buffer = self.learner = self.shipper = None
        self._sync_task: asyncio.Task | None = None
        self.weights = {"installed": 0, "rejected": 0, "last_error": None}
        from banditrouter.metrics import RouterMetrics

        self.metrics = RouterMetrics()
        self.metrics.version.set(self.policy.version)
        if cfg.learning.enabled:
            from deployments.delivery import DecisionShipper, spill_file
            from learner.actors import get_or_create_buffer, get_or_create_learner

            lc = cfg.learning
            self.buffer = get_or_create_buffer(cfg)
            self.learner = get_or_create_learner(cfg)
            self.shipper = DecisionShipper(
                self._send_events,
                spill_file(lc.spill_dir or lc.state_dir / "spill", self._replica()),
                timeout_s=lc.delivery_timeout_s,
                max_queue=lc.delivery_queue_size,
                on_stats=self.metrics.delivery,
            )

    async def _send_events(self, events: list[dict]) -> int:
        """One batch to the buffer (the shipper bounds how long this may take)."""
        return await self.buffer.append_decisions.remote(events)

    def __del__(self):
        """Serve calls this when the replica shuts down: queued decisions go to the spill, which the next
        replica adopts and delivers."""
        shipper = getattr(self, "shipper", None)
        if shipper is not None:
            shipper.close()

    # -- weights from the learner ---------------------------------------------------------------------------
    def _replica(self) -> str:
        try:
            ctx = serve.get_replica_context()
            return getattr(getattr(ctx, "replica_id", None), "unique_id", None) or str(ctx.replica_tag)
        except Exception:  # outside Serve (unit tests)
            return "local"

    def load_weights(self, version: int, state) -> dict:
        """Install a weights blob; a corrupt, non-finite or wrong-shape one is refused and the current
        policy keeps serving."""
        from banditrouter.policies.base import StateError
        from learner.core import install

        try:
            fresh = install(self.policy, state)
        except (StateError, KeyError, TypeError, ValueError) as e:
            self.weights["rejected"] += 1
            self.weights["last_error"] = str(e)
            self.metrics.rejected_weights.inc()
            logger.warning(f"refused weights version {version}: {e}")
            return {"installed": False, "error": str(e), "version": self.policy.version}
        self.policy = fresh  # one reference swap: a decision sees the old or the new policy, never a mix
        self.weights["installed"] += 1
        self.metrics.version.set(self.policy.version)
        if self.learner is not None:
            self.learner.report_install.remote(self._replica(), self.policy.version, time.time())
        return {"installed": True, "version": self.policy.version}

    async def _sync_weights(self) -> None:
        known = -1  # first ask: whatever the learner serves now (a restarted replica catches up at once)
        while True:
            try:
                got = await self.learner.wait_for_weights.remote(known, 0.0 if known == -1 else 10.0)
                if got is not None:  # built off the event loop (LinUCB's matrices take ~0.1 s); swapped atomically
                    version, state = got
                    if isinstance(state, ray.ObjectRef):  # the learner puts each version in the object store once
                        state = await state
                    await asyncio.to_thread(self.load_weights, version, state)
                    known = version  # refused or not, wait for the next one
                self._synced.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # learner restarting: keep serving, ask again
                self.weights["last_error"] = f"learner unreachable: {e}"
                self._synced.set()
                await asyncio.sleep(0.5)

    def _start_sync(self) -> None:
        loop = asyncio.get_running_loop()
        if self.learner is not None and (
            self._sync_task is None or self._sync_task.done() or self._sync_task.get_loop() is not loop
        ):
            self._synced = asyncio.Event()
            self._sync_task = loop.create_task(self._sync_weights())

    async def _ensure_sync(self) -> None:
        if self.learner is None:
            return
        self._start_sync()
        if not self._synced.is_set():  # the first requests of a (re)started replica wait for current weights
            try:
                await asyncio.wait_for(self._synced.wait(), timeout=10)
            except asyncio.TimeoutError:
                pass

    def _decide(self, x: np.ndarray, pref: tuple[float, float]):
        d = self.policy.select(x[None, :], np.asarray([pref]), explore=self.cfg.policy.explore)
        return d[0]

    def _routing(self, decision_id: str, model: str, d, cost: float | None) -> dict:
        return {
            "decision_id": decision_id,
            "model": model,
            "propensity": d.propensity,
            "policy": self.policy.name,
            "policy_version": d.policy_version,
            "cost_usd": cost,
        }

    def _emit(
        self,
        req: RouteRequest,
        decision_id: str,
        model: str,
        d,
        x: np.ndarray,
        result: CompletionResult | None,
        outcome: str = "ok",
        latency_s: float | None = None,
    ) -> None:
        """Record the decision (and, for a failed call, its outcome event). Never waits: the buffer gets it
        through the shipper, after the caller has its answer."""
        failed = outcome != "ok"
        ev = DecisionEvent(
            decision_id=decision_id,
            request_id=req.request_id,
            model=model,
            arm=d.arm,
            propensity=d.propensity,
            policy=self.policy.name,
            policy_version=d.policy_version,
            preference=tuple(req.preference),
            context=[float(v) for v in x],
            context_ref=text_key(req.prompt),
            cost_usd=0.0 if failed else (result.cost_usd if result else None),
            latency_s=latency_s if failed else (result.latency_s if result else None),
            pool_version=self.pool_version,
            user=req.user,
            outcome=outcome,
        )
        events = [ev]
        if failed:
            events.append(FeedbackEvent(decision_id, outcome, 0.0))
            self.metrics.failure(model, outcome)
        for e in events:
            self.sink.emit(e)
        self.metrics.decision(model, ev.cost_usd)
        if self.shipper is not None:
            # not awaited: feedback that reaches the buffer before the decision is held there until it arrives
            self.shipper.submit(*(e.to_dict() for e in events))  # a decision and its outcome, never split

    async def _prepare(self, req: RouteRequest):
        await self._ensure_sync()
        x = np.asarray(await self.embedder.remote(req.prompt), dtype=np.float32)
        d = self._decide(x, req.preference)
        return x, d, self.policy.models[d.arm], new_id()

    def _completion_request(self, req: RouteRequest, x: np.ndarray) -> CompletionRequest:
        return CompletionRequest(
            request_id=req.request_id,
            messages=req.messages,
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            context=x.tolist(),
        )

    def _timeout(self, model: str) -> ModelTimeout:
        return ModelTimeout(f"model {model!r} did not answer within {self.cfg.router.model_timeout_s:g} s")

    async def route(self, req: RouteRequest) -> dict:
        x, d, model, decision_id = await self._prepare(req)
        async with self.queues[model]:
            t0 = time.perf_counter()
            call = self.models[model].complete.remote(self._completion_request(req, x))
            try:
                result: CompletionResult = await asyncio.wait_for(call, timeout=self.cfg.router.model_timeout_s)
            except asyncio.TimeoutError:
                call.cancel()
                self._emit(req, decision_id, model, d, x, None, "timeout", time.perf_counter() - t0)
                raise self._timeout(model) from None
            except Exception:  # BackendError, a dead model replica (RayActorError), anything: the arm failed
                self._emit(req, decision_id, model, d, x, None, "error", time.perf_counter() - t0)
                raise
        self._emit(req, decision_id, model, d, x, result)
        return {"result": result, "routing": self._routing(decision_id, model, d, result.cost_usd)}

    async def route_stream(self, req: RouteRequest):
        """Yields the routing dict first, then text chunks, then the final CompletionResult. The timeout
        bounds the whole stream; a failure mid-stream is logged as the decision's outcome and re-raised (the
        status line has gone out by then: the client sees the stream end early)."""
        x, d, model, decision_id = await self._prepare(req)
        yield self._routing(decision_id, model, d, None)
        result = None
        async with self.queues[model]:
            t0 = time.perf_counter()
            deadline = time.monotonic() + self.cfg.router.model_timeout_s
            gen = self.models[model].options(stream=True).stream.remote(self._completion_request(req, x))
            while True:
                try:
                    item = await asyncio.wait_for(gen.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    gen.cancel()
                    self._emit(req, decision_id, model, d, x, None, "timeout", time.perf_counter() - t0)
                    raise self._timeout(model) from None
                except Exception:  # BackendError, a dead model replica, anything: the arm failed
                    self._emit(req, decision_id, model, d, x, None, "error", time.perf_counter() - t0)
                    raise
                if isinstance(item, CompletionResult):
                    result = item
                yield item
        self._emit(req, decision_id, model, d, x, result)

    async def check_health(self) -> None:
        """Serve calls this every few seconds from the replica's loop: it also starts the weight sync and
        the decision shipper, so an idle replica follows the learner and delivers an adopted spill."""
        self._start_sync()
        if self.shipper is not None:
            self.shipper.start()

    def info(self) -> dict:
        return {
            "policy": self.policy.name,
            "policy_version": self.policy.version,
            "models": list(self.policy.models),
            "queues": {m: {"waiting": q.waiting} for m, q in self.queues.items()},
            "tau": self.policy.tau,
            "weights": dict(self.weights),
            "delivery": self.shipper.stats() if self.shipper is not None else None,
            "replica": self._replica(),
            "time": time.time(),
        }

    def recent_events(self, n: int = 100) -> list[dict]:
        return self.sink.recent(n)
