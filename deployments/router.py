"""Router deployment: embeds the prompt (through the batched embedder), asks the policy, dispatches to the
chosen model through a bounded per-model admission queue, and emits a DecisionEvent.

Admission is capacity-aware (`deployments/scheduler.py`): at most `max_in_flight_per_model` requests run on
a model at once. A policy that decides at arrival (BaRP, LinUCB, ...) picks the model first, then the request
waits FIFO for that model, at most `queue_capacity` per model. A queue-aware policy (ACQB) routes and
schedules jointly: requests wait in one pool of at most `queue_capacity`, and whenever a model frees a slot
the policy's `schedule` picks the (waiting request, free model) pairs. Beyond either bound the request is
refused (503 with Retry-After) rather than queued without bound. The decision records the queue wait and
the queue length at decision; `banditrouter_queue_length` exports the replica's waiting count.

The response never waits on the learning path: the decision goes to a `DecisionShipper`
(`deployments/delivery.py`) that delivers it to the buffer in the background, with a bounded timeout and a
local spill. A model call that fails or runs past `router.model_timeout_s` is still a decision: it is logged
with outcome "error" / "timeout" and an outcome event of that kind (value 0), so the policy learns that the
arm fails.

Failure semantics (one deadline, `router.model_timeout_s`, bounds everything below):
- retryable (a `BackendError` marked retryable: upstream 5xx / connection error; a dead replica:
  RayActorError / ActorDiedError / ActorUnavailableError, Serve's ReplicaUnavailableError /
  DeploymentUnavailableError): retried on another replica (Serve's handle picks a live one) at most
  `router.max_retries` times with jittered exponential backoff; then the router **falls back** to the
  next-best model by the policy among the models not yet failed (`Policy.fallback_probabilities`: the
  policy's probabilities renormalised over the rest, or its best remaining arm, propensity 1, when it is
  greedy). A model with no live replica within `router.replica_wait_s` (every replica down) falls back at
  once, without retries. Each failed attempt is logged as its own decision (outcome error); the answer is
  logged as the decision for the model that served it, with `fallback=True` and that propensity, and the
  routing dict says `"fallback": true, "failed_models": [...]`.
- not retryable (a 4xx from an upstream, no logged answer, a misconfiguration, anything unexpected): logged,
  no retry, no fallback; the ingress gets a `BackendError` (502, or 400 when `client_error`).
- past the deadline: `ModelTimeout` (504), logged with outcome timeout.
When every model failed, the ingress gets the last `BackendError`. Nothing else leaves `route`/`route_stream`
except `QueueFull` (503 + Retry-After) and client cancellation.

Budgets (issue 12; the ingress sets both fields of `RouteRequest`): `allowed_models` restricts the decision to
the models whose cost bound fits the key's remaining budget (the policy's own rule restricted:
`Policy.fallback_probabilities`, true propensity); `pacing_z` (keys with `pacing: zcl`) routes by the ZCL
knapsack rule (`banditrouter.pacing.pace`, `LivePacer`: L, U and the models' estimated costs) within them.
Retries and fallbacks stay inside `allowed_models`. The decision event and the routing dict record `allowed`,
`paced`, `pacing_z`, `eligible` and `fallback_cheapest`. With ACQB such a request is decided at arrival and takes a
slot on its model at once (503 when none is free): the joint schedule knows no per-request model set.

ACQB (the pool path): a fallback does not wait in the pool again; it takes the best remaining model (by
the same rule) that has a free slot at that moment, and fails with the BackendError when none has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import ray
from ray import serve

from banditrouter.config import AppConfig
from banditrouter.embeddings import text_key
from banditrouter.schemas import DecisionEvent, FeedbackEvent, new_id
from banditrouter.threads import limit_blas_threads
from deployments.backends import BackendError, CompletionRequest, CompletionResult
from deployments.coalesce import Coalescer
from deployments.conversation import text_ref
from deployments.events import make_sink
from deployments.scheduler import AdmissionQueue, Grant, PoolScheduler, QueueFull

logger = logging.getLogger("ray.serve")


class ModelTimeout(RuntimeError):
    """The routed model did not answer within `router.model_timeout_s`; the ingress answers 504."""


RETRY_BACKOFF_S = (0.05, 1.0)
"""Backoff before retry n (0-based): min(cap, base * 2^n), times a uniform jitter in [0.5, 1.5)."""


def _replica_gone_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a call raises when its replica died or cannot be reached (retried elsewhere)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


def on_current_loop(handle) -> None:
    """Initialise a Serve handle so that its request routing (replica choice, dispatch) runs on the calling
    event loop instead of Serve's shared router thread: `_init(_run_router_in_separate_loop=False)`, the
    per-handle form of what Serve's throughput mode sets for every handle. Anything else (a test fake, a handle
    already in use) is left as it is."""
    from ray.serve.handle import DeploymentHandle

    if isinstance(handle, DeploymentHandle) and not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=False)


def _cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapper."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class _NoReplica(BackendError):
    """No live replica of the model within `router.replica_wait_s`: fall back without retrying it."""


class _Failover(Exception):
    """A model failed retryably and used up its retries: the router falls back."""

    def __init__(self, error: BackendError):
        super().__init__(str(error))
        self.error = error


@dataclass
class _Call:
    """One request across its attempts: the embedding, the shared deadline, the models that failed."""

    req: RouteRequest
    x: np.ndarray
    turn_context: np.ndarray | None
    deadline: float
    failed: list[str] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)
    """Fallback candidates whose queue was full: not failed, just not available to this request."""


@dataclass
class _Served:
    """The attempt that answered: its decision and output (a CompletionResult; for a stream, the response
    generator and its first item), and the slot it holds (closed by the caller)."""

    call: _Call
    model: str
    d: RoutedDecision
    decision_id: str
    out: object
    t0: float
    slot: contextlib.AsyncExitStack


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    messages: list
    prompt: str
    """The routing text the router embeds: the latest user turn, then `router.context_turns - 1` earlier ones
    (deployments/conversation.py)."""
    preference: tuple[float, float]
    max_tokens: int | None = None
    temperature: float | None = None
    user: str | None = None
    turn: str | None = None
    """The latest user turn's text; None: `prompt` is the latest turn."""
    history_refs: tuple[str, ...] = ()
    """`text_ref` of the assistant turns the request carries (the last 8), for continuation detection."""
    arrived_at: float | None = None
    """Wall time the request reached the ingress (the user's send, for the retrial window)."""
    key_id: str | None = None
    """The public id of the API key that made the request (None: auth off); feedback must come from it."""
    passthrough: dict | None = None
    """OpenAI fields forwarded to upstreams that support them (n, tools, tool_choice, response_format)."""
    timeout_cost_usd: dict[str, float] | None = None
    """Per model, what a call that times out is taken to have cost (the ingress's bound on the request's cost
    there: the upstream may have billed all of it). Logged as the timed-out decision's cost; 0 when absent."""
    allowed_models: tuple[str, ...] | None = None
    """The models this request may use (set by the ingress: those whose cost bound fits the key's remaining
    budget and the request's `routing.max_cost_usd`); None: all. Decisions, retries and fallbacks stay inside it."""
    pacing_z: float | None = None
    """zcl-paced keys only: the fraction z of the current budget bin already spent (set by the ingress); the router
    then applies `banditrouter.pacing.pace`. None: no pacing."""


@dataclass(frozen=True)
class RoutedDecision:
    """The policy's decision for one request (it duck-types `banditrouter.policies.Decision`: arm,
    propensity, policy_version) with what the DecisionEvent records about the moment it was made: `time`
    (wall clock, before the model call), the latest turn's embedding when it differs from the routing
    context, and the queue wait / length at decision where a scheduler measured them."""

    arm: int
    propensity: float
    policy_version: int
    time: float
    turn_context: np.ndarray | None = None
    queue_wait_s: float | None = None
    queue_length: int | None = None
    pacing: dict | None = None
    """What the decision records about the budget: `allowed` (models the request could use), and for a paced key
    `paced`, `pacing_z`, `eligible`, `fallback_cheapest` (None: neither restricted nor paced)."""


def checkpoint_extra(path) -> dict:
    """The `extra` dict a checkpoint carries (dataset, split, pacing calibration...), without building the policy."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (load_checkpoint reports a bad file; here: no extra)
        logger.warning("could not read the extra of checkpoint %s: %s", path, e)
        return {}
    extra = state.get("extra") if isinstance(state, dict) else None
    return dict(extra) if isinstance(extra, dict) else {}


class LivePacer:
    """ZCL pacing in the router (banditrouter/pacing.py): the bounds L, U and each model's weight (its estimated
    cost in USD for a prompt).

    L, U: `pacing.L` / `pacing.U` from the config; else the checkpoint's calibration (`banditrouter train` stores
    it: extra["pacing"]); else (a warning at start) estimated live as `pacing.lu_quantiles` of the ratios seen in
    the last `WINDOW` paced decisions. Weights: a replay model's from the checkpoint's cost estimator (fit on the
    train log of the dataset it was trained on), else from its replay dataset's train log; a token-priced model's
    from its prices and `pacing.output_tokens` (`CostEstimator.from_prices`)."""

    WINDOW = 4096

    def __init__(self, cfg: AppConfig, models: tuple[str, ...], extra: dict | None = None):
        from banditrouter.pacing import CostEstimator

        pc = cfg.pacing
        self.models, self.quantiles, self.bins = tuple(models), tuple(pc.lu_quantiles), pc.bins
        cal = (extra or {}).get("pacing") or {}
        if pc.L is not None:
            self.bounds, self.source = (float(pc.L), float(pc.U)), "config"
        elif cal.get("L") is not None and cal.get("U") is not None:
            self.bounds, self.source = (float(cal["L"]), float(cal["U"])), f"checkpoint ({cal.get('tuning', '?')})"
            served = cfg.policy.default_preference.as_tuple()
            if cal.get("preference") is not None and not np.allclose(cal["preference"], served):
                logger.warning(
                    "pacing: L, U were calibrated at preference %s, the config's default is %s: values (and so the ratios)"
                    " are on another scale at other preferences; set pacing.L / pacing.U to override",
                    list(cal["preference"]),
                    list(served),
                )
        else:
            self.bounds, self.source = None, "estimated live"
            logger.warning(
                "pacing: neither pacing.L/U in the config nor a pacing calibration in the checkpoint (retrain with "
                "`banditrouter train`): zcl keys pace with L, U estimated from the last %d paced decisions",
                self.WINDOW,
            )
        self._seen: deque[np.ndarray] = deque(maxlen=self.WINDOW)
        self._fitted = CostEstimator.from_dict(cal["cost_estimator"]) if cal.get("cost_estimator") else None
        self._cfg_models, self._output_tokens = {m.name: m for m in cfg.models}, pc.output_tokens
        self.estimator: CostEstimator | None = None
        self.missing: tuple[str, ...] = ()
        if not any(self._needs_replay_log(m) for m in self.models):
            self.resolve()  # else on the first paced request (`resolve` may read a replay dataset's train log)

    def _needs_replay_log(self, name: str) -> bool:
        mc = self._cfg_models.get(name)
        fitted = self._fitted is not None and name in self._fitted.models
        return mc is not None and mc.backend == "replay" and mc.replay is not None and not fitted

    @property
    def ready(self) -> bool:
        return self.estimator is not None

    def resolve(self) -> None:
        """Build the weights: per model, the first of (replay: checkpoint estimator, replay train log), prices,
        checkpoint estimator that knows it."""
        from banditrouter.pacing import CostEstimator

        k_models = len(self.models)
        base, per_char, missing, logs = np.zeros(k_models), np.zeros(k_models), [], {}
        for k, name in enumerate(self.models):
            mc, est = self._cfg_models.get(name), None
            fitted = self._fitted if self._fitted is not None and name in self._fitted.models else None
            if mc is not None and mc.backend == "replay":
                est = fitted
                if est is None and mc.replay is not None:
                    key = (mc.replay.dataset, str(mc.replay.data_dir))
                    if key not in logs:
                        logs[key] = self._fit_replay(mc.replay)
                    est = logs[key] if logs[key] is not None and name in logs[key].models else None
            if est is None and mc is not None and mc.input_price_per_mtok is not None and mc.output_price_per_mtok is not None:
                prices = {name: (mc.input_price_per_mtok, mc.output_price_per_mtok)}
                est = CostEstimator.from_prices(prices, self._output_tokens)
            est = est or fitted
            if est is None:
                missing.append(name)
                continue
            i = est.models.index(name)
            base[k], per_char[k] = est.base_usd[i], est.per_char_usd[i]
        self.missing = tuple(missing)
        self.estimator = CostEstimator(self.models, base, per_char)
        if missing:
            logger.warning("pacing: no cost estimate for %s: zcl keys cannot be paced", missing)

    @staticmethod
    def _fit_replay(rc):
        from banditrouter.data import load_dataset
        from banditrouter.pacing import CostEstimator

        try:
            return CostEstimator.fit(load_dataset(rc.dataset, "train", data_dir=rc.data_dir))
        except Exception as e:  # noqa: BLE001 (no data here: that model just has no weight)
            logger.warning("pacing: could not fit costs on the replay dataset %s: %s", rc.dataset, e)
            return None

    def weights(self, prompt_chars: int) -> np.ndarray:
        if self.estimator is None:
            self.resolve()
        if self.missing:
            raise BackendError(
                f"this key paces its budget, but the router has no cost estimate for {list(self.missing)}: give those"
                " models input/output prices, or serve a checkpoint from `banditrouter train` (it stores the estimator)"
            )
        return self.estimator(int(prompt_chars))

    def pace(self, policy, x: np.ndarray, pref, prompt_chars: int, z: float, allowed, explore: bool, rng):
        """`banditrouter.pacing.pace` for one request with this replica's bounds and weights."""
        from banditrouter.pacing import pace, ratio_bounds, ratios

        w = self.weights(prompt_chars)
        if self.bounds is not None:
            L, U = self.bounds
        else:
            values = policy.values(x[None, :], np.asarray([pref], dtype=np.float64), explore=False)[0]
            self._seen.append(ratios(values, w))
            try:
                L, U = ratio_bounds(np.stack(self._seen), np.ones((len(self._seen), len(w))), self.quantiles)
            except ValueError:  # no positive ratio yet: nothing is eligible under any threshold
                L, U = 1.0, 1.0
        return pace(policy, x, np.asarray(pref), w, z, L, U, allowed=allowed, explore=explore, rng=rng)

    def info(self) -> dict:
        return {
            "bounds": None if self.bounds is None else list(self.bounds),
            "source": self.source,
            "bins": self.bins,
            "seen": len(self._seen),
            "missing_weights": list(self.missing),
        }


@serve.deployment(name="router")
class Router:
    def __init__(self, cfg: AppConfig, embedder, models: dict):
        limit_blas_threads()
        from banditrouter.policies import load_checkpoint

        self.cfg = cfg
        # its own random stream per replica: exploring replicas must not draw the same arms in lockstep
        self.policy = load_checkpoint(cfg.policy.checkpoint, seed=secrets.randbits(31), expect=cfg.policy.name)
        missing = [m for m in self.policy.models if m not in models]
        if missing:
            raise ValueError(f"policy {cfg.policy.checkpoint} routes to {missing}, which the pool does not serve")
        self.embedder = embedder
        self.models = models
        self.coalescer = None
        if cfg.router.coalesce_embeds:
            self.coalescer = Coalescer(
                self._embed_many,
                max_batch=cfg.embedder.batch_size,
                max_in_flight=cfg.router.embed_calls_in_flight or 2 * cfg.embedder.num_replicas,
                timeout_s=cfg.router.embed_timeout_s,
            )
        self.pacer = LivePacer(cfg, self.policy.models, checkpoint_extra(cfg.policy.checkpoint))
        self.sink = make_sink(cfg.router.events_path)
        self.pool_version = text_key(",".join(sorted(models)))[:12]
        self.buffer = self.learner = self.shipper = None
        self._sync_task: asyncio.Task | None = None
        self._handles_init = False
        self.weights = {"installed": 0, "rejected": 0, "last_error": None}
        from banditrouter.metrics import RouterMetrics

        self.metrics = RouterMetrics(self._replica())
        self.metrics.version.set(self.policy.version)
        r = cfg.router
        # A queue-aware policy (ACQB) schedules one waiting pool: whenever a model frees a slot it picks the
        # (waiting request, free model) pairs. The others decide at arrival and wait FIFO for that model.
        self.pool: PoolScheduler | None = None
        self.queues: dict[str, AdmissionQueue] = {}
        if self.policy.queue_aware:
            self.pool = PoolScheduler(
                len(self.policy.models),
                r.max_in_flight_per_model,
                r.queue_capacity,
                self._schedule,
                on_change=lambda n: self.metrics.queue_length.set(float(n)),
            )
        else:
            self.queues = {m: AdmissionQueue(r.max_in_flight_per_model, r.queue_capacity) for m in models}
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

    def _init_handles(self) -> None:
        """router.handles_on_loop: on the first request, on the loop that serves it, bind the handles' Serve
        routing to that loop (a handle is initialised once; one the ingress used first keeps its thread)."""
        if self._handles_init:
            return
        self._handles_init = True
        if self.cfg.router.handles_on_loop:
            for handle in (self.embedder, *self.models.values()):
                on_current_loop(handle)

    async def _ensure_sync(self) -> None:
        self._init_handles()
        if self.learner is None:
            return
        self._start_sync()
        if not self._synced.is_set():  # the first requests of a (re)started replica wait for current weights
            try:
                await asyncio.wait_for(self._synced.wait(), timeout=10)
            except asyncio.TimeoutError:
                pass

    def _allowed(self, req: RouteRequest) -> np.ndarray | None:
        """(K,) bool of the models `req.allowed_models` names (None: every model). BackendError (429) when
        it names none of the pool's models: the ingress should have refused the request already."""
        if req.allowed_models is None:
            return None
        names = set(req.allowed_models)
        mask = np.array([m in names for m in self.policy.models])
        if not mask.any():
            raise BackendError("no model fits this request's budget", status=429, client_error=True)
        return mask

    def _decide(self, x: np.ndarray, req: RouteRequest):
        """The policy's choice for one request: (arm, propensity, policy_version, pacing info or None).

        Unrestricted and unpaced: `select`. Restricted to `req.allowed_models`: `fallback_probabilities` over
        them (the policy's own rule restricted, with its true propensity). Paced (`req.pacing_z`): the ZCL rule
        (`banditrouter.pacing.pace`) within the allowed models."""
        explore = self.cfg.policy.explore
        pref = np.asarray([req.preference], dtype=np.float64)
        mask = self._allowed(req)
        info = None if mask is None else {"allowed": int(mask.sum())}
        if req.pacing_z is not None:
            z = float(req.pacing_z)
            if not np.isfinite(z):
                raise ValueError(f"pacing_z must be finite, got {req.pacing_z!r}")
            chars = len(req.prompt)
            p = self.pacer.pace(self.policy, x, req.preference, chars, z, mask, explore, self.policy.rng)
            info = {
                **(info or {}),
                "paced": True,
                "pacing_z": z,
                "eligible": int(p.eligible.sum()),
                "fallback_cheapest": bool(p.fallback_cheapest),
            }
            return p.arm, p.propensity, self.policy.version, info
        if mask is not None and not mask.all():
            probs = self.policy.fallback_probabilities(x[None, :], pref, mask, explore=explore)[0]
            arm = int(self.policy.rng.choice(len(probs), p=probs / probs.sum())) if explore else int(np.argmax(probs))
            return arm, float(probs[arm]), self.policy.version, info
        d = self.policy.select(x[None, :], pref, explore=explore)[0]
        return d.arm, d.propensity, d.policy_version, info

    def _routing(self, decision_id: str, model: str, d, cost: float | None, failed: list[str] | None = None) -> dict:
        routing = {
            "decision_id": decision_id,
            "model": model,
            "propensity": d.propensity,
            "policy": self.policy.name,
            "policy_version": d.policy_version,
            "cost_usd": cost,
        }
        if failed:
            routing.update(fallback=True, failed_models=list(failed))
        if getattr(d, "pacing", None):
            routing.update(d.pacing)
        return routing

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
        fallback: bool = False,
    ) -> None:
        """Record the decision (and, for a failed call, its outcome event). Never waits: the buffer gets it
        through the shipper, after the caller has its answer.

        `d` is a `RoutedDecision` (from `_prepare`) or anything with arm / propensity / policy_version, and
        optionally `time`, `turn_context`, `queue_wait_s`, `queue_length` (a scheduler's grant). Without a
        `time` the decision is taken to have been made when the model call started (now - latency)."""
        failed = outcome != "ok"
        lat = latency_s if failed else (result.latency_s if result else None)
        decided_at = getattr(d, "time", None)
        if decided_at is None:
            decided_at = time.time() - (lat or 0.0)
        turn_x = getattr(d, "turn_context", None)
        ev = DecisionEvent(
            decision_id=decision_id,
            request_id=req.request_id,
            model=model,
            arm=d.arm,
            propensity=d.propensity,
            policy=self.policy.name,
            policy_version=d.policy_version,
            preference=tuple(req.preference),
            context=x.tolist(),  # float32 -> Python floats in one C call
            context_ref=text_key(req.prompt),
            cost_usd=self._failure_cost(req, model, outcome) if failed else (result.cost_usd if result else None),
            latency_s=lat,
            pool_version=self.pool_version,
            user=req.user,
            time=float(decided_at),
            outcome=outcome,
            turn_ref=text_ref(req.turn if req.turn is not None else req.prompt),
            answer_ref=text_ref(result.text) if result is not None and not failed else None,
            history_refs=tuple(req.history_refs),
            turn_context=None if turn_x is None else turn_x.tolist(),
            queue_wait_s=getattr(d, "queue_wait_s", None),
            queue_length=getattr(d, "queue_length", None),
            requested_at=req.arrived_at,
            answered_at=time.time(),  # _emit runs when the answer (or the failure) is out
            key_id=req.key_id,
            fallback=fallback,
            **(getattr(d, "pacing", None) or {}),
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

    @staticmethod
    def _failure_cost(req: RouteRequest, model: str, outcome: str) -> float:
        """An error billed nothing (the upstream refused or failed before answering); a timeout may have been
        billed in full: its cost is the request's cost bound on that model (issue 11: cost incurred, score 0)."""
        if outcome == "timeout" and req.timeout_cost_usd:
            return float(req.timeout_cost_usd.get(model, 0.0))
        return 0.0

    async def _embed_many(self, texts: list[str]) -> np.ndarray:
        resp = self.embedder.embed_many.remote(texts)
        try:
            return await resp
        except asyncio.CancelledError:  # timed out (router.embed_timeout_s) or shutting down: the embedder's too
            resp.cancel()
            raise

    async def _embed(self, req: RouteRequest) -> tuple[np.ndarray, np.ndarray | None]:
        """The routing text's embedding, and the latest turn's when the routing text holds more (both
        requests go out at once)."""
        turn = req.turn if req.turn is not None and req.turn != req.prompt else None
        texts = [req.prompt] + ([turn] if turn is not None else [])
        if self.coalescer is not None:  # router.coalesce_embeds: one embedder call for what waits meanwhile
            embs = await asyncio.gather(*map(self.coalescer, texts))
        else:
            embs = await asyncio.gather(*(self.embedder.remote(t) for t in texts))
        x = np.asarray(embs[0], dtype=np.float32)
        return x, (np.asarray(embs[1], dtype=np.float32) if turn is not None else None)

    async def _prepare(self, req: RouteRequest):
        await self._ensure_sync()
        x, turn_x = await self._embed(req)
        await self._pacer_ready(req)
        arm, propensity, version, pacing = self._decide(x, req)
        # stamped here, at the decision (FIFO: before the slot wait and the model call); the retrial window
        # itself runs from `answered_at` of one decision to `requested_at` of the next
        routed = RoutedDecision(arm, propensity, version, time=time.time(), turn_context=turn_x, pacing=pacing)
        return x, routed, self.policy.models[arm], new_id()

    async def _pacer_ready(self, req: RouteRequest) -> None:
        """The pacer's weights may need a replay dataset's train log: read once, off the event loop."""
        if req.pacing_z is not None and not self.pacer.ready:
            await asyncio.to_thread(self.pacer.resolve)

    def _completion_request(self, req: RouteRequest, x: np.ndarray) -> CompletionRequest:
        return CompletionRequest(
            request_id=req.request_id,
            messages=req.messages,
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            context=x.tolist(),  # as the array, no faster through Ray's serialiser (scripts/bench_copies.py --ray)
            **({"passthrough": dict(req.passthrough)} if req.passthrough else {}),
        )

    def _timeout(self, model: str) -> ModelTimeout:
        return ModelTimeout(f"model {model!r} did not answer within {self.cfg.router.model_timeout_s:g} s")

    def _schedule(self, contexts: np.ndarray, preferences: np.ndarray, free: np.ndarray):
        """The pool's joint decision, by whichever policy object is installed now."""
        return self.policy.schedule(contexts, preferences, free, explore=self.cfg.policy.explore)

    @contextlib.asynccontextmanager
    async def _admitted(self, req: RouteRequest):
        """Decide and hold a slot on the chosen model for the length of the call: yields (x, d, model,
        decision_id) with `d` a RoutedDecision carrying the queue wait and the queue length at decision.

        Pool (queue-aware policy): embed, wait in the pool until the policy gives the request a free model
        (the decision and its time are that moment). FIFO: decide at arrival (`_prepare`), then wait for a
        slot on that model. `queue_length` counts the other requests waiting in this replica at decision.
        QueueFull (the ingress's 503) when the pool, or the chosen model's queue, is full."""
        if self.pool is not None:
            await self._ensure_sync()
            x, turn_x = await self._embed(req)
            if req.pacing_z is not None or req.allowed_models is not None:
                async with self._restricted_pool_slot(req, x, turn_x) as got:
                    yield got
                return
            try:
                grant = await self.pool.acquire(x, req.preference)
            except QueueFull:
                self.metrics.queue_full.inc()
                raise
            d = RoutedDecision(
                grant.arm,
                grant.propensity,
                grant.policy_version,
                time=time.time(),
                turn_context=turn_x,
                queue_wait_s=grant.queue_wait_s,
                queue_length=grant.queue_length,
            )
            self.metrics.queue_wait.observe(grant.queue_wait_s)
            async with self.pool.slot(grant):
                yield x, d, self.policy.models[d.arm], new_id()
            return
        x, d, model, decision_id = await self._prepare(req)
        queue, length, t0 = self.queues[model], self._fifo_waiting(), time.monotonic()
        self.metrics.queue_length.set(float(length + queue.slots.locked()))
        try:
            await queue.__aenter__()
        except QueueFull:
            self.metrics.queue_full.inc()
            raise
        finally:  # admitted, refused or cancelled while waiting: the gauge says what waits now, never a stale count
            self.metrics.queue_length.set(float(self._fifo_waiting()))
        try:
            waited = time.monotonic() - t0
            self.metrics.queue_wait.observe(waited)
            yield x, dataclasses.replace(d, queue_wait_s=waited, queue_length=length), model, decision_id
        finally:
            await queue.__aexit__(None, None, None)

    @contextlib.asynccontextmanager
    async def _restricted_pool_slot(self, req: RouteRequest, x: np.ndarray, turn_x: np.ndarray | None):
        """Pool path (queue-aware policy) for a request restricted to `allowed_models` or paced: the joint
        schedule knows no per-request model set, so the request is decided at arrival like a FIFO one (the
        same `_decide`) and takes a slot on its model at once; QueueFull (503 + Retry-After) when that model
        has none free. It never waits in the pool, and never gets a model outside its allowed set."""
        await self._pacer_ready(req)
        arm, propensity, version, pacing = self._decide(x, req)
        if self.pool.free()[arm] <= 0:
            self.metrics.queue_full.inc()
            raise QueueFull(f"model {self.policy.models[arm]!r} has no free slot for this budget-restricted request", 1)
        self.pool.in_flight[arm] += 1
        length = self.pool.waiting
        grant = Grant(arm, propensity, version, 0.0, length)
        d = RoutedDecision(
            arm, propensity, version, time=time.time(), turn_context=turn_x, queue_wait_s=0.0, queue_length=length, pacing=pacing
        )
        async with self.pool.slot(grant):
            yield x, d, self.policy.models[arm], new_id()

    def _fifo_waiting(self) -> int:
        return sum(q.waiting for q in self.queues.values())

    @staticmethod
    def _with_queue(routing: dict, d) -> dict:
        return {**routing, "queue_wait_s": d.queue_wait_s, "queue_length": d.queue_length}

    # -- calls, retries and fallback ------------------------------------------------------------------------
    async def _call(self, model: str, creq: CompletionRequest, deadline: float, stream: bool):
        """One call of `model` on one replica: its CompletionResult, or for a stream (response generator,
        first item; None when it ended at once). Waits at most `router.replica_wait_s` for a live replica
        (Serve's `choose_replica`; `_NoReplica` past it) and raises asyncio.TimeoutError at the deadline."""
        handle = self.models[model]
        method = handle.options(stream=True).stream if stream else handle.complete
        choose = getattr(method, "choose_replica", None)  # a Serve handle; test fakes are called directly
        if choose is None:
            return await self._consume(method.remote(creq), deadline, stream)
        remaining = deadline - time.monotonic()
        wait = min(remaining, self.cfg.router.replica_wait_s)
        chooser = choose(creq)
        try:
            selection = await asyncio.wait_for(chooser.__aenter__(), timeout=max(0.0, wait))
        except asyncio.TimeoutError:
            if wait >= remaining:
                raise
            raise _NoReplica(f"model {model!r} has no live replica (waited {wait:g} s)", retryable=True) from None
        try:
            return await self._consume(method.dispatch(selection, creq), deadline, stream)
        finally:  # the response has been awaited (or cancelled): release the reservation if dispatch did not use it
            await chooser.__aexit__(None, None, None)

    @staticmethod
    async def _consume(response, deadline: float, stream: bool):
        timeout = max(0.0, deadline - time.monotonic())
        try:
            if not stream:
                return await asyncio.wait_for(response, timeout=timeout)
            try:
                first = await asyncio.wait_for(response.__anext__(), timeout=timeout)
            except StopAsyncIteration:
                first = None
            return response, first
        except asyncio.TimeoutError:
            response.cancel()
            raise

    def _classify(self, model: str, e: BaseException) -> BackendError:
        """The BackendError a failed call stands for (retryable or not); its message names no internals."""
        cause = _cause(e)
        if isinstance(cause, BackendError):
            return cause
        if isinstance(e, _replica_gone_errors()) or isinstance(cause, _replica_gone_errors()):
            return BackendError(f"model {model!r}: its replica died or was unreachable", retryable=True)
        logger.warning("model %s failed with an unexpected %s: %s", model, type(cause).__name__, cause)
        return BackendError(f"model {model!r} failed ({type(cause).__name__})")

    async def _attempts(self, call: _Call, model: str, d: RoutedDecision, decision_id: str, stream: bool):
        """Call `model`, retrying a retryable failure on another replica at most `router.max_retries` times
        with jittered backoff. Every failed attempt is logged as its own decision (outcome error, or timeout).
        Returns (decision_id, output, t0) of the attempt that answered; raises `_Failover` when the model used
        up its retries (or has no live replica), BackendError when the failure is not retryable, ModelTimeout
        at the deadline."""
        req, x, fallback = call.req, call.x, bool(call.failed)
        creq = self._completion_request(req, x)
        retries = self.cfg.router.max_retries
        for attempt in range(retries + 1):
            if attempt:
                decision_id, d = new_id(), dataclasses.replace(d, time=time.time())
            t0 = time.perf_counter()
            try:
                return decision_id, await self._call(model, creq, call.deadline, stream), t0
            except asyncio.TimeoutError:
                self._emit(req, decision_id, model, d, x, None, "timeout", time.perf_counter() - t0, fallback)
                raise self._timeout(model) from None
            except Exception as e:  # noqa: BLE001 (classified: every failure is a logged outcome)
                err = self._classify(model, e)
                self._emit(req, decision_id, model, d, x, None, "error", time.perf_counter() - t0, fallback)
                if not err.retryable:
                    raise err from None
                if isinstance(err, _NoReplica) or attempt == retries:
                    raise _Failover(err) from None
                self.metrics.retry(model)
                base, cap = RETRY_BACKOFF_S
                delay = min(cap, base * 2**attempt) * random.uniform(0.5, 1.5)
                await asyncio.sleep(max(0.0, min(delay, call.deadline - time.monotonic())))
        raise AssertionError("unreachable")

    async def _fallback(self, call: _Call, slot: contextlib.AsyncExitStack) -> tuple[str, RoutedDecision] | None:
        """The next model for a request whose models in `call.failed` failed: drawn from the policy's
        `fallback_probabilities` over the models neither failed nor full (the argmax, propensity 1, when the
        policy is greedy), its slot entered into `slot`. None when no model is left."""
        models = self.policy.models
        budget = self._allowed(call.req)
        while True:
            allowed = np.array([m not in call.failed and m not in call.skipped for m in models])
            if budget is not None:  # never outside the models the request may use
                allowed &= budget
            if self.pool is not None:
                allowed &= self.pool.free() > 0
            if not allowed.any():
                return None
            explore = self.cfg.policy.explore
            probs = self.policy.fallback_probabilities(
                call.x[None, :], np.asarray([call.req.preference]), allowed, explore=explore
            )[0]
            arm = int(self.policy.rng.choice(len(models), p=probs / probs.sum())) if explore else int(np.argmax(probs))
            model, t0 = models[arm], time.monotonic()
            if self.pool is not None:  # a free slot now (checked above); released through the pool
                self.pool.in_flight[arm] += 1
                slot.callback(self.pool.release, arm)
                length = self.pool.waiting
            else:
                queue, length = self.queues[model], self._fifo_waiting()
                try:
                    await asyncio.wait_for(queue.__aenter__(), timeout=max(0.0, call.deadline - time.monotonic()))
                except QueueFull:
                    call.skipped.add(model)
                    continue
                except asyncio.TimeoutError:
                    raise self._timeout(model) from None
                slot.push_async_exit(queue.__aexit__)
            d = RoutedDecision(
                arm,
                float(probs[arm]),
                self.policy.version,
                time=time.time(),
                turn_context=call.turn_context,
                queue_wait_s=time.monotonic() - t0,
                queue_length=length,
                pacing=self._fallback_pacing(call.req, budget, int(allowed.sum())),
            )
            return model, d

    @staticmethod
    def _fallback_pacing(req: RouteRequest, budget: np.ndarray | None, candidates: int) -> dict | None:
        """A fallback's pacing record: it is chosen by the policy among the allowed models not yet failed (the
        ZCL rule picked the first model only); `eligible` counts those candidates."""
        if req.pacing_z is None and req.allowed_models is None:
            return None
        info = {"allowed": int(budget.sum())} if budget is not None else {}
        if req.pacing_z is not None:
            info.update(paced=True, pacing_z=float(req.pacing_z), eligible=candidates, fallback_cheapest=False)
        return info

    async def _open(self, req: RouteRequest, stream: bool) -> _Served:
        """Admission, then attempts (retries, fallbacks) until a model answers (for a stream: yields its first
        item). The returned `slot` holds the serving model's slot; the caller closes it."""
        slot = contextlib.AsyncExitStack()
        try:
            x, d, model, decision_id = await slot.enter_async_context(self._admitted(req))
            call = _Call(req, x, d.turn_context, time.monotonic() + self.cfg.router.model_timeout_s)
            while True:
                try:
                    decision_id, out, t0 = await self._attempts(call, model, d, decision_id, stream)
                    if call.failed:
                        self.metrics.fallback(call.failed[-1], model)
                    return _Served(call, model, d, decision_id, out, t0, slot)
                except _Failover as f:
                    error = f.error
                call.failed.append(model)
                await slot.aclose()  # the failed model's slot goes back before the fallback waits for one
                slot = contextlib.AsyncExitStack()
                nxt = await self._fallback(call, slot)
                if nxt is None:
                    raise BackendError(
                        f"every model tried failed ({', '.join(call.failed)}): {error.message}",
                        retryable=False,
                        status=error.status,
                    ) from None
                (model, d), decision_id = nxt, new_id()
        except BaseException:
            await slot.aclose()
            raise

    async def route(self, req: RouteRequest) -> dict:
        served = await self._open(req, stream=False)
        async with served.slot:
            call, result, d = served.call, served.out, served.d
            self._emit(req, served.decision_id, served.model, d, call.x, result, fallback=bool(call.failed))
            routing = self._routing(served.decision_id, served.model, d, result.cost_usd, call.failed)
            return {"result": result, "routing": self._with_queue(routing, d)}

    async def route_stream(self, req: RouteRequest):
        """Yields the routing dict first, once the request holds a model slot AND the model's first item has
        arrived (retries and fallback happen before it), so a full queue, an upstream that fails before its
        first byte or a timeout raise here and are a status code at the ingress. Then text chunks, then the
        final CompletionResult. The timeout bounds the whole stream; a failure mid-stream is logged as the
        decision's outcome and raised as BackendError / ModelTimeout (the ingress ends the stream with an
        error event)."""
        served = await self._open(req, stream=True)
        async with served.slot:
            call, d, model, decision_id = served.call, served.d, served.model, served.decision_id
            gen, first = served.out
            fallback, result = bool(call.failed), None
            yield self._with_queue(self._routing(decision_id, model, d, None, call.failed), d)
            item = first
            while item is not None:
                if isinstance(item, CompletionResult):
                    result = item
                yield item
                try:
                    timeout = max(0.0, call.deadline - time.monotonic())
                    item = await asyncio.wait_for(gen.__anext__(), timeout=timeout)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    gen.cancel()
                    self._emit(req, decision_id, model, d, call.x, None, "timeout", time.perf_counter() - served.t0, fallback)
                    raise self._timeout(model) from None
                except Exception as e:  # noqa: BLE001 (mid-stream: bytes are out, no retry; logged, then raised)
                    err = self._classify(model, e)
                    self._emit(req, decision_id, model, d, call.x, None, "error", time.perf_counter() - served.t0, fallback)
                    raise BackendError(f"model {model!r} failed mid-stream: {err.message}", retryable=False) from None
            self._emit(req, decision_id, model, d, call.x, result, fallback=fallback)

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
            "queues": {m: {"waiting": q.waiting, "in_flight": q.in_flight} for m, q in self.queues.items()},
            "pool": self._pool_info(),
            "tau": self.policy.tau,
            "weights": dict(self.weights),
            "pacing": self.pacer.info(),
            "delivery": self.shipper.stats() if self.shipper is not None else None,
            "replica": self._replica(),
            "serve_handles": self._handles_where(),
            "embedder_calls": self.coalescer.stats() if self.coalescer is not None else None,
            "time": time.time(),
        }

    def _handles_where(self) -> str | None:
        """Where the Serve routing of this router's handles (embedder, models) runs: "replica loop"
        (router.handles_on_loop), "router thread" (Serve's default), "mixed" (a handle the ingress used first
        keeps the thread), or None while none has been used (or for test fakes)."""
        inits = [getattr(h, "init_options", None) for h in (self.embedder, *self.models.values())]
        where = {"router thread" if i._run_router_in_separate_loop else "replica loop" for i in inits if i is not None}
        return where.pop() if len(where) == 1 else ("mixed" if where else None)

    def _pool_info(self) -> dict | None:
        """The waiting pool of a queue-aware policy (None for FIFO): waiting, capacity, per-model slots in use
        and free, the oldest wait, and counts (admitted, scheduled, refused, cancelled, released)."""
        if self.pool is None:
            return None
        st = self.pool.stats()
        models = self.policy.models
        return {
            **st,
            "in_flight": dict(zip(models, st["in_flight"], strict=True)),
            "free": dict(zip(models, st["free"], strict=True)),
            "max_in_flight_per_model": self.pool.max_in_flight,
        }

    def recent_events(self, n: int = 100) -> list[dict]:
        return self.sink.recent(n)
