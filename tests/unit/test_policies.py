"""Each policy learns on a synthetic problem whose best arm depends on the context; bandit training never
reads an unchosen outcome; checkpoints round-trip and reject what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
from factories import synthetic_problem

from banditrouter.evaluation import evaluate_policy
from banditrouter.policies import POLICIES, BanditBatch, StateError, load_checkpoint, make_policy, save_checkpoint
from banditrouter.training import BanditFeedback, train_bandit, train_policy

DIM, ARMS = 16, 4
EPOCHS = {"barp": 12, "supervised": 8}
CONTEXTUAL = ["barp", "linucb", "lints", "epsilon_greedy", "supervised"]


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem(DIM, ARMS)


_TRAINED: dict[str, object] = {}


def _trained(name, problem):
    """Trained once per module (the problem fixture is module-scoped and seeded)."""
    if name not in _TRAINED:
        x_tr, train, _, _, tau = problem
        pol = make_policy(name, train.models, DIM, tau, seed=0)
        train_policy(pol, x_tr, train, epochs=EPOCHS.get(name, 3), seed=0)
        _TRAINED[name] = pol
    return _TRAINED[name]


def _mean_reward(pol, problem) -> float:
    _, _, x_te, test, tau = problem
    return float(np.mean([p["reward"] for p in evaluate_policy(pol, x_te, test, tau)]))


@pytest.fixture(scope="module")
def baselines(problem):
    return {name: _mean_reward(_trained(name, problem), problem) for name in ("random", "best_single")}


@pytest.mark.parametrize("name", CONTEXTUAL)
def test_contextual_policy_learns(name, problem, baselines):
    """Held-out mean reward over the w grid: random ~0.05, best single arm ~0.20, learned ~0.28."""
    pol = _trained(name, problem)
    r = _mean_reward(pol, problem)
    assert r > baselines["random"] + 0.15, (name, r, baselines)
    assert r > baselines["best_single"] + 0.04, f"{name} does not use the context: {r} vs {baselines}"
    assert pol.version > 0


def test_untrained_barp_is_no_better_than_best_single(problem, baselines):
    """Guards the test above: without training the same network does not clear the bar."""
    _, train, _, _, tau = problem
    assert _mean_reward(make_policy("barp", train.models, DIM, tau), problem) < baselines["best_single"] + 0.04


def test_static_baselines(problem, baselines):
    _, train, x_te, _, _ = problem
    assert baselines["best_single"] > baselines["random"] + 0.08
    cheapest = _trained("cheapest", problem)
    arms = cheapest.select(x_te, np.array([[1.0, 0.0]])).arms
    assert (arms == np.nanargmin(train.costs.mean(axis=0))).all()


# -- bandit feedback only -------------------------------------------------------------------------------------
class SpyFeedback(BanditFeedback):
    def __init__(self, log):
        super().__init__(log)
        self.seen: set[tuple[int, int]] = set()

    def reveal(self, rows, arms):
        self.seen.update(zip(rows.tolist(), arms.tolist(), strict=True))
        return super().reveal(rows, arms)


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "supervised"])
def test_no_leakage_of_unchosen_outcomes(name, problem):
    """Training with every unchosen outcome replaced by NaN gives the very same parameters."""
    x_tr, train, _, _, tau = problem
    x_tr, train = x_tr[:300], train.head(300)
    full = make_policy(name, train.models, DIM, tau, seed=3)
    spy = SpyFeedback(train)
    train_bandit(full, x_tr, spy, epochs=2, seed=3)
    chosen = np.zeros(train.scores.shape, dtype=bool)
    rows, arms = zip(*spy.seen, strict=True)
    chosen[list(rows), list(arms)] = True
    assert 0 < chosen.mean() < 1
    masked = train.subset(np.arange(len(train)))
    object.__setattr__(masked, "scores", np.where(chosen, train.scores, np.nan))
    object.__setattr__(masked, "costs", np.where(chosen, train.costs, np.nan))
    blind = make_policy(name, train.models, DIM, tau, seed=3)
    train_bandit(blind, x_tr, BanditFeedback(masked), epochs=2, seed=3)
    a, b = full.state_dict()["params"], blind.state_dict()["params"]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}.{k} depends on an unchosen outcome")


def test_missing_chosen_cell_yields_no_sample(problem):
    x_tr, train, _, _, tau = problem
    log = train.head(64)
    object.__setattr__(log, "scores", np.full_like(log.scores, np.nan))
    pol = make_policy("linucb", log.models, DIM, tau)
    train_bandit(pol, x_tr[:64], BanditFeedback(log), epochs=1)
    assert pol.version == 0


# -- decisions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(POLICIES))
def test_decisions_carry_arm_propensity_version(name, problem):
    pol = _trained(name, problem) if name in ("barp", "supervised") else make_policy(name, problem[1].models, DIM, problem[4])
    x = problem[2][:50]
    for explore in (False, True):
        d = pol.select(x, np.array([[0.6, 0.4]]), explore=explore)
        assert d.arms.shape == (50,) and ((d.arms >= 0) & (d.arms < ARMS)).all()
        assert ((d.propensities > 0) & (d.propensities <= 1)).all()
        assert d.policy_version == pol.version
        assert d[0].arm == d.arms[0]


def test_barp_propensity_is_the_sampling_probability(problem):
    pol = _trained("barp", problem)
    x, pref = problem[2][:20], np.array([[0.5, 0.5]])
    d = pol.select(x, pref, explore=True)
    probs = pol.probabilities(x, pref)
    np.testing.assert_allclose(d.propensities, probs[np.arange(20), d.arms], rtol=1e-6)


def test_epsilon_greedy_propensities(problem):
    pol = make_policy("epsilon_greedy", problem[1].models, DIM, problem[4], epsilon=0.2)
    d = pol.select(problem[2][:200], np.array([[1.0, 0.0]]), explore=True)
    assert set(np.round(d.propensities, 6)) <= {round(0.8 + 0.2 / ARMS, 6), round(0.2 / ARMS, 6)}


def test_lints_propensity_estimate(problem):
    """The propensity matches the empirical choice frequency of the sampler."""
    pol = _trained("lints", problem)
    x = np.repeat(problem[2][:1], 4000, axis=0)
    d = pol.select(x, np.array([[0.5, 0.5]]), explore=True)
    freq = np.bincount(d.arms, minlength=ARMS) / len(x)
    est = np.array([d.propensities[d.arms == a].mean() if (d.arms == a).any() else 0 for a in range(ARMS)])
    np.testing.assert_allclose(est, freq, atol=0.05)


def test_lints_propensities_are_exact():
    """Known answers: with two arms P(a) = Phi((m_a - m_b) / sqrt(s_a^2 + s_b^2)); with equal arms 1/K. The
    old estimate (1 + wins) / (1 + m) counted the winning draw, so it was biased up and never below 1/64."""
    from scipy.stats import norm

    pol = make_policy("lints", ("a", "b"), 4, tau=0.01, v=1.0, seed=3)
    mean, sd = np.array([0.3, -0.5]), np.array([0.4, 0.25])
    pol.predict = lambda phi: np.tile(mean, (len(phi), 1))
    pol.widths = lambda phi: np.tile(sd, (len(phi), 1))
    d = pol.select(np.zeros((2000, 4), np.float32), np.array([[0.5, 0.5]]), explore=True)
    p_a = norm.cdf((mean[0] - mean[1]) / np.hypot(*sd))
    np.testing.assert_allclose(d.propensities, np.where(d.arms == 0, p_a, 1 - p_a), rtol=1e-6)
    assert abs((d.arms == 0).mean() - p_a) < 0.03

    from banditrouter.policies.lints import argmax_probability

    k = 5
    eq = argmax_probability(np.zeros((k, k)), np.ones((k, k)), np.arange(k))
    np.testing.assert_allclose(eq, 1 / k, rtol=1e-6)
    # a rarely chosen arm: exact probability far below the old floor of 1/64, checked by Monte Carlo
    m, s = np.array([[0.0, 0.0, -2.5]]), np.array([[1.0, 0.5, 0.5]])
    exact = argmax_probability(m, s, np.array([2]))[0]
    draws = m + s * np.random.default_rng(0).standard_normal((2_000_000, 3))
    mc = (draws.argmax(axis=1) == 2).mean()
    assert exact < 1 / 64 and abs(exact - mc) < 4 * np.sqrt(mc / 2_000_000) + 1e-5


@pytest.mark.parametrize("ratio", [1, 10, 100])
def test_lints_propensities_sum_to_one_whatever_the_widths(ratio):
    """An arm pulled 100x more often than another has a 10x narrower posterior: the propensities of all arms
    must still sum to 1, and match Monte Carlo, with widths that differ by 10-100x."""
    from banditrouter.policies.lints import argmax_probability

    rng = np.random.default_rng(ratio)
    k, n = 5, 40
    mean = rng.normal(scale=0.3, size=(n, k))
    sd = np.full((n, k), 0.05)
    sd[:, 0] *= ratio  # one wide arm among narrow ones
    total = sum(argmax_probability(mean, sd, np.full(n, a)) for a in range(k))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    m, s = np.array([[0.0, 0.1, 0.2]]), np.array([[1.0, 0.01, 0.01]])
    draws = m + s * np.random.default_rng(1).standard_normal((1_000_000, 3))
    mc = (draws.argmax(axis=1) == 0).mean()
    assert abs(argmax_probability(m, s, np.array([0]))[0] - mc) < 4 * np.sqrt(mc * (1 - mc) / 1_000_000)


def test_bad_inputs_are_refused(problem):
    pol = make_policy("barp", problem[1].models, DIM, problem[4])
    x = problem[2][:3]
    for bad in ([[np.nan, 1.0]], [[-1.0, 1.0]], [[0.0, 0.0]], [[1.0, 0.0, 0.0]]):
        with pytest.raises(ValueError):
            pol.select(x, np.array(bad))
    with pytest.raises(ValueError, match="contexts"):
        pol.select(x[:, :5], np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="propensities"):
        BanditBatch(x, np.ones((3, 2)) / 2, np.zeros(3, int), np.zeros(3), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        BanditBatch(x, np.ones((3, 2)) / 2, np.zeros(3, int), np.ones(3), np.array([1, np.nan, 1]), np.ones(3))


# -- checkpoints ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(POLICIES))
def test_checkpoint_roundtrip(name, problem, tmp_path):
    pol = _trained(name, problem)
    path = save_checkpoint(pol, tmp_path / f"{name}.pt")
    back = load_checkpoint(path)
    assert (back.name, back.models, back.tau, back.version) == (pol.name, pol.models, pol.tau, pol.version)
    x, pref = problem[2][:100], np.array([[0.7, 0.3]])
    if name != "random":
        np.testing.assert_array_equal(back.select(x, pref).arms, pol.select(x, pref).arms)


def test_checkpoint_rejects_what_does_not_fit(problem, tmp_path):
    pol = _trained("linucb", problem)
    state = pol.state_dict()
    other = make_policy("linucb", problem[1].models, DIM, problem[4])
    bad = dict(state, params={**state["params"], "b": np.full_like(state["params"]["b"], np.nan)})
    with pytest.raises(StateError, match="non-finite"):
        other.load_state_dict(bad)
    with pytest.raises(StateError, match="shape"):
        other.load_state_dict(dict(state, params={**state["params"], "b": state["params"]["b"][:, :3]}))
    with pytest.raises(StateError, match="models"):
        other.load_state_dict(dict(state, models=["x", "y", "z", "w"]))
    with pytest.raises(StateError, match="policy"):
        make_policy("lints", problem[1].models, DIM, problem[4]).load_state_dict(state)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(StateError):
        load_checkpoint(junk)
    assert other.version == 0, "a refused state leaves the policy as it was"


def test_barp_paper_configuration_learns(problem, baselines):
    """The paper's exact recipe (one batch-mean baseline, no averaging, uniform preferences) learns too."""
    x_tr, train, _, _, tau = problem
    pol = make_policy("barp", train.models, DIM, tau, seed=0, baseline="batch_mean", ema_decay=0.0)
    train_policy(pol, x_tr, train, epochs=EPOCHS["barp"], seed=0, preference_sampler="uniform")
    assert _mean_reward(pol, problem) > baselines["best_single"] + 0.04
    with pytest.raises(ValueError, match="unknown baseline"):
        make_policy("barp", train.models, DIM, tau, baseline="median")


@pytest.mark.parametrize("baseline", ["batch_mean", "preference_batch_mean"])
def test_barp_single_sample_update_moves_toward_the_rewarded_arm(baseline):
    """A batch of one (low traffic, max_wait_s elapsed): with beta = 0 the update must change the
    parameters and raise pi(a) of the rewarded arm. A baseline that includes the sample's own reward makes
    the advantage exactly 0 here, so nothing moves (issue 9)."""
    from banditrouter.policies.base import BanditBatch

    pol = make_policy("barp", ("a", "b", "c"), 8, tau=0.01, seed=0, entropy_beta=0.0, ema_decay=0.0, baseline=baseline)
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    w = np.array([[1.0, 0.0]])
    before = pol.probabilities(x, w)[0, 1]
    params = {k: v.copy() for k, v in pol.state_dict()["params"].items()}
    batch = BanditBatch(x, w, np.array([1]), np.array([before]), np.array([1.0]), np.array([0.0]))
    pol.update(batch)
    assert any(not np.allclose(v, pol.state_dict()["params"][k]) for k, v in params.items())
    assert pol.probabilities(x, w)[0, 1] > before


@pytest.mark.parametrize("baseline", ["batch_mean", "preference_batch_mean"])
def test_barp_baseline_leaves_each_sample_out(baseline):
    """b_i must not depend on sample i's own outcome (else the advantage is not action-independent)."""
    import torch

    from banditrouter.policies.base import BanditBatch

    pol = make_policy("barp", ("a", "b"), 4, tau=0.01, baseline=baseline)
    rng = np.random.default_rng(0)
    n = 6
    w = np.tile([0.6, 0.4], (n, 1))
    scores, costs = rng.uniform(size=n), rng.uniform(0, 0.01, size=n)

    def b(s, c):
        batch = BanditBatch(np.zeros((n, 4), np.float32), w, np.zeros(n, int), np.ones(n), s, c)
        return pol._baseline(batch, torch.from_numpy(w).float()).numpy()

    base = b(scores, costs)
    s2, c2 = scores.copy(), costs.copy()
    s2[2], c2[2] = 1 - s2[2], 0.0  # change sample 2's own outcome only
    moved = b(s2, c2)
    assert np.isclose(moved[2], base[2])  # its own baseline is unchanged ...
    assert not np.allclose(np.delete(moved, 2), np.delete(base, 2))  # ... the others' move
    r = 0.6 * scores - 0.4 * np.minimum(costs / 0.01, 1)
    np.testing.assert_allclose(base, (r.sum() - r) / (n - 1), rtol=1e-4, atol=1e-7)
