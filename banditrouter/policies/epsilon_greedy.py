"""epsilon-greedy over disjoint ridge regressions: a uniformly random arm with probability epsilon, else
the arm with the highest predicted reward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from banditrouter.policies.base import Decisions, deterministic
from banditrouter.policies.linear import DisjointLinear, LinearConfig


@dataclass(frozen=True)
class EpsilonGreedyConfig(LinearConfig):
    epsilon: float = 0.1
    """Probability of a uniformly random arm while learning."""


class EpsilonGreedy(DisjointLinear):
    name = "epsilon_greedy"
    config_cls = EpsilonGreedyConfig

    def arm_probabilities(self, contexts, preferences, *, explore=False):
        """While learning: 1 - eps + eps / K on the greedy arm, eps / K on each other."""
        greedy = super().arm_probabilities(contexts, preferences)
        if not explore:
            return greedy
        eps = self.config.epsilon
        return (1.0 - eps) * greedy + eps / self.n_arms

    def select(self, contexts, preferences, *, explore=False):
        phi = self.features(contexts, preferences)
        greedy = self.predict(phi).argmax(axis=1)
        if not explore:
            return deterministic(greedy, self.version)
        eps, k = self.config.epsilon, self.n_arms
        n = len(greedy)
        arms = np.where(self.rng.random(n) < eps, self.rng.integers(0, k, size=n), greedy)
        prop = np.where(arms == greedy, 1.0 - eps + eps / k, eps / k)
        return Decisions(arms, prop, self.version)
