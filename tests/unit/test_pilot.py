"""PILOT and its preference prior: the prior is learned (held-out pairwise accuracy), the policy starts at the
calibrated prior, learns like LinUCB on the chosen arm only, round-trips, keeps its prior on a cold copy, and
refuses bad settings. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
from factories import MODELS, decision, synthetic_problem

from banditrouter.pipeline import Split, train_one
from banditrouter.policies import BanditBatch, StateError, load_checkpoint, make_policy, save_checkpoint, untrained_like
from banditrouter.policies.pilot import PILOT, build_pilot
from banditrouter.prior import (
    PriorConfig,
    calibrate,
    mean_order_accuracy,
    pairwise_accuracy,
    preference_pairs,
    train_prior,
    untrained_prior,
)

DIM, ARMS, PRIOR_DIM = 16, 4, 8
FAST = {"prior_dim": PRIOR_DIM, "triplet_epochs": 5, "bt_epochs": 200}
"""A small prior: a second or two on the synthetic problem."""


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem(DIM, ARMS)


@pytest.fixture(scope="module")
def pilot(problem):
    x_tr, train, _, _, tau = problem
    return build_pilot(train, x_tr, tau, seed=0, **FAST)


def _pref(n, wq=1.0):
    return np.tile([wq, 1.0 - wq], (n, 1))


# -- the prior ------------------------------------------------------------------------------------------------
def test_preference_pairs_drop_ties_and_missing_cells():
    scores = np.array([[1.0, 0.0, np.nan], [0.5, 0.5, 1.0], [0.2, 0.2, 0.2]])
    rows, win, lose = preference_pairs(scores)
    assert sorted(zip(rows.tolist(), win.tolist(), lose.tolist(), strict=True)) == [(0, 0, 1), (1, 2, 0), (1, 2, 1)]


def test_calibration_recovers_an_affine_map():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, size=(50, 3))
    scores = 0.4 * cos + np.array([0.5, 0.45, 0.55])
    scores[3, 1] = np.nan  # a missing cell is left out of the fit
    scale, offset = calibrate(cos, scores)
    assert scale == pytest.approx(0.4) and np.allclose(offset, [0.5, 0.45, 0.55])
    scale, offset = calibrate(cos, 1.0 - scores)  # anti-correlated: scale floored at 0, the per-model means
    assert scale == 0.0 and np.allclose(offset, np.nanmean(1.0 - scores, axis=0))


def test_the_prior_is_learned(problem, pilot):
    """Held-out pairs: the trained prior orders ~0.99 right; chance, a random (untrained) prior and the
    context-free per-model mean order are all near 0.5 on this problem, whose winners depend on the context."""
    x_tr, train, x_te, test, _ = problem
    prior = pilot.prior
    trained = pairwise_accuracy(prior, test, x_te)
    random_prior = pairwise_accuracy(untrained_prior(train.models, DIM, PRIOR_DIM, seed=0), test, x_te, calibrated=False)
    context_free = mean_order_accuracy(train, test)
    assert trained > 0.85, trained
    assert trained > random_prior + 0.25, (trained, random_prior)
    assert trained > context_free + 0.25, (trained, context_free)
    assert pairwise_accuracy(prior, test, x_te, calibrated=False) > 0.85
    assert prior.trained and prior.meta["full_information"] and prior.meta["split"] == "train"
    assert prior.meta["bt_loss_last"] < prior.meta["bt_loss_first"]


def test_prior_training_is_seeded(problem):
    x_tr, train, _, _, tau = problem
    cfg = PriorConfig(dim=4, triplet_epochs=2, bt_epochs=20)
    a = train_prior(train.head(200), x_tr[:200], tau, config=cfg, seed=3)
    b = train_prior(train.head(200), x_tr[:200], tau, config=cfg, seed=3)
    for k, v in a.params().items():
        np.testing.assert_array_equal(v, b.params()[k], err_msg=k)


def test_pairwise_accuracy_refuses_what_it_cannot_measure(problem, pilot):
    _, _, x_te, test, _ = problem
    with pytest.raises(ValueError, match="contexts"):
        pairwise_accuracy(pilot.prior, test, x_te[:10])
    flat = test.head(5)
    object.__setattr__(flat, "scores", np.full_like(flat.scores, 0.5))
    with pytest.raises(ValueError, match="no preference pairs"):
        pairwise_accuracy(pilot.prior, flat, x_te[:5])


# -- the policy -----------------------------------------------------------------------------------------------
def test_policy_starts_at_the_calibrated_prior(problem, pilot):
    _, _, x_te, _, _ = problem
    np.testing.assert_allclose(pilot.predicted_scores(x_te), pilot.prior.predict(x_te), atol=1e-12)
    np.testing.assert_allclose(pilot.theta, pilot.prior.linear_weights(), atol=1e-12)
    np.testing.assert_allclose(pilot.values(x_te, _pref(1)), pilot.prior.predict(x_te), atol=1e-12)
    costs = pilot.expected_costs()
    np.testing.assert_allclose(costs, pilot.prior.cost_mean)  # no samples yet: the train log's mean
    v = pilot.values(x_te, _pref(1, 0.6))
    np.testing.assert_allclose(v, 0.6 * pilot.prior.predict(x_te) - 0.4 * costs, atol=1e-12)
    bonus = pilot.values(x_te, _pref(1), explore=True) - pilot.values(x_te, _pref(1))
    assert (bonus > 0).all()
    assert pilot.version == 0 and set(pilot.select(x_te, _pref(1), explore=True).propensities) == {1.0}


def test_update_moves_the_chosen_arm_only_as_linucb_does(problem, pilot):
    x_tr, train, _, _, tau = problem
    pol = untrained_like(pilot)
    rows = np.arange(12)
    batch = BanditBatch(
        contexts=x_tr[rows],
        preferences=_pref(12, 0.5),
        arms=np.full(12, 2),
        propensities=np.ones(12),
        scores=train.scores[rows, 2],
        costs=train.costs[rows, 2],
    )
    theta0 = pol.theta.copy()
    pol.update(batch)
    assert pol.version == 1
    others = [0, 1, 3]
    np.testing.assert_array_equal(pol.theta[others], theta0[others])
    assert np.abs(pol.theta[2] - theta0[2]).max() > 1e-3
    # the closed form: ridge around the prior, theta = (lambda I + X^T X)^-1 (lambda theta0 + X^T y)
    lam, X = pol.config.ridge, pol._phi(x_tr[rows])
    want = np.linalg.solve(lam * np.eye(X.shape[1]) + X.T @ X, lam * theta0[2] + X.T @ train.scores[rows, 2])
    np.testing.assert_allclose(pol.theta[2], want, atol=1e-9)
    assert pol.cost_count.tolist() == [0, 0, 12, 0]
    assert pol.expected_costs()[others] == pytest.approx(pilot.prior.cost_mean[others])


def test_the_prior_helps_online(problem, pilot):
    """On the held-out stream, greedy-with-bonus PILOT from the trained prior collects a higher mean score
    than the same policy from an untrained prior (what the prior buys early on)."""
    _, _, x_te, test, _ = problem
    cold = make_policy("pilot", test.models, DIM, pilot.tau, prior_dim=PRIOR_DIM)

    def online(pol):
        pol, got = untrained_like(pol), []
        for s in range(0, 200, 10):
            rows = np.arange(s, s + 10)
            arms = pol.select(x_te[rows], _pref(10), explore=True).arms
            pol.update(BanditBatch(x_te[rows], _pref(10), arms, np.ones(10), test.scores[rows, arms], test.costs[rows, arms]))
            got.append(test.scores[rows, arms])
        return float(np.concatenate(got).mean())

    warm, cold_score = online(pilot), online(cold)
    assert warm > cold_score + 0.1, (warm, cold_score)


def test_state_round_trips_and_loads_from_a_checkpoint(problem, pilot, tmp_path):
    x_tr, train, x_te, _, _ = problem
    pol = untrained_like(pilot)
    pol.update(
        BanditBatch(
            x_tr[:8],
            _pref(8),
            np.arange(8) % ARMS,
            np.ones(8),
            train.scores[np.arange(8), np.arange(8) % ARMS],
            train.costs[np.arange(8), np.arange(8) % ARMS],
        )
    )
    back = load_checkpoint(save_checkpoint(pol, tmp_path / "pilot.pt"))
    assert isinstance(back, PILOT) and back.version == pol.version and back.prior.meta == pol.prior.meta
    for pref in (_pref(1), _pref(1, 0.3)):
        np.testing.assert_allclose(back.values(x_te, pref, explore=True), pol.values(x_te, pref, explore=True), atol=1e-9)
    np.testing.assert_array_equal(back.prior.W, pol.prior.W)
    np.testing.assert_array_equal(back.cost_count, pol.cost_count)
    other = make_policy("pilot", pol.models, DIM, pol.tau, prior_dim=PRIOR_DIM)
    other.load_state_dict(pol.state_dict())
    other.load_training_state(*pol.training_state())
    np.testing.assert_allclose(other.values(x_te, _pref(1)), pol.values(x_te, _pref(1)), atol=1e-9)


def test_bad_states_are_refused_whole(problem, pilot):
    state = pilot.state_dict()
    target = make_policy("pilot", pilot.models, DIM, pilot.tau, prior_dim=PRIOR_DIM)
    before = target.theta.copy()
    bad = dict(state, params={**state["params"], "prior.theta": np.full_like(state["params"]["prior.theta"], np.nan)})
    with pytest.raises(StateError, match="non-finite"):
        target.load_state_dict(bad)
    with pytest.raises(StateError, match="scale"):
        target.load_state_dict(dict(state, params={**state["params"], "prior.scale": np.array([-1.0])}))
    with pytest.raises(StateError, match="prior arrays"):
        target.load_state_dict(dict(state, params={k: v for k, v in state["params"].items() if k != "prior.W"}))
    with pytest.raises(StateError):  # a 4-d prior into an 8-d policy
        make_policy("pilot", pilot.models, DIM, pilot.tau, prior_dim=4).load_state_dict(state)
    np.testing.assert_array_equal(target.theta, before)
    assert not target.prior.trained


def test_untrained_like_keeps_the_prior_and_resets_what_was_learned(problem, pilot):
    x_tr, train, _, _, _ = problem
    pol = untrained_like(pilot)
    pol.update(BanditBatch(x_tr[:8], _pref(8), np.zeros(8, int), np.ones(8), train.scores[:8, 0], train.costs[:8, 0]))
    cold = untrained_like(pol)
    assert cold.version == 0 and cold.prior is not pol.prior and cold.prior.meta == pilot.prior.meta
    for k, v in pilot.prior.params().items():
        np.testing.assert_array_equal(cold.prior.params()[k], v, err_msg=k)
    np.testing.assert_allclose(cold.theta, pilot.prior.linear_weights())
    assert cold.cost_count.sum() == 0 and pol.cost_count.sum() == 8
    cold.prior.W[:] = 0  # a copy: the trained policy's prior is not shared
    assert np.abs(pol.prior.W).sum() > 0


def test_bad_config_is_refused_with_a_clear_error(problem, pilot):
    x_tr, train, _, _, tau = problem
    models = train.models
    for bad, match in (
        ({"ridge": 0.0}, "ridge"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"prior_dim": 0}, "prior_dim"),
        ({"cost_prior_weight": -2}, "cost_prior_weight"),
        ({"gamma": 1.0}, "unknown pilot config fields"),
    ):
        with pytest.raises(ValueError, match=match):
            make_policy("pilot", models, DIM, tau, **bad)
    with pytest.raises(ValueError, match="features"):
        make_policy("pilot", models, DIM, tau, features=object())
    with pytest.raises(ValueError, match="ranks models"):
        PILOT(("a", "b", "c", "d"), DIM, tau, prior=pilot.prior)
    with pytest.raises(ValueError, match="prior is 8-d"):
        PILOT(models, DIM, tau, prior=pilot.prior, prior_dim=4)
    with pytest.raises(TypeError, match="PreferencePrior"):
        PILOT(models, DIM, tau, prior={"W": 1})
    for bad, match in (({"bt_epochs": -1}, "bt_epochs"), ({"margin": 0.0}, "margin"), ({"dim": 3}, "prior_dim")):
        with pytest.raises(ValueError, match=match):
            build_pilot(train.head(50), x_tr[:50], tau, **bad)
    with pytest.raises(ValueError, match="positive_min"):
        PriorConfig(positive_min=0.0, negative_max=0.2)
    with pytest.raises(ValueError, match="train split only"):
        train_prior(train.head(50), x_tr[:50], tau, split_name="test")
    with pytest.raises(ValueError, match="do not match"):
        train_prior(train.head(50), x_tr[:40], tau)


# -- where it is trained and learns ---------------------------------------------------------------------------
def test_train_one_builds_the_prior(problem, tmp_path):
    """`banditrouter train --policy pilot` goes through train_one: the prior is trained, no bandit epochs by
    default, and the checkpoint loads back as PILOT with its prior."""
    x_tr, train, _, _, _ = problem
    pol = train_one("pilot", Split(train.head(200), x_tr[:200]), progress=False, **FAST)
    assert isinstance(pol, PILOT) and pol.prior.trained and pol.version == 0
    back = load_checkpoint(save_checkpoint(pol, tmp_path / "p.pt"), expect="pilot")
    assert back.prior.trained and back.config == pol.config
    with pytest.raises(ValueError, match="features"):
        train_one("pilot", Split(train.head(50), x_tr[:50]), progress=False, features=object(), **FAST)


def test_the_learner_core_learns_pilot(tmp_path, rng):
    """The learner actor's core calls policy.update generically: decisions joined with feedback update PILOT,
    and a router installs the result on a cold shell that keeps the prior."""
    from learner.buffer import EventBuffer
    from learner.core import Learner, LearnerSettings, install

    buf = EventBuffer(tmp_path / "e.sqlite")
    for i in range(8):
        buf.append_decisions([decision(i, rng)])
        buf.add_feedback(f"d{i}", float(i % 3) / 2)
    pol = make_policy("pilot", MODELS, 8, tau=0.01, prior_dim=4)
    theta0 = pol.theta.copy()
    ln = Learner(pol, tmp_path / "learner", LearnerSettings(batch_size=4, max_wait_s=60))
    ln.consume(buf.log.read(0))
    ln.update()
    assert ln.policy.version == 1 and np.abs(ln.policy.theta - theta0).max() > 1e-3
    assert ln.policy.cost_count.sum() == 8
    routed = install(untrained_like(pol), ln.policy.state_dict())
    x = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(routed.values(x, _pref(5, 0.7)), ln.policy.values(x, _pref(5, 0.7)), atol=1e-12)
