"""LinUCB (disjoint): choose argmax_a phi^T theta_a + alpha * sqrt(phi^T A_a^-1 phi) (Li et al., 2010)."""

from __future__ import annotations

from dataclasses import dataclass

from banditrouter.policies.base import deterministic
from banditrouter.policies.linear import DisjointLinear, LinearConfig


@dataclass(frozen=True)
class LinUCBConfig(LinearConfig):
    alpha: float = 0.5
    """Width of the optimism bonus while learning (explore=True)."""


class LinUCB(DisjointLinear):
    name = "linucb"
    config_cls = LinUCBConfig

    def values(self, contexts, preferences, *, explore=False):
        """phi^T theta_a, plus the optimism bonus alpha * width while learning (what `select` maximises)."""
        phi = self.features(contexts, preferences)
        value = self.predict(phi)
        return value + self.config.alpha * self.widths(phi) if explore else value

    def select(self, contexts, preferences, *, explore=False):
        phi = self.features(contexts, preferences)
        value = self.predict(phi)
        if explore:
            value = value + self.config.alpha * self.widths(phi)
        # UCB is deterministic given the statistics: the chosen arm has propensity 1.
        return deterministic(value.argmax(axis=1), self.version)
