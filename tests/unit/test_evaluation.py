from __future__ import annotations

import numpy as np
import pytest

from banditrouter.evaluation import aiq, aiq_range, oracle_arms, references, upper_hull
from banditrouter.reward import cost_scale, normalised_cost, preference_grid, reward
from banditrouter.synthetic import make_synthetic


def test_reward_formula():
    r = reward(np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.5, 4.0]), np.array([[0.7, 0.3]] * 3), tau=2.0)
    np.testing.assert_allclose(r, [0.7 - 0.3 * 0.25, -0.3 * 0.25, 0.7 - 0.3 * 1.0])
    assert normalised_cost(np.array([10.0]), 2.0)[0] == 1.0
    assert cost_scale(np.array([[1.0, np.nan], [2.0, 3.0]]), 0.5) == 2.0
    g = preference_grid()
    assert len(g) == 11 and g[0].tolist() == [1.0, 0.0] and g[-1].tolist() == [0.0, 1.0]


def test_upper_hull_drops_dominated_and_concave_points():
    pts = [(1.0, 0.5), (1.5, 0.55), (2.0, 1.0), (3.0, 0.9), (2.5, 1.0)]
    assert upper_hull(pts) == [(1.0, 0.5), (2.0, 1.0)]


def test_aiq_is_routerbenchs():
    """RouterBench's definition (evaluation/AIQ.py): trapezoid area under the hull from the policy's cheapest
    point, flat to the right only up to c_max, divided by c_max. Hand-computed fixtures."""
    # rises 0.5 -> 0.9 over [0.2, 0.6] (area 0.28), flat at 0.9 over [0.6, 1.0] (0.36): 0.64 / 1
    assert aiq([(0.2, 0.5), (0.6, 0.9)], 1.0) == pytest.approx(0.64)
    # a point under the chord (0.4, 0.55) and a dominated dearer one (0.8, 0.85) change nothing
    assert aiq([(0.2, 0.5), (0.4, 0.55), (0.6, 0.9), (0.8, 0.85)], 1.0) == pytest.approx(0.64)
    # c_max = 2: 0.5 * (0.6 + 0.8) / 2 = 0.35 over [0.5, 1], then 0.8 over [1, 2]: (0.35 + 0.8) / 2
    assert aiq([(0.5, 0.6), (1.0, 0.8)], 2.0) == pytest.approx(0.575)
    # a router with only a dear point earns nothing left of it: ~0, not its accuracy (issue 9)
    assert aiq([(1.0, 0.8)], 1.0) == pytest.approx(0.0)
    assert aiq([(0.9, 0.8)], 1.0) == pytest.approx(0.1 * 0.8)
    # a point dearer than c_max extends the range to it: 1.5 * (0.5 + 1.0) / 2 over [0.5, 2], / 2
    assert aiq([(0.5, 0.5), (2.0, 1.0)], 1.0) == pytest.approx(0.5625)


def test_aiq_range_variant_known_area():
    # hull rises linearly 0.5 -> 1.0 over [1, 2], flat at 1.0 over [2, 3]: (0.75 + 1.0) / 2
    assert aiq_range([(1.0, 0.5), (2.0, 1.0)], 1.0, 3.0) == pytest.approx(0.875, abs=1e-4)
    # one point: flat everywhere (this variant's kindness to a dear-only router)
    assert aiq_range([(2.0, 0.6)], 1.0, 3.0) == pytest.approx(0.6)
    assert aiq_range([(1.0, 0.5), (2.0, 1.0), (2.5, 0.7)], 1.0, 3.0) == pytest.approx(0.875, abs=1e-4)
    assert aiq_range([(1.0, 0.7), (2.0, 1.0)], 1.0, 3.0) > 0.875


def test_oracle_dominates_single_models():
    _, log = make_synthetic(n=300, n_arms=5, noisy=True)
    tau = cost_scale(log.costs)
    refs = references(log, tau)
    singles = [v for k, v in refs.items() if k.startswith("single:")]
    assert refs["oracle"]["accuracy"] >= max(s["accuracy"] for s in singles)
    for p in refs["oracle"]["points"]:
        arms = oracle_arms(log, np.array([1 - p["w_cost"], p["w_cost"]]), tau)
        best = reward(log.scores, log.costs, np.tile([1 - p["w_cost"], p["w_cost"]], (len(log), 1)), tau).max(axis=1)
        chosen = reward(
            log.scores[np.arange(len(log)), arms],
            log.costs[np.arange(len(log)), arms],
            np.tile([1 - p["w_cost"], p["w_cost"]], (len(log), 1)),
            tau,
        )
        np.testing.assert_allclose(chosen, best)
    # RouterBench's oracle: the cheapest of the models that score best
    arms = oracle_arms(log, None, tau)
    i = int(np.argmax((log.scores == log.scores.max(axis=1, keepdims=True)).sum(axis=1)))
    tied = np.flatnonzero(log.scores[i] == log.scores[i].max())
    assert arms[i] == tied[np.argmin(log.costs[i, tied])]


def test_preference_samplers():
    from banditrouter.reward import sample_preferences

    rng = np.random.default_rng(0)
    for kind in ("uniform", "arcsine"):
        w = sample_preferences(20000, rng, kind)
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
        assert (w >= 0).all() and abs(w[:, 1].mean() - 0.5) < 0.02
    ends = lambda w: np.mean((w[:, 1] < 0.1) | (w[:, 1] > 0.9))  # noqa: E731
    assert ends(sample_preferences(20000, rng, "arcsine")) > 1.5 * ends(sample_preferences(20000, rng, "uniform"))
    with pytest.raises(ValueError, match="unknown preference sampler"):
        sample_preferences(3, rng, "gaussian")
