"""Ray metrics (exported for Prometheus by every Ray node's metrics agent; see README "Metrics").

banditrouter_decisions_total{model}        routed decisions per model
banditrouter_cost_usd_total{model}         spend per model
banditrouter_policy_version                 version a router replica serves
banditrouter_weights_rejected_total         weight blobs a router refused
banditrouter_feedback_total{kind}           explicit / retrial / accepted outcomes the learner consumed
banditrouter_feedback_refused_total{reason} poisoned or invalid feedback refused at the buffer
banditrouter_reward                         mean reward of the learner's last update
banditrouter_learned_samples_total          bandit samples applied
banditrouter_learner_lag_events             events in the log the learner has not consumed
banditrouter_buffer_depth_events            events in the durable log
banditrouter_learner_version                version the learner last published
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge


class RouterMetrics:
    def __init__(self):
        self.decisions = Counter("banditrouter_decisions_total", "Routed decisions per model.", tag_keys=("model",))
        self.cost = Counter("banditrouter_cost_usd_total", "Spend per model (USD).", tag_keys=("model",))
        self.version = Gauge("banditrouter_policy_version", "Policy version this router replica serves.")
        self.rejected_weights = Counter("banditrouter_weights_rejected_total", "Weight blobs a router refused.")

    def decision(self, model: str, cost: float | None) -> None:
        self.decisions.inc(1.0, tags={"model": model})
        if cost is not None and cost > 0:
            self.cost.inc(float(cost), tags={"model": model})


class LearnerMetrics:
    def __init__(self):
        self.feedback = Counter("banditrouter_feedback_total", "Outcomes consumed by the learner.", tag_keys=("kind",))
        self.refused = Gauge("banditrouter_feedback_refused_total", "Feedback refused at the buffer.", tag_keys=("reason",))
        self.reward = Gauge("banditrouter_reward", "Mean reward of the samples in the learner's last update.")
        self.samples = Counter("banditrouter_learned_samples_total", "Bandit samples the learner has applied.")
        self.lag = Gauge("banditrouter_learner_lag_events", "Events in the log the learner has not consumed.")
        self.depth = Gauge("banditrouter_buffer_depth_events", "Events in the durable log.")
        self.version = Gauge("banditrouter_learner_version", "Version the learner last published.")
