"""Linear Thompson sampling (disjoint): draw theta~_a ~ N(theta_a, v^2 A_a^-1), choose argmax phi^T theta~_a.

Only phi^T theta~_a matters, which is N(phi^T theta_a, v^2 phi^T A_a^-1 phi) per arm: one scalar draw per
(row, arm) instead of a d-dimensional one. The propensity of the chosen arm is estimated by Monte Carlo
with `propensity_draws` more draws (counting the one that chose it, so it is never 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from banditrouter.policies.base import Decisions, deterministic
from banditrouter.policies.linear import DisjointLinear, LinearConfig


@dataclass(frozen=True)
class LinTSConfig(LinearConfig):
    v: float = 0.3
    """Posterior scale of the sampling distribution."""
    propensity_draws: int = 63
    """Extra draws used to estimate each decision's propensity."""


class LinTS(DisjointLinear):
    name = "lints"
    config_cls = LinTSConfig

    def select(self, contexts, preferences, *, explore=False):
        phi = self.features(contexts, preferences)
        mean = self.predict(phi)
        if not explore:
            return deterministic(mean.argmax(axis=1), self.version)
        sd = self.config.v * self.widths(phi)
        n, k = mean.shape
        arms = (mean + sd * self.rng.standard_normal((n, k))).argmax(axis=1)
        m = self.config.propensity_draws
        draws = (mean[:, None, :] + sd[:, None, :] * self.rng.standard_normal((n, m, k))).argmax(axis=2)
        wins = (draws == arms[:, None]).sum(axis=1)
        return Decisions(arms, (1.0 + wins) / (1.0 + m), self.version)
