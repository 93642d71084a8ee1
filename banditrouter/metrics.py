"""Ray metrics (exported for Prometheus by every Ray node's metrics agent; see README "Metrics").

banditrouter_decisions_total{model}        routed decisions per model
banditrouter_cost_usd_total{model}         spend per model
banditrouter_policy_version{replica}        version a router replica serves
banditrouter_weights_rejected_total         weight blobs a router refused
banditrouter_model_failures_total{model,outcome}  routed calls that failed: outcome error | timeout
banditrouter_decision_spill_events          decisions a router replica holds in its spill file (buffer slow or down)
banditrouter_decisions_spilled_total        decisions a router replica had to spill
banditrouter_queue_length{replica}          requests waiting in a router replica (ACQB: its pool; FIFO: all its model queues)
banditrouter_queue_wait_s{replica}          histogram: seconds a routed request waited for a model slot
banditrouter_queue_full_total{replica}      requests refused (503 + Retry-After) because the pool or queue was full
banditrouter_feedback_total{kind}           explicit / retrial / accepted outcomes the learner consumed
banditrouter_feedback_refused_total{reason} poisoned or invalid feedback refused at the buffer
banditrouter_reward                         mean reward of the learner's last update
banditrouter_learned_samples_total          bandit samples applied
banditrouter_learner_lag_events             events in the log the learner has not consumed
banditrouter_buffer_depth_events            events in the durable log
banditrouter_learner_version                version the learner last published
banditrouter_install_staleness_s{replica}   histogram: seconds from the outcome that caused a version to its install on a replica
banditrouter_http_responses_total{route,code}  answers the gateway gave, by route and status code
banditrouter_key_spend_usd_total{key}        spend settled per API key (USD)
banditrouter_key_refused_total{key,code}     requests refused per API key: rate_limited | budget_exceeded
banditrouter_fallbacks_total{failed,model}   routed requests served by a fallback model after `failed` failed
banditrouter_retries_total{model}            model calls retried (another replica) after a 5xx / connection error / dead replica
"""

from __future__ import annotations

import threading
import time
import weakref

from ray.util.metrics import Counter, Gauge, Histogram

QUEUE_WAIT_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
STALENESS_BOUNDARIES_S = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]
GAUGE_REFRESH_S = 5.0  # well inside Ray's gauge TTL (2 report intervals: 20 s by default)


class LastValueGauge(Gauge):
    """A gauge that keeps exporting its last value per tag set until it is set again.

    Ray 2.60's metrics agent drops a gauge series about two report intervals (20 s by default) after its last
    `set` (measured: a gauge set once is gone from the agent's /metrics 25-30 s later; counters stay). A value
    set only when it changes (the policy version a router replica serves, an empty queue, the last reward)
    would then vanish from Prometheus while still true. One daemon thread per process (started at the first
    `set`) re-sets every such gauge's last values every GAUGE_REFRESH_S."""

    _live: weakref.WeakSet = weakref.WeakSet()
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None):
        super().__init__(name, description, tag_keys)
        self._last: dict[frozenset, float] = {}

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        super().set(value, tags)
        if value is None:
            return
        self._last[frozenset(self._get_final_tags(tags).items())] = value
        cls = LastValueGauge
        with cls._lock:
            cls._live.add(self)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._refresh_forever, name="gauge-refresh", daemon=True)
                cls._thread.start()

    def refresh(self) -> None:
        """Export every tag set's last value again."""
        for tags, value in list(self._last.items()):
            super().set(value, dict(tags))

    @classmethod
    def _refresh_forever(cls) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with cls._lock:
                gauges = list(cls._live)
            for g in gauges:
                g.refresh()


class RouterMetrics:
    def __init__(self, replica: str = "local"):
        self.decisions = Counter("banditrouter_decisions_total", "Routed decisions per model.", tag_keys=("model",))
        self.cost = Counter("banditrouter_cost_usd_total", "Spend per model (USD).", tag_keys=("model",))
        self.version = LastValueGauge(
            "banditrouter_policy_version", "Policy version this router replica serves.", tag_keys=("replica",)
        )
        self.rejected_weights = Counter("banditrouter_weights_rejected_total", "Weight blobs a router refused.")
        self.failures = Counter(
            "banditrouter_model_failures_total", "Routed model calls that failed.", tag_keys=("model", "outcome")
        )
        self.spill_depth = LastValueGauge("banditrouter_decision_spill_events", "Decisions in this router replica's spill file.")
        self.spilled = Counter("banditrouter_decisions_spilled_total", "Decisions this router replica had to spill.")
        self._spilled_seen = 0
        self.fallbacks = Counter(
            "banditrouter_fallbacks_total", "Requests served by a fallback model.", tag_keys=("failed", "model")
        )
        self.retries = Counter(
            "banditrouter_retries_total", "Model calls retried after a retryable failure.", tag_keys=("model",)
        )
        tags = {"replica": replica}
        self.queue_length = LastValueGauge(
            "banditrouter_queue_length", "Requests waiting in this router replica for a model slot.", tag_keys=("replica",)
        )
        self.queue_wait = Histogram(
            "banditrouter_queue_wait_s",
            "Seconds a routed request waited for a model slot.",
            boundaries=QUEUE_WAIT_BOUNDARIES_S,
            tag_keys=("replica",),
        )
        self.queue_full = Counter(
            "banditrouter_queue_full_total", "Requests refused because the pool or queue was full.", tag_keys=("replica",)
        )
        for m in (self.version, self.queue_length, self.queue_wait, self.queue_full):
            m.set_default_tags(tags)
        self.queue_length.set(0.0)

    def decision(self, model: str, cost: float | None) -> None:
        self.decisions.inc(1.0, tags={"model": model})
        if cost is not None and cost > 0:
            self.cost.inc(float(cost), tags={"model": model})

    def failure(self, model: str, outcome: str) -> None:
        self.failures.inc(1.0, tags={"model": model, "outcome": outcome})

    def fallback(self, failed: str, model: str) -> None:
        self.fallbacks.inc(1.0, tags={"failed": failed, "model": model})

    def retry(self, model: str) -> None:
        self.retries.inc(1.0, tags={"model": model})

    def delivery(self, stats: dict) -> None:
        """`DecisionShipper.on_stats`: spill depth, and how many decisions were spilled since last time."""
        self.spill_depth.set(float(stats["spill_pending"]))
        if stats["spilled"] > self._spilled_seen:
            self.spilled.inc(float(stats["spilled"] - self._spilled_seen))
            self._spilled_seen = stats["spilled"]


class GatewayMetrics:
    """What the HTTP gateway (ingress) and the budget ledger export."""

    def __init__(self):
        self.responses = Counter(
            "banditrouter_http_responses_total", "Answers the gateway gave, by route and status code.", tag_keys=("route", "code")
        )
        self.spent = Counter("banditrouter_key_spend_usd_total", "Spend settled per API key (USD).", tag_keys=("key",))
        self.refusals = Counter("banditrouter_key_refused_total", "Requests refused per API key (429).", tag_keys=("key", "code"))

    def response(self, route: str, status: int) -> None:
        self.responses.inc(1.0, tags={"route": route, "code": str(int(status))})

    def spend(self, key_id: str | None, usd: float) -> None:
        if usd > 0:
            self.spent.inc(float(usd), tags={"key": key_id or "anonymous"})

    def refused(self, key_id: str | None, code: str) -> None:
        self.refusals.inc(1.0, tags={"key": key_id or "anonymous", "code": code})


EMBED_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class EmbedderMetrics:
    """What the embedder replica exports: the size of each batch it encoded (a coalesced list, or what
    `serve.batch` formed from single calls) and the seconds it took."""

    def __init__(self):
        self.batch_size = Histogram(
            "banditrouter_embed_batch_size", "Prompts per embedder batch.", boundaries=EMBED_BATCH_BOUNDARIES
        )
        self.batch_s = Histogram(
            "banditrouter_embed_batch_seconds", "Seconds one embedder batch took.", boundaries=QUEUE_WAIT_BOUNDARIES_S
        )


class LearnerMetrics:
    def __init__(self):
        self.feedback = Counter("banditrouter_feedback_total", "Outcomes consumed by the learner.", tag_keys=("kind",))
        self.refused = LastValueGauge(
            "banditrouter_feedback_refused_total", "Feedback refused at the buffer.", tag_keys=("reason",)
        )
        self.reward = LastValueGauge("banditrouter_reward", "Mean reward of the samples in the learner's last update.")
        self.samples = Counter("banditrouter_learned_samples_total", "Bandit samples the learner has applied.")
        self.lag = LastValueGauge("banditrouter_learner_lag_events", "Events in the log the learner has not consumed.")
        self.depth = LastValueGauge("banditrouter_buffer_depth_events", "Events in the durable log.")
        self.version = LastValueGauge("banditrouter_learner_version", "Version the learner last published.")
        self.staleness = Histogram(
            "banditrouter_install_staleness_s",
            "Seconds from the outcome that caused a policy version to a router replica installing it.",
            boundaries=STALENESS_BOUNDARIES_S,
            tag_keys=("replica",),
        )

    def install(self, replica: str, staleness_s: float | None) -> None:
        """A router replica installed a version; `staleness_s` is None when no recorded outcome caused it
        (the version the learner started with, a reset)."""
        if staleness_s is not None:
            self.staleness.observe(max(0.0, float(staleness_s)), tags={"replica": replica})
