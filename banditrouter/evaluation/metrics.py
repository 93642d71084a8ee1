"""Offline evaluation of routing policies on a logged test split (full table known).

For every preference on the grid w_cost = 0.0, 0.1, ..., 1.0 (w_quality = 1 - w_cost) a policy decides
greedily (explore=False) for every test prompt; we report the mean score of the chosen models
("accuracy"), their mean cost in USD per query, and the mean BaRP reward under the training log's tau.

AIQ is RouterBench's (Hu et al., 2024; `evaluation/AIQ.py` in withmartian/routerbench): take the
non-decreasing upper convex hull of a policy's (cost, accuracy) points, integrate it with the trapezoid rule
from the policy's *cheapest* point, extended flat to the right only, up to the largest cost compared (here
the dearest single model's mean cost on the test split, or the policy's own dearest point if that costs
more), and divide by that cost. Cost the policy never reaches on its cheap side earns nothing: a router
with a single dear point scores about 0. `aiq_range` keeps our earlier variant (the hull extended flat on
both sides over [cheapest, dearest single model], divided by that width), reported as `aiq_range`.
"""

from __future__ import annotations

import numpy as np

from banditrouter.data.log import RoutingLog
from banditrouter.policies.base import Policy
from banditrouter.reward import preference_grid, reward


def _chosen(log: RoutingLog, arms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(log))
    return log.scores[rows, arms], log.costs[rows, arms]


def point(log: RoutingLog, arms: np.ndarray, pref: np.ndarray, tau: float) -> dict[str, float]:
    """Missing score cells in the log are skipped in the means (they are unknown, not wrong)."""
    q, c = _chosen(log, arms)
    r = reward(q, c, np.tile(pref, (len(q), 1)), tau)
    return {
        "w_cost": float(round(pref[1], 10)),
        "accuracy": float(np.nanmean(q)),
        "cost": float(np.nanmean(c)),
        "reward": float(np.nanmean(r)),
    }


def evaluate_policy(
    policy: Policy, contexts: np.ndarray, log: RoutingLog, tau: float, grid: np.ndarray | None = None
) -> list[dict[str, float]]:
    grid = preference_grid() if grid is None else grid
    points = []
    for pref in grid:
        dec = policy.select(contexts, pref[None, :], explore=False)
        p = point(log, dec.arms, pref, tau)
        p["arm_share"] = {
            m: float(s) for m, s in zip(log.models, np.bincount(dec.arms, minlength=log.n_models) / len(log), strict=True)
        }
        points.append(p)
    return points


def oracle_arms(log: RoutingLog, pref: np.ndarray | None, tau: float) -> np.ndarray:
    """Per prompt, the model with the highest reward for `pref`; with pref=None, the highest score with
    ties broken by the lowest cost (RouterBench's oracle)."""
    s = np.where(np.isnan(log.scores), -np.inf, log.scores)
    c = np.where(np.isnan(log.costs), np.inf, log.costs)
    if pref is None:
        best = s.max(axis=1, keepdims=True)
        return np.where(s == best, c, np.inf).argmin(axis=1)
    with np.errstate(invalid="ignore"):  # 0 * -inf for a missing cell at an extreme preference
        r = reward(s, c, np.tile(pref, (len(log), 1)), tau)
    r = np.where(np.isfinite(r), r, -np.inf)
    # tie-break toward cheaper arms: argmax takes the first max, so order by cost first
    order = np.argsort(c, axis=1, kind="stable")
    return np.take_along_axis(order, np.take_along_axis(r, order, axis=1).argmax(axis=1)[:, None], axis=1)[:, 0]


def references(log: RoutingLog, tau: float, grid: np.ndarray | None = None) -> dict[str, dict]:
    grid = preference_grid() if grid is None else grid
    q, c = _chosen(log, oracle_arms(log, None, tau))
    refs: dict[str, dict] = {
        "oracle": {
            "accuracy": float(np.nanmean(q)),
            "cost": float(np.nanmean(c)),
            "points": [point(log, oracle_arms(log, pref, tau), pref, tau) for pref in grid],
        }
    }
    for m, st in log.single_model_stats().items():
        refs[f"single:{m}"] = st
    return refs


def cost_range(log: RoutingLog) -> tuple[float, float]:
    costs = [st["cost"] for st in log.single_model_stats().values()]
    return float(min(costs)), float(max(costs))


def upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-decreasing upper convex hull of (cost, quality) points, sorted by cost."""
    pts = sorted(set(points))
    # a point that costs more but scores no better than a cheaper one is dominated
    frontier: list[tuple[float, float]] = []
    for c, q in pts:
        if not frontier or q > frontier[-1][1]:
            frontier.append((c, q))
    hull: list[tuple[float, float]] = []
    for p in frontier:
        while len(hull) >= 2:
            (c1, q1), (c2, q2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the chord from hull[-2] to p
            if (q2 - q1) * (p[0] - c1) <= (p[1] - q1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def aiq(points: list[tuple[float, float]], c_max: float) -> float:
    """RouterBench's AIQ: trapezoid area under the non-decreasing convex hull from the policy's cheapest
    point to `c_max` (the hull held flat after its dearest point), divided by `c_max`."""
    if not points:
        return 0.0
    hull = upper_hull(points)
    c_max = max(float(c_max), hull[-1][0])
    if c_max <= 0:
        return float(hull[-1][1])
    xs = np.array([c for c, _ in hull] + [c_max])
    ys = np.array([q for _, q in hull] + [hull[-1][1]])
    return float(np.trapezoid(ys, xs) / c_max)


def aiq_range(points: list[tuple[float, float]], c_lo: float, c_hi: float) -> float:
    """Our earlier variant: the hull extended flat on both sides over [c_lo, c_hi], divided by the width.
    Kinder to routers with only dear points (they score their accuracy, not ~0); not RouterBench's number."""
    if not points:
        return 0.0
    if c_hi <= c_lo:
        return float(max(q for _, q in points))
    hull = upper_hull(points)
    xs = np.array([c for c, _ in hull])
    ys = np.array([q for _, q in hull])
    grid = np.linspace(c_lo, c_hi, 4001)
    vals = np.interp(grid, xs, ys, left=ys[0], right=ys[-1])  # flat outside the hull
    return float(np.trapezoid(vals, grid) / (c_hi - c_lo))


def policy_aiq(points: list[dict[str, float]], log: RoutingLog) -> float:
    """RouterBench's AIQ of a policy's grid points, up to the dearest single model of the pool."""
    return aiq([(p["cost"], p["accuracy"]) for p in points], cost_range(log)[1])


def policy_aiq_range(points: list[dict[str, float]], log: RoutingLog) -> float:
    return aiq_range([(p["cost"], p["accuracy"]) for p in points], *cost_range(log))
