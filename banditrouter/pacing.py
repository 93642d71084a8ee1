"""Budget pacing by online multi-choice knapsack: the ZCL threshold rule (PILOT, arXiv 2508.21141, as
summarised in ../shared/papers/ALGORITHMS.md), shared by `banditrouter budget-eval` (offline) and the live
router (per API key, `pacing: zcl`).

Per query, each arm a has a value v_a (the policy's value estimate: see `pace`) and a weight w_a (its estimated
cost in USD: `CostEstimator`). With z the fraction of the current bin's budget spent, the arms eligible are
those whose value-to-weight ratio reaches the threshold

    Psi(z) = (U * e / L) ** z * (L / e)                     Psi(0) = L / e < L,  Psi(1) = U

so at the start of a bin every arm with a ratio >= L/e is eligible, and as the bin's budget runs out only the
arms that buy the most value per dollar remain. The policy chooses among the eligible arms (its own rule,
restricted: `Policy.fallback_probabilities`); when none is eligible, the cheapest allowed arm serves [ours:
the paper's summary does not say].

Bins [summary]: the stream is split into N bins, each with budget B / N; what a bin leaves unspent rolls over
to the next (and what it overspends is taken from the next). Offline the bins are S queries each
(`CountBins`); live they are equal slices of the key's budget period (`TimeBins`): there the number of
queries is not known in advance, time is.

L and U [summary: the min / max value-to-weight ratios on tuning data]: `ratio_bounds` takes a low and a high
quantile (default 1% and 99%) of the positive ratios over a tuning set (the train split), which the extreme
min and max would let one outlier prompt set [ours].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_LU_QUANTILES = (0.01, 0.99)


def zcl_threshold(z: float | np.ndarray, L: float, U: float) -> float | np.ndarray:
    """Psi(z) = (U e / L)^z (L / e), with z clipped to [0, 1]."""
    check_bounds(L, U)
    z = np.clip(z, 0.0, 1.0)
    return (U * math.e / L) ** z * (L / math.e)


def check_bounds(L: float, U: float) -> None:
    if not (math.isfinite(L) and math.isfinite(U) and 0 < L <= U):
        raise ValueError(f"ZCL needs 0 < L <= U (finite), got L={L!r}, U={U!r}")


def ratios(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Value-to-weight ratios; a value <= 0 gives ratio 0 (never eligible), a weight <= 0 is floored at 1e-12."""
    v = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    return v / np.maximum(np.asarray(weights, dtype=np.float64), 1e-12)


def ratio_bounds(
    values: np.ndarray, weights: np.ndarray, quantiles: tuple[float, float] = DEFAULT_LU_QUANTILES
) -> tuple[float, float]:
    """(L, U): a low and a high quantile of the positive value-to-weight ratios over tuning data ((n, K) each)."""
    r = ratios(values, weights).ravel()
    r = r[np.isfinite(r) & (r > 0)]
    if r.size == 0:
        raise ValueError("no positive value-to-weight ratio in the tuning data: L and U cannot be estimated")
    lo, hi = (float(np.quantile(r, q)) for q in quantiles)
    return lo, max(hi, lo)


def eligible(
    values: np.ndarray, weights: np.ndarray, z: float, L: float, U: float, allowed: np.ndarray | None = None
) -> np.ndarray:
    """(K,) bool: allowed arms whose ratio reaches Psi(z)."""
    ok = ratios(values, weights) >= zcl_threshold(z, L, U) * (1 - 1e-12)
    return ok if allowed is None else ok & np.asarray(allowed, dtype=bool)


@dataclass(frozen=True)
class Paced:
    arm: int
    propensity: float
    """The probability this arm was served given the eligible set (the policy's own distribution renormalised
    over it; 1 for a deterministic choice or the cheapest-arm fallback)."""
    eligible: np.ndarray
    threshold: float
    fallback_cheapest: bool


def pace(
    policy,
    context: np.ndarray,
    preference: np.ndarray,
    weights: np.ndarray,
    z: float,
    L: float,
    U: float,
    *,
    allowed: np.ndarray | None = None,
    explore: bool = False,
    rng: np.random.Generator | None = None,
    optimistic: bool = False,
) -> Paced:
    """One paced decision for one query (`context` (d,), `preference` (2,)).

    Eligibility uses the policy's value estimate `policy.values(explore=False)` (BaRP: pi(a | x, w); the linear
    policies and PILOT: the predicted reward); the choice among eligible arms is the policy's own behaviour
    restricted to them (`fallback_probabilities`, which renormalises a stochastic policy's distribution and takes
    the best by value for a deterministic one). No eligible arm: the cheapest allowed arm (by weight).

    `optimistic=True` [ours]: eligibility uses `values(explore=True)` instead, the value a learning policy
    maximises (LinUCB, PILOT: the prediction plus the UCB bonus; BaRP: pi of its live parameters). A cold
    learner's greedy values are 0 for every arm it has not tried, so with greedy eligibility it could only ever
    fall back to the cheapest arm and never learn the others; `banditrouter budget-eval` paces learners online
    this way (evaluation/budget.py)."""
    x = np.asarray(context, dtype=np.float32)[None, :]
    p = np.asarray(preference, dtype=np.float64).reshape(1, 2)
    w = np.asarray(weights, dtype=np.float64)
    k = len(w)
    allow = np.ones(k, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if not allow.any():
        raise ValueError("no arm is allowed")
    values = policy.values(x, p, explore=optimistic)[0]
    ok = eligible(values, w, z, L, U, allow)
    threshold = float(zcl_threshold(z, L, U))
    if not ok.any():
        cheap = np.flatnonzero(allow)[int(np.argmin(w[allow]))]
        return Paced(int(cheap), 1.0, ok, threshold, True)
    if optimistic == explore and _deterministic(policy):
        # the same choice fallback_probabilities makes for a deterministic policy (the best eligible arm by the
        # values just computed, first index on ties), without computing the values twice more
        arm = int(np.flatnonzero(ok)[int(np.argmax(values[ok]))])
        return Paced(arm, 1.0, ok, threshold, False)
    probs = policy.fallback_probabilities(x, p, ok, explore=explore)[0]
    if probs.max() >= 1.0 - 1e-12:
        arm = int(probs.argmax())
    else:
        arm = int((rng or np.random.default_rng()).choice(k, p=probs / probs.sum()))
    return Paced(arm, float(probs[arm]), ok, threshold, False)


def _deterministic(policy) -> bool:
    """True when the policy keeps the base class's `arm_probabilities`: all mass on the argmax of `values`."""
    from banditrouter.policies.base import Policy

    return isinstance(policy, Policy) and type(policy).arm_probabilities is Policy.arm_probabilities


# ---------------------------------------------------------------------------------------------------------
# bins with rollover
# ---------------------------------------------------------------------------------------------------------
def bin_fraction_spent(budget: float, n_bins: int, bin_index: int, spent_at_bin_start: float, spent_now: float) -> float:
    """z for the current bin: spend in the bin over the bin's budget, where the bin's budget is its share
    B / N plus what earlier bins left (B * (i + 1) / N - spent at the bin's start). A bin whose budget is used up
    (or already overspent by earlier bins) has z = 1."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    i = min(max(int(bin_index), 0), n_bins - 1)
    bin_budget = budget * (i + 1) / n_bins - spent_at_bin_start
    if bin_budget <= 0:
        return 1.0
    return float(min(max((spent_now - spent_at_bin_start) / bin_budget, 0.0), 1.0))


class CountBins:
    """Offline: bins of `bin_size` queries over a stream of `n_queries` (N = ceil(n / S) bins)."""

    def __init__(self, budget: float, n_queries: int, bin_size: int):
        if budget < 0 or n_queries < 1 or bin_size < 1:
            raise ValueError("budget >= 0, n_queries >= 1 and bin_size >= 1 are required")
        self.budget = float(budget)
        self.bin_size = int(bin_size)
        self.n_bins = math.ceil(n_queries / bin_size)
        self.spent = 0.0
        self._bin = -1
        self._start = 0.0

    def z(self, query_index: int) -> float:
        """z before serving query `query_index` (0-based); call in stream order."""
        b = query_index // self.bin_size
        if b != self._bin:
            self._bin, self._start = b, self.spent
        return bin_fraction_spent(self.budget, self.n_bins, b, self._start, self.spent)

    def remaining(self) -> float:
        return self.budget - self.spent

    def charge(self, cost: float) -> None:
        self.spent += float(cost)


class TimeBins:
    """Live: the period [start, end) split into `n_bins` equal slices (bin of time t)."""

    def __init__(self, start: float, end: float, n_bins: int):
        if not end > start or n_bins < 1:
            raise ValueError("a period with end > start and n_bins >= 1 is required")
        self.start, self.end, self.n_bins = float(start), float(end), int(n_bins)

    def index(self, t: float) -> int:
        return min(max(int((t - self.start) / (self.end - self.start) * self.n_bins), 0), self.n_bins - 1)

    def bin_start(self, i: int) -> float:
        return self.start + (self.end - self.start) * i / self.n_bins


# ---------------------------------------------------------------------------------------------------------
# weights: estimated cost per (query, model)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostEstimator:
    """cost_a(x) = base_usd[a] + per_char_usd[a] * len(prompt chars): input tokens x input price (chars / 4 per
    token) + the model's average output tokens x output price, known before the model answers.

    `from_prices`: token-priced models (USD per million tokens, an average answer length). `fit`: a routing log
    without token counts (RouterBench: per-call cost only): per model, least squares of the logged cost on the
    prompt's length over the train split, slope and intercept floored at 0 (and the intercept at 1e-9 so that a
    weight is never 0) — the same two terms, read off the log."""

    models: tuple[str, ...]
    base_usd: np.ndarray
    per_char_usd: np.ndarray

    def __call__(self, prompt_chars: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """(K,) for one prompt length, (n, K) for several."""
        n = np.asarray(prompt_chars, dtype=np.float64)
        return self.base_usd + n[..., None] * self.per_char_usd

    @classmethod
    def from_prices(
        cls, prices: dict[str, tuple[float, float]], output_tokens: dict[str, float] | float, chars_per_token: float = 4.0
    ) -> CostEstimator:
        """`prices[model] = (input, output)` USD per million tokens; `output_tokens`: per model or one figure."""
        models = tuple(prices)
        out = {m: float(output_tokens[m] if isinstance(output_tokens, dict) else output_tokens) for m in models}
        base = np.array([max(out[m] * prices[m][1] / 1e6, 1e-9) for m in models])
        per_char = np.array([prices[m][0] / 1e6 / chars_per_token for m in models])
        return cls(models, base, per_char)

    @classmethod
    def fit(cls, log) -> CostEstimator:
        """Per model: cost ~ base + per_char * len(prompt) over the log's observed cells."""
        chars = np.array([len(p) for p in log.prompts], dtype=np.float64)
        base, slope = [], []
        for k in range(log.n_models):
            c = log.costs[:, k]
            ok = np.isfinite(c)
            if ok.sum() < 2 or np.ptp(chars[ok]) == 0:
                b, s = (float(np.nanmean(c)) if ok.any() else 0.0), 0.0
            else:
                s, b = np.polyfit(chars[ok], c[ok], 1)
                if s < 0:  # longer prompts never cost less: fall back to the mean
                    s, b = 0.0, float(c[ok].mean())
            base.append(max(float(b), 1e-9))
            slope.append(max(float(s), 0.0))
        return cls(tuple(log.models), np.array(base), np.array(slope))

    def to_dict(self) -> dict:
        return {"models": list(self.models), "base_usd": self.base_usd.tolist(), "per_char_usd": self.per_char_usd.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> CostEstimator:
        return cls(
            tuple(d["models"]), np.asarray(d["base_usd"], dtype=np.float64), np.asarray(d["per_char_usd"], dtype=np.float64)
        )
