"""PILOT: preference-prior informed LinUCB (arXiv 2508.21141, as summarised in ../shared/papers/ALGORITHMS.md).

    offline   the preference prior (banditrouter.prior): psi(x) = W x + b and one vector theta_a per model,
              calibrated to the score scale: prior_a(x) = scale * cos(psi(x), theta_a) + offset_a
    features  phi(x) = [psi(x) / |psi(x)| ; 1]                        (d' + 1)
    init      A_a = lambda I,  b_a = lambda theta0_a                  theta0_a = [scale theta_a / |theta_a| ; offset_a]
              so theta^_a = A_a^-1 b_a = theta0_a: before any update the policy predicts the prior exactly
    choose    argmax_a  w_q (phi . theta^_a + alpha sqrt(phi^T A_a^-1 phi)) - w_c c~_a      (explore=True)
              argmax_a  w_q  phi . theta^_a                           - w_c c~_a      (explore=False)
    learn     for the chosen arm only: A_a += phi phi^T, b_a += score phi (standard LinUCB, Woodbury)

**Full information offline.** The prior is trained with full information from the offline log: every model's
outcome on every train prompt (`build_pilot`, `banditrouter train --policy pilot`). Online, PILOT is a bandit
learner: `update` sees the chosen arm's outcome only.

What is the paper's and what is ours:
- [paper] the prior's two phases, the LinUCB initialisation A_a = lambda I, b_a = lambda theta_pref_a, standard
  updates of the chosen arm.
- [ours] the calibration (banditrouter.prior): LinUCB here regresses scores in [0, 1], raw cosines live in
  [-1, 1], so theta0 is the calibrated prior (one scale, a per-model offset, least squares on the train split).
- [ours] what is learned online is the chosen arm's *score* (quality), not the BaRP reward: cost is known far
  better than quality and enters as the preference term w_c c~_a (and, under a budget, through pacing:
  banditrouter.pacing). c~_a is the arm's running mean of the normalised cost min(c / tau, 1) over the
  samples it was chosen on, started from the train log's mean with the weight of `cost_prior_weight` samples.
- [ours] lambda (`ridge`, the prior's strength in samples' worth), alpha and every constant of the prior.

`values(x, w)` = w_q * predicted score - w_c * c~_a (with w = (1, 0): the predicted score), which is what the
budget pacing (banditrouter.pacing.pace) compares with each arm's estimated cost. Decisions are deterministic
(propensity 1). The prior is a fixed input, not learned online: `fixed_kwargs` hands it to
`untrained_like`, so a cold start or a router's shell keeps it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from banditrouter.data.log import RoutingLog
from banditrouter.policies.base import BanditBatch, Policy, StateError, deterministic
from banditrouter.policies.linear import DisjointLinear, LinearConfig
from banditrouter.prior import PRIOR_CONFIG_FIELDS, PRIOR_PARAMS, PreferencePrior, PriorConfig, train_prior, untrained_prior
from banditrouter.reward import normalised_cost


@dataclass(frozen=True)
class PILOTConfig(LinearConfig):
    ridge: float = 20.0
    """lambda: the prior's strength, A_a = lambda I and b_a = lambda theta0_a (about lambda / 2 samples' worth,
    as |phi|^2 = 2). With `alpha`, chosen among ridge 1, 5, 20 x alpha 0.1, 0.3 by the mean score of an online run
    (w = (1, 0)) over a validation stream carved from the train split (seeded 80/20; the prior trained on the
    rest): RouterBench 0.867-0.887, llmrouter 0.590-0.615, ridge 20 / alpha 0.1 best on average [ours]."""
    alpha: float = 0.1
    """Width of the optimism bonus while learning (explore=True), on the score scale."""
    prior_dim: int = 64
    """d': width of the prior's query projection psi (and of every theta_a)."""
    cost_prior_weight: float = 20.0
    """The train log's mean normalised cost of an arm counts as this many observed samples in c~_a."""

    def __post_init__(self) -> None:
        for name in ("ridge", "alpha", "cost_prior_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"pilot {name} must be a finite number >= 0, got {v!r}")
        if self.ridge <= 0:
            raise ValueError(f"pilot ridge (lambda, the prior's strength) must be > 0, got {self.ridge!r}")
        if isinstance(self.prior_dim, bool) or not isinstance(self.prior_dim, int) or self.prior_dim < 1:
            raise ValueError(f"pilot prior_dim must be an integer >= 1, got {self.prior_dim!r}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(f"pilot refresh_every must be an integer >= 1, got {self.refresh_every!r}")


PILOT_CONFIG_FIELDS = tuple(f.name for f in fields(PILOTConfig))


def _config_from(config: dict[str, Any]) -> PILOTConfig:
    unknown = sorted(set(config) - set(PILOT_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown pilot config fields {unknown}; the policy takes {list(PILOT_CONFIG_FIELDS)}")
    return PILOTConfig(**config)


class PILOT(DisjointLinear):
    """Disjoint LinUCB on the prior's features, started at the prior. Shares DisjointLinear's statistics
    (A, A^-1, b, theta per arm), predictions, widths, state and refresh schedule; its features and its target
    (the score, not the reward) are its own."""

    name = "pilot"
    config_cls = PILOTConfig

    def __init__(self, models, context_dim, tau, seed=0, prior: PreferencePrior | None = None, **config):
        """`prior`: a trained banditrouter.prior.PreferencePrior for these models and this context width; None =
        an untrained one (random psi and theta, calibration 0: predicts 0 for every arm, no cost prior)."""
        if "features" in config:
            raise ValueError("pilot takes no learned features (`features`): its query projection psi is part of its prior")
        Policy.__init__(self, models, context_dim, tau, seed)  # not DisjointLinear's: its arrays are sized for x ⊕ w ⊕ 1
        if prior is not None and "prior_dim" not in config and isinstance(prior, PreferencePrior):
            config = {**config, "prior_dim": prior.dim}
        self.config = _config_from(config)
        if prior is None:
            prior = untrained_prior(self.models, self.context_dim, self.config.prior_dim, seed)
        self._check_prior(prior)
        self.prior = prior
        self.feature_dim = prior.dim + 1
        self._start_from_prior()
        self.cost_sum = np.zeros(self.n_arms)
        self.cost_count = np.zeros(self.n_arms)

    def _check_prior(self, prior) -> None:
        if not isinstance(prior, PreferencePrior):
            raise TypeError(f"prior must be a banditrouter.prior.PreferencePrior or None, got {type(prior).__name__}")
        if prior.models != self.models:
            raise ValueError(f"the prior ranks models {list(prior.models)}, this policy routes over {list(self.models)}")
        if prior.in_dim != self.context_dim:
            raise ValueError(f"the prior takes {prior.in_dim}-d contexts, this policy gets {self.context_dim}-d")
        if prior.dim != self.config.prior_dim:
            raise ValueError(f"the prior is {prior.dim}-d but prior_dim is {self.config.prior_dim}")

    def _start_from_prior(self) -> None:
        """A_a = lambda I, b_a = lambda theta0_a: theta^_a = theta0_a (the calibrated prior)."""
        lam, d, k = self.config.ridge, self.feature_dim, self.n_arms
        theta0 = self.prior.linear_weights()
        self.A = np.repeat(np.eye(d)[None] * lam, k, axis=0)
        self.A_inv = np.repeat(np.eye(d)[None] / lam, k, axis=0)
        self.b = lam * theta0
        self.theta = theta0.copy()
        self._since_refresh = np.zeros(k, dtype=np.int64)

    # ====================================================================================================
    # ALGO LOGIC
    # ====================================================================================================
    def _phi(self, contexts: np.ndarray) -> np.ndarray:
        z = self.prior.embed(contexts).astype(np.float64)
        return np.hstack([z, np.ones((len(z), 1))])

    def features(self, contexts, preferences) -> np.ndarray:
        """(n, d' + 1) phi(x) = [psi(x) / |psi(x)| ; 1] (the preference is not a feature: the score does not
        depend on it)."""
        x, _ = self._check_inputs(contexts, preferences)
        return self._phi(x)

    def expected_costs(self) -> np.ndarray:
        """(K,) c~_a: the running mean normalised cost, the train log's mean counting `cost_prior_weight`
        samples (an arm with neither prior nor samples: 0)."""
        n0 = np.where(self.prior.cost_count > 0, self.config.cost_prior_weight, 0.0)
        total = n0 + self.cost_count
        return np.where(total > 0, (n0 * self.prior.cost_mean + self.cost_sum) / np.maximum(total, 1e-12), 0.0)

    def predicted_scores(self, contexts: np.ndarray) -> np.ndarray:
        """(n, K) phi . theta^_a: the predicted score (the calibrated prior before any update)."""
        x, _ = self._check_inputs(contexts, np.array([[1.0, 0.0]]))
        return self.predict(self._phi(x))

    def values(self, contexts, preferences, *, explore=False) -> np.ndarray:
        """w_q * (predicted score [+ alpha * width while learning]) - w_c * c~_a."""
        x, p = self._check_inputs(contexts, preferences)
        phi = self._phi(x)
        q = self.predict(phi)
        if explore:
            q = q + self.config.alpha * self.widths(phi)
        return p[:, :1] * q - p[:, 1:] * self.expected_costs()[None, :]

    def select(self, contexts, preferences, *, explore=False):
        # UCB is deterministic given the statistics: the chosen arm has propensity 1.
        return deterministic(self.values(contexts, preferences, explore=explore).argmax(axis=1), self.version)

    def update(self, batch: BanditBatch) -> dict[str, float]:
        """Standard LinUCB updates of each chosen arm on its score; its cost joins its running cost mean."""
        phi = self._phi(batch.contexts)
        y = np.asarray(batch.scores, dtype=np.float64)
        c = normalised_cost(batch.costs, self.tau)
        for a in np.unique(batch.arms):
            m = batch.arms == a
            self._update_arm(a, phi[m], y[m])
            self.cost_sum[a] += float(c[m].sum())
            self.cost_count[a] += float(m.sum())
        self.version += 1
        return {
            "mean_score": float(y.mean()) if len(y) else 0.0,
            "mean_reward": float(batch.rewards(self.tau).mean()) if len(y) else 0.0,
        }

    # -- state ------------------------------------------------------------------------------------------
    def fixed_kwargs(self) -> dict[str, Any]:
        """The prior is a fixed input (trained offline, never changed online): a cold copy keeps it."""
        return {"prior": self.prior.copy()}

    def state_dict(self) -> dict[str, Any]:
        """Adds the prior's metadata (its arrays are among the params, `prior.*`)."""
        return {**super().state_dict(), "prior": dict(self.prior.meta)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state.get("prior", {"trained": False})
        if not isinstance(meta, dict):
            raise StateError(f"checkpoint prior metadata must be a dict, got {type(meta).__name__}")
        params = state.get("params")
        if not isinstance(params, dict):
            raise StateError("checkpoint holds no params")
        prior = PreferencePrior.from_params(self.models, params, meta)  # validated before anything changes
        if prior.in_dim != self.context_dim or prior.dim != self.config.prior_dim:
            raise StateError(
                f"checkpoint prior is {prior.in_dim}->{prior.dim}, this policy takes {self.context_dim}->{self.config.prior_dim}"
            )
        super().load_state_dict(state)
        self.prior = prior

    def _params(self):
        return {
            "A": self.A.copy(),
            "b": self.b.copy(),
            "cost_sum": self.cost_sum.copy(),
            "cost_count": self.cost_count.copy(),
            **self.prior.params(),
        }

    def _load_params(self, params):
        if (params["cost_count"] < 0).any() or (params["cost_sum"] < 0).any():
            raise StateError("checkpoint cost_sum and cost_count must be >= 0")
        super()._load_params({"A": params["A"], "b": params["b"]})
        self.cost_sum = params["cost_sum"].astype(np.float64)
        self.cost_count = params["cost_count"].astype(np.float64)

    def _config(self):
        return asdict(self.config)


def build_pilot(
    train_log: RoutingLog, train_contexts: np.ndarray, tau: float, seed: int = 0, progress: bool = False, **config: Any
) -> PILOT:
    """Train the preference prior on the train split (full information: every observed cell of the log's
    table) and return the PILOT policy started at it (version 0). `config`: PILOTConfig fields (alpha, ridge,
    prior_dim, cost_prior_weight, refresh_every) and the prior's training settings (banditrouter.prior.PriorConfig
    fields but `dim`, which is `prior_dim`: triplet_epochs, bt_epochs, lr, ...)."""
    if "dim" in config:
        raise ValueError("the prior's width is `prior_dim`, not `dim`")
    prior_kw = {k: config.pop(k) for k in list(config) if k in PRIOR_CONFIG_FIELDS}
    policy_config = _config_from(config)  # refuse bad policy settings before training anything
    prior_config = PriorConfig(dim=policy_config.prior_dim, **prior_kw)
    x = np.asarray(train_contexts, dtype=np.float32)
    prior = train_prior(train_log, x, tau, config=prior_config, seed=seed, progress=progress)
    return PILOT(train_log.models, x.shape[1], tau, seed=seed, prior=prior, **asdict(policy_config))


__all__ = ["PILOT", "PILOTConfig", "PRIOR_PARAMS", "build_pilot"]
