from __future__ import annotations

import numpy as np
import pytest

from banditrouter.evaluation import aiq, oracle_arms, references, upper_hull
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


def test_aiq_known_area():
    # hull rises linearly 0.5 -> 1.0 over [1, 2], flat at 1.0 over [2, 3]: (0.75 + 1.0) / 2
    assert aiq([(1.0, 0.5), (2.0, 1.0)], 1.0, 3.0) == pytest.approx(0.875, abs=1e-4)
    # one point: flat everywhere
    assert aiq([(2.0, 0.6)], 1.0, 3.0) == pytest.approx(0.6)
    # adding a dominated point changes nothing; a better point raises it
    assert aiq([(1.0, 0.5), (2.0, 1.0), (2.5, 0.7)], 1.0, 3.0) == pytest.approx(0.875, abs=1e-4)
    assert aiq([(1.0, 0.7), (2.0, 1.0)], 1.0, 3.0) > 0.875


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
