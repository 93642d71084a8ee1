"""Static baselines: random, cheapest, best single model.

They share one learner (running means of each arm's observed score and cost, from bandit feedback while
exploring uniformly), so they live in one module rather than three near-identical files.
"""

from __future__ import annotations

import numpy as np

from banditrouter.policies.base import BanditBatch, Decisions, Policy, deterministic
from banditrouter.reward import normalised_cost


class _ArmMeans(Policy):
    """Explores uniformly at random while learning; keeps per-arm running means of score and cost."""

    def __init__(self, models, context_dim, tau, seed=0):
        super().__init__(models, context_dim, tau, seed)
        self.counts = np.zeros(self.n_arms)
        self.score_sums = np.zeros(self.n_arms)
        self.cost_sums = np.zeros(self.n_arms)

    def _uniform(self, n: int) -> Decisions:
        arms = self.rng.integers(0, self.n_arms, size=n)
        return Decisions(arms, np.full(n, 1.0 / self.n_arms), self.version)

    def update(self, batch: BanditBatch) -> dict[str, float]:
        np.add.at(self.counts, batch.arms, 1.0)
        np.add.at(self.score_sums, batch.arms, batch.scores)
        np.add.at(self.cost_sums, batch.arms, batch.costs)
        self.version += 1
        return {"n": float(len(batch))}

    def arm_probabilities(self, contexts, preferences, *, explore=False):
        """Uniform while exploring or before any outcome (as `select`), else all mass on the best by `values`."""
        x, _ = self._check_inputs(contexts, preferences)
        if explore or not self.counts.any():
            return np.full((len(x), self.n_arms), 1.0 / self.n_arms)
        return super().arm_probabilities(contexts, preferences)

    def _means(self) -> tuple[np.ndarray, np.ndarray]:
        seen = self.counts > 0
        q = np.where(seen, self.score_sums / np.maximum(self.counts, 1), np.nan)
        c = np.where(seen, self.cost_sums / np.maximum(self.counts, 1), np.nan)
        return q, c

    def _params(self):
        return {"counts": self.counts.copy(), "score_sums": self.score_sums.copy(), "cost_sums": self.cost_sums.copy()}

    def _load_params(self, params):
        self.counts, self.score_sums, self.cost_sums = (
            params[k].astype(np.float64) for k in ("counts", "score_sums", "cost_sums")
        )


class RandomPolicy(_ArmMeans):
    """Uniform over the pool, whatever the context or preference."""

    name = "random"

    def values(self, contexts, preferences, *, explore=False):
        """Every arm alike (the choice is uniform)."""
        x, _ = self._check_inputs(contexts, preferences)
        return np.zeros((len(x), self.n_arms))

    def arm_probabilities(self, contexts, preferences, *, explore=False):
        x, _ = self._check_inputs(contexts, preferences)
        return np.full((len(x), self.n_arms), 1.0 / self.n_arms)

    def select(self, contexts, preferences, *, explore=False):
        x, _ = self._check_inputs(contexts, preferences)
        return self._uniform(len(x))


class CheapestPolicy(_ArmMeans):
    """Always the arm with the lowest observed mean cost."""

    name = "cheapest"

    def values(self, contexts, preferences, *, explore=False):
        """Minus the observed mean cost (-inf for an arm never observed)."""
        x, _ = self._check_inputs(contexts, preferences)
        _, c = self._means()
        return np.repeat(np.where(np.isnan(c), -np.inf, -c)[None, :], len(x), axis=0)

    def select(self, contexts, preferences, *, explore=False):
        x, _ = self._check_inputs(contexts, preferences)
        if explore or not self.counts.any():
            return self._uniform(len(x))
        _, c = self._means()
        return deterministic(np.full(len(x), int(np.nanargmin(c))), self.version)


class BestSinglePolicy(_ArmMeans):
    """The one arm with the highest mean reward for the caller's preference (context ignored)."""

    name = "best_single"

    def select(self, contexts, preferences, *, explore=False):
        x, p = self._check_inputs(contexts, preferences)
        if explore or not self.counts.any():
            return self._uniform(len(x))
        return deterministic(self.values(x, p).argmax(axis=1), self.version)

    def values(self, contexts, preferences, *, explore=False):
        """The mean reward w_q q_a - w_c min(c_a / tau, 1) of each arm's observed outcomes (-inf: never observed)."""
        _, p = self._check_inputs(contexts, preferences)
        q, c = self._means()
        value = p[:, :1] * q[None, :] - p[:, 1:] * normalised_cost(c, self.tau)[None, :]
        return np.where(np.isnan(value), -np.inf, value)
