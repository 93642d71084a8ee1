"""ACQB (banditrouter/policies/acqb.py): the scheduling rule, forced exploration at rate eps_t, exact
propensities, the Newton / IRLS updates, learning from implicit 0/1 signals, state, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from banditrouter.policies import BanditBatch, StateError, load_checkpoint, make_policy, save_checkpoint, untrained_like
from banditrouter.policies.acqb import ACQB, mnl_choice_probabilities, shifted_logistic_argmax_probability
from banditrouter.policies.lints import argmax_probability

K, D = 4, 6
MODELS = tuple(f"m{k}" for k in range(K))
QUALITY = np.array([[1.0, 0.0]])


def unit_rows(rng, n, d=D):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def z_of(x):
    return np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)


def batch(x, arms, y, costs=None, retrial=None, prefs=None):
    n = len(x)
    return BanditBatch(
        contexts=x,
        preferences=np.tile([1.0, 0.0], (n, 1)) if prefs is None else prefs,
        arms=np.asarray(arms, dtype=np.int64),
        propensities=np.ones(n),
        scores=np.asarray(y, dtype=np.float64),
        costs=np.full(n, 0.5) if costs is None else np.asarray(costs, dtype=np.float64),
        retrial=retrial,
    )


def logistic_truth(seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(scale=scale, size=(K, D + 1))


def learned_policy(seed=0, samples=1200, **config):
    """A policy that has learned a little from a logistic ground truth (so posteriors differ per model)."""
    rng = np.random.default_rng(seed)
    pol = make_policy("acqb", MODELS, D, tau=1.0, seed=seed, **config)
    truth = logistic_truth(seed)
    for _ in range(samples // 40):
        x = unit_rows(rng, 40)
        arms = rng.integers(0, K, 40)
        y = (rng.random(40) < expit((z_of(x) * truth[arms]).sum(axis=1))).astype(float)
        pol.update(batch(x, arms, y, costs=0.2 + 0.15 * arms))
    return pol


# -- the scheduling rule ------------------------------------------------------------------------------------
def reference_greedy(score, free):
    """Serve the feasible pair with the largest score, repeatedly (brute force)."""
    score, free, out = score.copy(), free.copy(), []
    while np.isfinite(score).any() and free.sum() > 0:
        j, a = np.unravel_index(np.argmax(np.where(free[None] > 0, score, -np.inf)), score.shape)
        if not np.isfinite(score[j, a]) or free[a] == 0:
            break
        out.append((int(j), int(a)))
        score[j] = -np.inf
        free[a] -= 1
    return out


@pytest.mark.parametrize("cost_weight", [0.0, 0.4])
def test_schedule_serves_the_largest_sampled_score_first(cost_weight):
    """Without forced exploration, the pairs come out in the order of the sampled scores
    w_q mu(z^T theta~_k) - w_c c~_k (one draw theta~ per call), capacity and one-job-once respected."""
    pol = learned_policy(forced_exploration=False)
    twin = untrained_like(pol, seed=0)
    twin.load_state_dict(pol.state_dict())
    pol.rng, twin.rng = np.random.default_rng(7), np.random.default_rng(7)
    x = unit_rows(np.random.default_rng(3), 12)
    prefs = np.column_stack([np.full(12, 1 - cost_weight), np.full(12, cost_weight)])
    free = np.array([2, 0, 1, 3])
    got = pol.schedule(x, prefs, free)
    theta = twin.sample_theta()  # the same draw schedule() made
    z = z_of(x)
    score = prefs[:, :1] * expit(z @ theta.T) - prefs[:, 1:] * twin.expected_cost(z)
    assert [(a.job, a.arm) for a in got] == reference_greedy(score, free)
    assert len(got) == 6  # work-conserving: every free slot filled (12 jobs wait)
    first = got[0]
    assert score[first.job, first.arm] == np.max(score[:, free > 0])
    # a draw, not the mean: theta~ differs from theta^, and the order depends on it
    assert not np.allclose(theta, pol.theta)


def test_schedule_respects_capacity_and_is_work_conserving():
    pol = learned_policy()
    rng = np.random.default_rng(1)
    for n_jobs, free in [(3, np.array([2, 2, 2, 2])), (20, np.array([1, 0, 3, 2])), (5, np.array([0, 0, 0, 0])), (0, np.ones(K))]:
        x = unit_rows(rng, n_jobs)
        out = pol.schedule(x, np.tile([0.7, 0.3], (max(n_jobs, 1), 1))[:n_jobs] if n_jobs else QUALITY, free)
        jobs, arms = [a.job for a in out], [a.arm for a in out]
        assert len(set(jobs)) == len(jobs), "a job served twice"
        assert (np.bincount(arms, minlength=K) <= free).all(), "a model over its free slots"
        assert len(out) == min(n_jobs, int(free.sum())), "not work-conserving"
        assert all(0 < a.propensity <= 1 and a.policy_version == pol.version for a in out)


def test_schedule_greedy_uses_the_mean_and_logs_propensity_one():
    pol = learned_policy()
    x = unit_rows(np.random.default_rng(2), 10)
    free = np.array([1, 1, 2, 0])
    t_before = pol.t
    out = pol.schedule(x, QUALITY, free, explore=False)
    score = expit(z_of(x) @ pol.theta.T)
    assert [(a.job, a.arm) for a in out] == reference_greedy(score, free)
    assert all(a.propensity == 1.0 for a in out)
    assert pol.t == t_before, "greedy decisions do not advance the exploration counter"


def test_same_seed_same_schedule():
    a, b = learned_policy(seed=4), learned_policy(seed=4)
    x = unit_rows(np.random.default_rng(5), 30)
    for _ in range(5):
        sa = a.schedule(x, QUALITY, np.array([2, 1, 1, 1]))
        sb = b.schedule(x, QUALITY, np.array([2, 1, 1, 1]))
        assert sa == sb


# -- forced exploration ---------------------------------------------------------------------------------------
def forced_policy(**config):
    """Model 0 is far better than the rest with a narrow posterior (v tiny): Thompson sampling always picks
    it, so any other model served to a lone job is a forced random pick."""
    pol = make_policy("acqb", MODELS, D, tau=1.0, seed=11, **{"v": 1e-3, **config})
    pol.theta[0, -1] = 5.0
    pol.theta[1:, -1] = -5.0
    return pol


def test_forced_exploration_happens_at_rate_eps_t():
    """Over T one-job decisions a non-best model is served sum_t eps_t (K-1)/K times, eps_t = min(1, c/sqrt t).
    A constant eps (or none) misses the total or the decay between the halves by far more than the tolerance."""
    c, T = 4.0, 3000
    pol = forced_policy(c=c)
    x = unit_rows(np.random.default_rng(0), 1)
    picks = np.zeros(T, dtype=bool)
    props = np.zeros(T)
    for t in range(T):
        (a,) = pol.schedule(x, QUALITY, np.ones(K))
        picks[t], props[t] = a.arm != 0, a.propensity
    eps = np.minimum(1.0, c / np.sqrt(np.arange(1, T + 1)))
    for part in (slice(0, T // 2), slice(T // 2, T)):
        expected = eps[part].sum() * (K - 1) / K
        assert abs(picks[part].sum() - expected) < 3 * np.sqrt(expected) + 3, (part, picks[part].sum(), expected)
    assert pol.t == T + 1
    # a forced pick of a model TS never picks has propensity eps_t / K; the best model's is 1 - eps_t (K-1)/K
    np.testing.assert_allclose(props[picks], eps[picks] / K, rtol=1e-6)
    np.testing.assert_allclose(props[~picks], 1 - eps[~picks] * (K - 1) / K, rtol=1e-6)


def test_select_forces_exploration_at_rate_eps_t():
    """select(): each row is one decision step (t advances per row)."""
    c, T = 4.0, 40000
    pol = forced_policy(c=c)
    d = pol.select(np.repeat(unit_rows(np.random.default_rng(0), 1), T, axis=0), QUALITY, explore=True)
    eps = np.minimum(1.0, c / np.sqrt(np.arange(1, T + 1)))
    picks = d.arms != 0
    for part in (slice(0, T // 2), slice(T // 2, T)):
        expected = eps[part].sum() * (K - 1) / K
        assert abs(picks[part].sum() - expected) < 3 * np.sqrt(expected) + 3, (part, picks[part].sum(), expected)
    np.testing.assert_allclose(d.propensities[picks], eps[picks] / K, rtol=1e-6)
    assert pol.t == T + 1


@pytest.mark.parametrize("config", [{"forced_exploration": False}, {"c": 0.0}])
def test_pure_thompson_sampling_never_forces(config):
    pol = forced_policy(**{"c": 3.0, **config})
    x = unit_rows(np.random.default_rng(0), 1)
    arms = [pol.schedule(x, QUALITY, np.ones(K))[0].arm for _ in range(300)]
    assert set(arms) == {0}
    assert pol.epsilon(1) == 0.0


def test_counter_survives_weight_installs():
    """A router that installs the learner's weights continues at the learner's t, not at eps = 1."""
    learner = learned_policy(samples=400)
    assert learner.t == 401
    router = untrained_like(learner, seed=5)
    assert router.t == 1 and router.epsilon(router.t) == 1.0
    router.load_state_dict(learner.state_dict())
    assert router.t == 401
    router.schedule(unit_rows(np.random.default_rng(0), 8), QUALITY, np.ones(K))
    assert router.t == 401 + K  # decisions since the weights changed
    router.update(batch(unit_rows(np.random.default_rng(1), 2), [0, 1], [1, 0]))
    assert router.t == 401 + K, "a learned sample replaces the pending decision it came from"


# -- propensities ---------------------------------------------------------------------------------------------
def test_shifted_argmax_probability_is_exact():
    rng = np.random.default_rng(0)
    n = 6
    mean, sd = rng.normal(size=(n, K)), rng.uniform(0.05, 1.5, size=(n, K))
    feasible = np.ones((n, K), bool)
    # no shift: the same integral as lints.argmax_probability
    for a in range(K):
        np.testing.assert_allclose(
            shifted_logistic_argmax_probability(mean, sd, np.zeros((n, K)), feasible, np.full(n, a)),
            argmax_probability(mean, sd, np.full(n, a)),
            atol=5e-5,
        )
    # with a cost shift and an infeasible model: sums to 1 and matches Monte Carlo
    shift = rng.uniform(0, 0.4, size=(n, K))
    feasible[1, 2] = False
    p = np.stack([shifted_logistic_argmax_probability(mean, sd, shift, feasible, np.full(n, a)) for a in range(K)], axis=1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
    assert p[1, 2] == 0.0
    draws = 400_000
    u = mean + sd * np.random.default_rng(1).standard_normal((draws, n, K))
    wins = np.where(feasible, expit(u) - shift, -np.inf).argmax(axis=2)
    mc = np.stack([(wins == a).mean(axis=0) for a in range(K)], axis=1)
    assert np.abs(p - mc).max() < 4 * np.sqrt(0.25 / draws) + 1e-4


@pytest.mark.parametrize("prefs", [[1.0, 0.0], [0.6, 0.4]])
def test_propensities_sum_to_one_and_match_frequencies(prefs):
    """A lone job, models 1 and 3 free twice, model 0 full: the logged propensity of each model is constant
    (t held fixed) and equals its empirical frequency; over the feasible models they sum to 1."""
    pol = learned_policy(c=0.5)
    x = unit_rows(np.random.default_rng(9), 1)
    free = np.array([0, 2, 1, 2])
    pref = np.array([prefs])
    n = 1500
    counts, logged = np.zeros(K), {}
    for _ in range(n):
        pol.decisions_pending = 100  # hold t (and eps_t) fixed
        (a,) = pol.schedule(x, pref, free)
        counts[a.arm] += 1
        logged.setdefault(a.arm, a.propensity)
        assert a.propensity == pytest.approx(logged[a.arm], rel=1e-9)
    z = pol.features(x)
    feasible = np.tile(free > 0, (1, 1))
    pol.decisions_pending = 100
    eps = pol.epsilon(pol.t)
    exact = np.array(
        [
            eps / 3 + (1 - eps) * pol.ts_probability(z, pref, pol.expected_cost(z), feasible, np.array([k]))[0]
            if free[k]
            else 0.0
            for k in range(K)
        ]
    )
    assert exact.sum() == pytest.approx(1.0, abs=1e-4)
    assert counts[0] == 0
    for k, p in logged.items():
        assert p == pytest.approx(exact[k], rel=1e-9)
    np.testing.assert_allclose(counts / n, exact, atol=4 * np.sqrt(0.25 / n))
    assert 0.05 < exact[1:].min() or exact.max() < 0.999, "the test needs a job on which models compete"


def test_select_propensities_match_frequencies():
    pol = learned_policy(c=0.5)
    x = np.repeat(unit_rows(np.random.default_rng(9), 1), 4000, axis=0)
    pol.decisions_pending = 10**6  # eps ~ 0.0005 over the batch: the propensity per model is ~constant
    d = pol.select(x, np.array([[0.7, 0.3]]), explore=True)
    freq = np.bincount(d.arms, minlength=K) / len(x)
    est = np.array([d.propensities[d.arms == a].mean() if (d.arms == a).any() else 0 for a in range(K)])
    np.testing.assert_allclose(est, freq, atol=0.03)
    assert ((d.propensities > 0) & (d.propensities <= 1)).all()
    greedy = pol.select(x[:5], np.array([[0.7, 0.3]]))
    assert (greedy.propensities == 1).all()


def test_cost_term_steers_the_ranking():
    """Two models equally satisfying, one dear: w_c > 0 sends the job to the cheap one; w_c = 0 does not care."""
    pol = make_policy("acqb", ("cheap", "dear"), D, tau=1.0, seed=0, forced_exploration=False)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x = unit_rows(rng, 40)
        arms = rng.integers(0, 2, 40)
        pol.update(batch(x, arms, rng.random(40) < 0.8, costs=np.where(arms == 1, 0.9, 0.1)))
    c = pol.expected_cost(pol.features(unit_rows(rng, 50)))
    assert np.allclose(c[:, 0], 0.1, atol=0.1) and np.allclose(c[:, 1], 0.9, atol=0.1)
    x = unit_rows(rng, 200)
    cheap = pol.select(x, np.array([[0.5, 0.5]]), explore=True).arms
    assert (cheap == 0).mean() > 0.95
    indifferent = pol.select(x, QUALITY, explore=True).arms
    assert 0.2 < (indifferent == 0).mean() < 0.8


# -- learning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["newton", "irls"])
def test_updates_recover_theta_star(rule):
    """Online Newton (one step per batch) and windowed IRLS both land near the true logistic parameters."""
    rng = np.random.default_rng(0)
    truth = np.array([1.5, -1.0, 0.5, 0.0, 2.0, -1.0, 0.3])  # last entry: the bias
    pol = make_policy("acqb", MODELS, D, tau=1.0, seed=0, update_rule=rule, irls_window=200)
    for _ in range(250):
        x = rng.standard_normal((32, D)).astype(np.float32)
        y = (rng.random(32) < expit(z_of(x) @ truth)).astype(float)
        pol.update(batch(x, np.zeros(32, int), y))
    err = np.linalg.norm(pol.theta[0] - truth)
    assert err < 0.25 * np.linalg.norm(truth), (rule, err, pol.theta[0])
    # the Laplace posterior concentrates: width ~ 1/sqrt(n)
    assert pol.utility_sd(z_of(np.zeros((1, D))))[0, 0] < 0.1
    assert np.allclose(pol.theta[1:], 0.0), "models without samples keep their prior"


def test_retrial_flag_is_a_zero():
    a, b = (make_policy("acqb", MODELS, D, tau=1.0, seed=0) for _ in range(2))
    x = unit_rows(np.random.default_rng(0), 20)
    arms = np.arange(20) % K
    retrial = np.arange(20) % 3 == 0
    a.update(batch(x, arms, np.where(retrial, 0.0, 1.0)))
    b.update(batch(x, arms, np.ones(20), retrial=retrial))
    np.testing.assert_array_equal(a.theta, b.theta)


@pytest.mark.parametrize("rule", ["newton", "irls"])
def test_learns_from_implicit_signals_only(rule):
    """A bandit loop on a logistic world where the best model depends on the context: ACQB sees only 0/1
    (satisfied or retried) for the model it served. On held-out contexts its greedy choice must close most of
    the gap between random routing and the oracle (an untrained or broken update stays near random)."""
    rng = np.random.default_rng(1)
    dirs = rng.standard_normal((K, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    truth = np.hstack([4.0 * dirs, np.zeros((K, 1))])
    pol = make_policy("acqb", MODELS, D, tau=1.0, seed=1, update_rule=rule)
    for _ in range(120):
        x = unit_rows(rng, 16)
        d = pol.select(x, QUALITY, explore=True)
        satisfied = rng.random(16) < expit((z_of(x) * truth[d.arms]).sum(axis=1))
        pol.update(batch(x, d.arms, np.ones(16), retrial=~satisfied))
    x = unit_rows(rng, 2000)
    mu = expit(z_of(x) @ truth.T)
    learned = mu[np.arange(2000), pol.select(x, QUALITY).arms].mean()
    untrained = mu[np.arange(2000), untrained_like(pol).select(x, QUALITY).arms].mean()
    random, oracle = mu.mean(), mu.max(axis=1).mean()
    assert learned > random + 0.6 * (oracle - random), (learned, random, oracle)
    assert untrained < random + 0.3 * (oracle - random)


def run_queue(route, learn, rng, truth, steps=300, rate=2.0):
    """A discrete-time queue: Poisson arrivals, one slot per model per step; a served job's user is satisfied
    with probability mu(z^T theta*_k), else retries (the job stays in the pool). `route(x, free)` -> (jobs,
    arms); `learn(x, arms, satisfied)` sees only that. Returns the time-average pool size."""
    pool, sizes = list(unit_rows(rng, 4)), []
    for _ in range(steps):
        pool += list(unit_rows(rng, int(rng.poisson(rate))))
        sizes.append(len(pool))
        if not pool:
            continue
        x = np.array(pool)
        jobs, arms = route(x, np.ones(K))
        satisfied = rng.random(len(jobs)) < expit((z_of(x[jobs]) * truth[arms]).sum(axis=1))
        learn(x[jobs], arms, satisfied)
        done = set(jobs[satisfied].tolist())
        pool = [pool[j] for j in range(len(pool)) if j not in done]
    return float(np.mean(sizes))


def test_queue_loop_learns_from_retrials():
    """The queueing use: each step serves the pool through schedule() and learns only whether each served
    user retried. ACQB keeps a far shorter queue than random routing of the same arrivals, and its greedy
    choice on held-out contexts closes most of the gap between random and the oracle."""
    dirs = np.random.default_rng(2).standard_normal((K, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    truth = np.hstack([4.0 * dirs, np.zeros((K, 1))])
    pol = make_policy("acqb", MODELS, D, tau=1.0, seed=2)

    def acqb(x, free):
        out = pol.schedule(x, QUALITY, free)
        return np.array([a.job for a in out]), np.array([a.arm for a in out])

    def learn(x, arms, satisfied):
        pol.update(batch(x, arms, np.ones(len(arms)), retrial=~satisfied))

    rand = np.random.default_rng(4)

    def uniform(x, free):
        jobs = rand.permutation(len(x))[: int(free.sum())]
        return jobs, rand.permutation(K)[: len(jobs)]

    queue_acqb = run_queue(acqb, learn, np.random.default_rng(5), truth)
    queue_random = run_queue(uniform, lambda *a: None, np.random.default_rng(5), truth)
    assert queue_acqb < 0.5 * queue_random, (queue_acqb, queue_random)
    xs = unit_rows(np.random.default_rng(6), 2000)
    mu = expit(z_of(xs) @ truth.T)
    learned = mu[np.arange(2000), pol.select(xs, QUALITY).arms].mean()
    assert learned > mu.mean() + 0.6 * (mu.max(axis=1).mean() - mu.mean()), learned


def test_training_pretrains_one_pass_by_default():
    from banditrouter.synthetic import make_synthetic
    from banditrouter.training import default_epochs, train_policy

    x, log = make_synthetic(n=300, dim=D, n_arms=K, seed=0)
    pol = make_policy("acqb", log.models, D, tau=1e-3, seed=0)
    train_policy(pol, x, log, seed=0)
    assert default_epochs("acqb") == 1
    assert pol.samples_learned == 300 and pol.t == 301
    cold = make_policy("acqb", log.models, D, tau=1e-3, seed=0)
    train_policy(cold, x, log, epochs=0)
    assert cold.version == 0 and cold.t == 1


# -- the choice model -----------------------------------------------------------------------------------------
def test_mnl_choice_probabilities():
    rng = np.random.default_rng(0)
    z, thetas = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    single = mnl_choice_probabilities(z, thetas, [2])
    np.testing.assert_allclose(single[:, 0], expit(z @ thetas[2]))
    p = mnl_choice_probabilities(z, thetas, [0, 3, 1])
    u = np.exp(z @ thetas[[0, 3, 1]].T)
    np.testing.assert_allclose(p, u / (1 + u.sum(axis=1, keepdims=True)))
    assert (p.sum(axis=1) < 1).all()  # the rest is the outside option (retry)
    big = mnl_choice_probabilities(np.array([1.0, 0, 0]), 800 * np.eye(3), [0, 1])
    np.testing.assert_allclose(big, [1.0, 0.0])  # stable where exp overflows
    pol = learned_policy()
    xs = unit_rows(rng, 7)
    np.testing.assert_allclose(pol.predict_satisfaction(xs), expit(z_of(xs) @ pol.theta.T))
    for bad in ([], [0, 0], [4], [-1]):
        with pytest.raises(ValueError, match="assortment"):
            mnl_choice_probabilities(z, thetas, bad)


# -- state ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["newton", "irls"])
def test_state_round_trip(rule, tmp_path):
    pol = learned_policy(samples=400, update_rule=rule, irls_window=50)
    back = load_checkpoint(save_checkpoint(pol, tmp_path / "acqb.pt"), seed=3)
    assert isinstance(back, ACQB) and back.config == pol.config and back.t == pol.t and back.version == pol.version
    for k, v in pol.state_dict()["params"].items():
        np.testing.assert_array_equal(back.state_dict()["params"][k], v, err_msg=k)
    x = unit_rows(np.random.default_rng(0), 20)
    pol.rng = np.random.default_rng(3)
    assert back.schedule(x, QUALITY, np.array([1, 2, 0, 1])) == pol.schedule(x, QUALITY, np.array([1, 2, 0, 1]))
    # both continue learning identically (the IRLS window and prior travel with the weights)
    xb = unit_rows(np.random.default_rng(1), 30)
    for p in (pol, back):
        p.update(batch(xb, np.arange(30) % K, np.arange(30) % 2))
    np.testing.assert_allclose(back.theta, pol.theta, rtol=1e-12, atol=1e-12)
    fresh = untrained_like(pol)
    assert fresh.config == pol.config and fresh.t == 1 and fresh.version == 0 and np.all(fresh.theta == 0)


def test_state_refuses_what_does_not_fit():
    pol = learned_policy(samples=200)
    state = pol.state_dict()
    other = make_policy("acqb", MODELS, D, tau=1.0)
    H = state["params"]["H"].copy()
    H[0] = -np.eye(D + 1)
    cases = {
        "positive definite": {**state["params"], "H": H},
        "non-finite": {**state["params"], "theta": np.full_like(state["params"]["theta"], np.nan)},
        "shape": {**state["params"], "theta": state["params"]["theta"][:, :3]},
        "non-negative": {**state["params"], "counters": np.array([-1, 0])},
        "differ": {k: v for k, v in state["params"].items() if k != "cost_b"},
    }
    for match, params in cases.items():
        with pytest.raises(StateError, match=match):
            other.load_state_dict(dict(state, params=params))
        assert other.version == 0 and other.t == 1 and np.all(other.theta == 0), "a refused state changed the policy"
    with pytest.raises(StateError, match="parameters"):  # irls carries its window; newton does not
        make_policy("acqb", MODELS, D, tau=1.0, update_rule="irls").load_state_dict(state)


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_input_is_refused():
    pol = learned_policy(samples=80)
    x = unit_rows(np.random.default_rng(0), 3)
    for free in (np.ones(K + 1), -np.ones(K), np.full(K, 0.5), np.array([1, np.nan, 1, 1]), np.array(["a"] * K)):
        with pytest.raises(ValueError, match="free"):
            pol.schedule(x, QUALITY, free)
    with pytest.raises(ValueError, match="contexts"):
        pol.schedule(x[:, :3], QUALITY, np.ones(K))
    with pytest.raises(ValueError, match="non-finite"):
        pol.schedule(np.where(np.arange(D) == 0, np.nan, x), QUALITY, np.ones(K))
    with pytest.raises(ValueError, match="preference"):
        pol.schedule(x, np.array([[-1.0, 1.0]]), np.ones(K))
    with pytest.raises(ValueError, match="arms"):
        pol.update(batch(x, [0, K, 1], [1, 0, 1]))
    with pytest.raises(ValueError, match="retrial"):
        pol.update(batch(x, [0, 1, 1], [1, 0, 1], retrial=np.zeros(2, bool)))
    assert pol.version == 80 // 40
    for config in (
        {"v": 0.0},
        {"c": -1.0},
        {"prior_precision": np.inf},
        {"update_rule": "sgd"},
        {"irls_iters": 0},
        {"irls_window": 2.5},
        {"propensity_nodes": 1},
        {"forced_exploration": "yes"},
        {"cost_ridge": -1},
    ):
        with pytest.raises(ValueError, match="ACQB"):
            make_policy("acqb", MODELS, D, tau=1.0, **config)
    with pytest.raises(TypeError):
        make_policy("acqb", MODELS, D, tau=1.0, propensity_draws=10)


def test_bench_script_smoke():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_acqb.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--dims",
            "8",
            "--models",
            "3",
            "--jobs",
            "5",
            "--repeats",
            "4",
            "--warmup",
            "1",
            "--warm",
            "64",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (res,) = json.loads(out.stdout)["results"]
    assert res["feature_dim"] == 9 and res["assignments_per_call"] == 3 and res["calls"] == 4
    assert 0 < res["ms_per_call"]["p50"] and res["ms_per_assignment"]["mean"] < res["ms_per_call"]["mean"]


def test_learns_on_a_learned_projection(tmp_path):
    """With `features=` the parameters are sized by the projection (z = [W x + b normalised, 1]), raw contexts
    go in, and the projection travels with checkpoints and untrained_like."""
    from banditrouter.features import Projection

    W = np.linalg.qr(np.random.default_rng(0).standard_normal((D, 3)))[0].T  # (3, D), orthonormal rows
    proj = Projection(W.astype(np.float32), np.zeros(3, np.float32), {})
    pol = make_policy("acqb", MODELS, D, tau=1.0, seed=0, features=proj)
    assert pol.theta.shape == (K, 4) and pol.H.shape == (K, 4, 4)
    x = unit_rows(np.random.default_rng(1), 30)
    pol.update(batch(x, np.arange(30) % K, np.arange(30) % 2))
    assert len(pol.schedule(x, QUALITY, np.ones(K))) == K
    back = load_checkpoint(save_checkpoint(pol, tmp_path / "p.pt"))
    np.testing.assert_array_equal(back.projection.W, proj.W)
    np.testing.assert_array_equal(back.theta, pol.theta)
    assert untrained_like(pol).projection is not None
