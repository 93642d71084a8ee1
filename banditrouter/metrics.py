"""Ray metrics (exported for Prometheus by every Ray node's metrics agent; see README "Metrics").

banditrouter_decisions_total{model}        routed decisions per model
banditrouter_cost_usd_total{model}         spend per model
banditrouter_policy_version                 version a router replica serves
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
banditrouter_http_responses_total{route,code}  answers the gateway gave, by route and status code
banditrouter_key_spend_usd_total{key}        spend settled per API key (USD)
banditrouter_key_refused_total{key,code}     requests refused per API key: rate_limited | budget_exceeded
banditrouter_fallbacks_total{failed,model}   routed requests served by a fallback model after `failed` failed
banditrouter_retries_total{model}            model calls retried (another replica) after a 5xx / connection error / dead replica
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

QUEUE_WAIT_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]


class RouterMetrics:
    def __init__(self, replica: str = "local"):
        self.decisions = Counter("banditrouter_decisions_total", "Routed decisions per model.", tag_keys=("model",))
        self.cost = Counter("banditrouter_cost_usd_total", "Spend per model (USD).", tag_keys=("model",))
        self.version = Gauge("banditrouter_policy_version", "Policy version this router replica serves.")
        self.rejected_weights = Counter("banditrouter_weights_rejected_total", "Weight blobs a router refused.")
        self.failures = Counter(
            "banditrouter_model_failures_total", "Routed model calls that failed.", tag_keys=("model", "outcome")
        )
        self.spill_depth = Gauge("banditrouter_decision_spill_events", "Decisions in this router replica's spill file.")
        self.spilled = Counter("banditrouter_decisions_spilled_total", "Decisions this router replica had to spill.")
        self._spilled_seen = 0
        self.fallbacks = Counter(
            "banditrouter_fallbacks_total", "Requests served by a fallback model.", tag_keys=("failed", "model")
        )
        self.retries = Counter(
            "banditrouter_retries_total", "Model calls retried after a retryable failure.", tag_keys=("model",)
        )
        tags = {"replica": replica}
        self.queue_length = Gauge(
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
        for m in (self.queue_length, self.queue_wait, self.queue_full):
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


class LearnerMetrics:
    def __init__(self):
        self.feedback = Counter("banditrouter_feedback_total", "Outcomes consumed by the learner.", tag_keys=("kind",))
        self.refused = Gauge("banditrouter_feedback_refused_total", "Feedback refused at the buffer.", tag_keys=("reason",))
        self.reward = Gauge("banditrouter_reward", "Mean reward of the samples in the learner's last update.")
        self.samples = Counter("banditrouter_learned_samples_total", "Bandit samples the learner has applied.")
        self.lag = Gauge("banditrouter_learner_lag_events", "Events in the log the learner has not consumed.")
        self.depth = Gauge("banditrouter_buffer_depth_events", "Events in the durable log.")
        self.version = Gauge("banditrouter_learner_version", "Version the learner last published.")
