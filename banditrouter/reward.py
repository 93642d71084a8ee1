"""The BaRP reward: r = w_q * q - w_c * c~, with c~ = min(c / tau, 1) (ALGORITHMS.md, BaRP).

`tau` is [ours]: by default the 95th percentile of per-call cost in the training log (`cost_scale`); it is
stored in every checkpoint so serving and evaluation use the scale the policy was trained with.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TAU_QUANTILE = 0.95


def normalised_cost(costs: np.ndarray, tau: float) -> np.ndarray:
    return np.minimum(np.asarray(costs, dtype=np.float64) / tau, 1.0)


def reward(scores: np.ndarray, costs: np.ndarray, preferences: np.ndarray, tau: float) -> np.ndarray:
    """Elementwise reward. `preferences` is (n, 2) = (w_quality, w_cost); scores/costs are (n,) or (n, K)."""
    p = np.asarray(preferences, dtype=np.float64)
    wq, wc = p[:, 0], p[:, 1]
    s, c = np.asarray(scores, dtype=np.float64), normalised_cost(costs, tau)
    if s.ndim == 2:
        wq, wc = wq[:, None], wc[:, None]
    return wq * s - wc * c


def cost_scale(costs: np.ndarray, quantile: float = DEFAULT_TAU_QUANTILE) -> float:
    """tau: a high quantile of per-call cost over every observed cell of a (training) log."""
    c = np.asarray(costs, dtype=np.float64)
    c = c[np.isfinite(c)]
    if c.size == 0:
        raise ValueError("cannot set the cost scale tau from a log with no observed costs")
    tau = float(np.quantile(c, quantile))
    return tau if tau > 0 else float(c.max() or 1.0)


def check_preferences(preferences: np.ndarray) -> np.ndarray:
    """(n, 2) non-negative, finite, not all zero; normalised onto the simplex."""
    p = np.asarray(preferences, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"preferences must have shape (n, 2) = (w_quality, w_cost), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("preference weights must be finite and non-negative")
    total = p.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("preference weights must not all be zero")
    return p / total


PREFERENCE_SAMPLERS = ("uniform", "arcsine")
DEFAULT_PREFERENCE_SAMPLER = "arcsine"


def sample_preferences(n: int, rng: np.random.Generator, kind: str = "uniform") -> np.ndarray:
    """Training preferences w = (1 - w_c, w_c) [ours]: "uniform" draws w_c ~ U(0, 1) (uniform on the
    simplex); "arcsine" draws w_c ~ Beta(1/2, 1/2), which puts more mass near both ends, where the best
    arm changes fastest with w when one model is far dearer than the rest."""
    if kind == "uniform":
        wc = rng.uniform(0.0, 1.0, size=n)
    elif kind == "arcsine":
        wc = rng.beta(0.5, 0.5, size=n)
    else:
        raise ValueError(f"unknown preference sampler {kind!r}; choose one of {PREFERENCE_SAMPLERS}")
    return np.column_stack([1.0 - wc, wc])


def preference_grid(n_points: int = 11) -> np.ndarray:
    wc = np.round(np.linspace(0.0, 1.0, n_points), 10)
    return np.column_stack([1.0 - wc, wc])
