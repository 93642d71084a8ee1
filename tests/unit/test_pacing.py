"""The ZCL knapsack rule (banditrouter.pacing), without Ray: the threshold's eligibility at z = 0 (every arm with
a value-to-weight ratio >= L/e) and z -> 1 (only ratio >= U), rollover across bins (underspend gives the next
bin more, overspend takes from it), `pace`'s fallback and allowed set, its optimistic value mode, and L, U and
the cost estimator read off a log."""

from __future__ import annotations

import math

import numpy as np
import pytest

from banditrouter.pacing import (
    CostEstimator,
    CountBins,
    bin_fraction_spent,
    eligible,
    pace,
    ratio_bounds,
    zcl_threshold,
)
from banditrouter.policies import BanditBatch, make_policy

L, U = 10.0, 1000.0
E = math.e


def _arms_with_ratios(r):
    """values 1 and weights 1 / r: arm a's value-to-weight ratio is r[a]."""
    r = np.asarray(r, dtype=np.float64)
    return np.ones(len(r)), 1.0 / r


def test_threshold_runs_from_L_over_e_to_U_and_rises():
    assert zcl_threshold(0.0, L, U) == pytest.approx(L / E)
    assert zcl_threshold(1.0, L, U) == pytest.approx(U)
    z = np.linspace(0, 1, 101)
    psi = zcl_threshold(z, L, U)
    assert (np.diff(psi) > 0).all()
    assert zcl_threshold(-0.5, L, U) == pytest.approx(L / E) and zcl_threshold(7.0, L, U) == pytest.approx(U)  # z clipped


def test_eligibility_at_z0_is_every_arm_with_ratio_at_least_L_over_e():
    r = [L / E * 0.999, L / E, L / E * 1.001, L, U, 5 * U]
    v, w = _arms_with_ratios(r)
    assert eligible(v, w, 0.0, L, U).tolist() == [False, True, True, True, True, True]


def test_eligibility_as_z_tends_to_1_is_only_ratio_at_least_U():
    r = [L, U / 2, U * 0.999, U, 2 * U]
    v, w = _arms_with_ratios(r)
    assert eligible(v, w, 1.0, L, U).tolist() == [False, False, False, True, True]
    near = eligible(v, w, 1.0 - 1e-9, L, U)
    assert near.tolist() == [False, False, False, True, True]
    # in between, the set shrinks as z grows and what is eligible is exactly ratio >= Psi(z)
    for z in np.linspace(0, 1, 21):
        assert (eligible(v, w, z, L, U) == (np.asarray(r) >= zcl_threshold(z, L, U) * (1 - 1e-12))).all()


def test_non_positive_values_are_never_eligible():
    assert not eligible(np.array([0.0, -1.0]), np.array([1e-9, 1e-9]), 0.0, L, U).any()


@pytest.mark.parametrize("bad", [(0.0, 1.0), (2.0, 1.0), (-1.0, 3.0), (1.0, float("inf")), (float("nan"), 1.0)])
def test_bad_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="0 < L <= U"):
        zcl_threshold(0.5, *bad)


# ---------------------------------------------------------------------------------------------------------
# bins with rollover
# ---------------------------------------------------------------------------------------------------------
def test_underspent_bin_rolls_over_to_the_next():
    # budget 100 over 40 queries in bins of 10: 4 bins of 25
    bins = CountBins(100.0, 40, 10)
    assert bins.n_bins == 4
    for i in range(10):
        bins.z(i)
        bins.charge(0.5)  # bin 0 spends 5 of its 25
    assert bins.z(10) == 0.0
    bins.charge(9.0)
    # bin 1's budget: its 25 plus the 20 bin 0 left = 45; 9 spent -> z = 0.2 (without rollover: 9 / 25 = 0.36)
    assert bins.z(11) == pytest.approx(9.0 / 45.0)


def test_overspent_bin_takes_from_the_next():
    bins = CountBins(100.0, 40, 10)
    bins.z(0)
    bins.charge(35.0)  # bin 0 spends 35 of its 25
    assert bins.z(9) == 1.0  # clipped
    bins.z(10)
    bins.charge(3.0)
    assert bins.z(11) == pytest.approx(3.0 / 15.0)  # bin 1 has 25 - 10 = 15
    # a bin whose whole share earlier bins already took has z = 1 from its first query
    assert bin_fraction_spent(100.0, 4, 1, spent_at_bin_start=60.0, spent_now=60.0) == 1.0


def test_last_bin_gets_everything_left_and_z_is_clipped():
    assert bin_fraction_spent(100.0, 4, 3, spent_at_bin_start=40.0, spent_now=70.0) == pytest.approx(0.5)
    assert bin_fraction_spent(100.0, 4, 9, spent_at_bin_start=40.0, spent_now=70.0) == pytest.approx(0.5)  # index clipped
    assert bin_fraction_spent(100.0, 4, 0, spent_at_bin_start=0.0, spent_now=80.0) == 1.0
    with pytest.raises(ValueError):
        bin_fraction_spent(100.0, 0, 0, 0.0, 0.0)
    with pytest.raises(ValueError):
        CountBins(-1.0, 10, 5)


# ---------------------------------------------------------------------------------------------------------
# pace
# ---------------------------------------------------------------------------------------------------------
def _trained_linucb(seed=0, d=6, k=4, n=300):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    pol = make_policy("linucb", [f"m{a}" for a in range(k)], d, 0.01, seed=seed)
    arms = rng.integers(0, k, size=n)
    scores = (rng.random(n) < 0.2 + 0.2 * arms).astype(float)  # dearer arms answer better
    pol.update(BanditBatch(x, np.tile([1.0, 0.0], (n, 1)), arms, np.ones(n), scores, np.full(n, 1e-3)))
    return pol, x


def test_pace_falls_back_to_the_cheapest_allowed_arm_when_nothing_is_eligible():
    pol, x = _trained_linucb()
    w = np.array([1e-3, 1e-4, 5e-3, 2e-2])
    d = pace(pol, x[0], np.array([1.0, 0.0]), w, 1.0, 1e9, 1e9)  # threshold above every ratio
    assert d.fallback_cheapest and d.arm == 1 and not d.eligible.any() and d.propensity == 1.0
    d = pace(pol, x[0], np.array([1.0, 0.0]), w, 1.0, 1e9, 1e9, allowed=np.array([True, False, True, True]))
    assert d.fallback_cheapest and d.arm == 0
    with pytest.raises(ValueError, match="no arm is allowed"):
        pace(pol, x[0], np.array([1.0, 0.0]), w, 0.0, L, U, allowed=np.zeros(4, dtype=bool))


@pytest.mark.parametrize("optimistic", [False, True])
def test_pace_serves_the_best_eligible_arm_as_fallback_probabilities_would(optimistic):
    pol, x = _trained_linucb()
    rng = np.random.default_rng(1)
    pref = np.array([[1.0, 0.0]])
    for i in range(60):
        w = 10 ** rng.uniform(-5, -2, size=4)
        allowed = rng.random(4) < 0.8
        allowed[rng.integers(4)] = True
        z = float(rng.random())
        d = pace(pol, x[i], pref[0], w, z, 5.0, 5e4, allowed=allowed, explore=optimistic, optimistic=optimistic)
        assert allowed[d.arm]
        if d.fallback_cheapest:
            assert not d.eligible.any()
            continue
        assert d.eligible[d.arm]
        expected = pol.fallback_probabilities(x[i : i + 1], pref, d.eligible, explore=optimistic)[0]
        assert d.arm == int(expected.argmax()) and expected.max() == 1.0


def test_optimistic_values_let_a_cold_learner_reach_untried_arms():
    """A cold LinUCB predicts 0 for every arm: with greedy eligibility nothing is ever eligible (always the
    cheapest arm); with optimistic eligibility its UCB bonus makes the arms eligible."""
    pol = make_policy("linucb", ["a", "b", "c"], 4, 0.01)
    x = np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    w = np.array([1e-3, 1e-4, 1e-2])
    greedy = pace(pol, x, np.array([1.0, 0.0]), w, 0.0, 1.0, 100.0)
    assert greedy.fallback_cheapest and greedy.arm == 1
    opt = pace(pol, x, np.array([1.0, 0.0]), w, 0.0, 1.0, 100.0, explore=True, optimistic=True)
    assert not opt.fallback_cheapest and opt.eligible.all()


def test_pace_with_a_stochastic_policy_draws_from_its_distribution_over_the_eligible_arms():
    pytest.importorskip("torch")
    pol = make_policy("barp", ["a", "b", "c"], 4, 0.01, seed=0)
    x = np.array([0.5, -0.5, 0.5, 0.5], dtype=np.float32)
    w = np.array([1e-3, 1e-3, 1e-3])
    rng = np.random.default_rng(0)
    arms = [pace(pol, x, np.array([1.0, 0.0]), w, 0.0, 1.0, 10.0, explore=True, rng=rng, optimistic=True) for _ in range(300)]
    probs = pol.arm_probabilities(x[None], np.array([[1.0, 0.0]]), explore=True)[0]
    counts = np.bincount([d.arm for d in arms], minlength=3) / 300
    assert np.abs(counts - probs).max() < 0.1
    assert all(d.propensity == pytest.approx(probs[d.arm]) for d in arms)


# ---------------------------------------------------------------------------------------------------------
# L, U and the weights
# ---------------------------------------------------------------------------------------------------------
def test_ratio_bounds_are_quantiles_of_the_positive_ratios():
    values = np.array([[1.0, 2.0, 0.0], [4.0, -1.0, 8.0]])
    weights = np.ones((2, 3))
    lo, hi = ratio_bounds(values, weights, (0.0, 1.0))
    assert (lo, hi) == (1.0, 8.0)  # 0 and -1 are not positive ratios
    lo, hi = ratio_bounds(values, weights, (0.5, 0.5))
    assert lo == hi == pytest.approx(np.quantile([1.0, 2.0, 4.0, 8.0], 0.5))
    with pytest.raises(ValueError, match="no positive value-to-weight ratio"):
        ratio_bounds(np.zeros((3, 2)), np.ones((3, 2)))


def test_cost_estimator_fit_recovers_base_and_per_char_cost():
    from banditrouter.data.log import RoutingLog

    rng = np.random.default_rng(0)
    n = 200
    prompts = tuple("x" * int(c) for c in rng.integers(10, 2000, size=n))
    chars = np.array([len(p) for p in prompts], dtype=float)
    base, slope = np.array([1e-4, 2e-3]), np.array([1e-7, 3e-6])
    costs = base + chars[:, None] * slope
    log = RoutingLog("t", tuple(map(str, range(n))), prompts, ("a", "b"), np.full((n, 2), 0.5), costs)
    est = CostEstimator.fit(log)
    np.testing.assert_allclose(est.base_usd, base, rtol=1e-6)
    np.testing.assert_allclose(est.per_char_usd, slope, rtol=1e-6)
    np.testing.assert_allclose(est([100, 1000]), base + np.array([[100.0], [1000.0]]) * slope, rtol=1e-6)
    assert CostEstimator.from_dict(est.to_dict()).models == ("a", "b")
