from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from banditrouter.evaluation.queue import QUEUE_POLICIES, decision_regret, parse_seeds, run_queue_eval
from envs import QUEUEING_ENV_ID, QueueingEnv, make_queueing_env, register
from envs.queueing import (
    fill_missing,
    fit_logistic,
    fit_satisfaction,
    greedy_assignment,
    logistic_success,
    service_rate,
    synthetic_table,
    table_from_arrays,
)

SMALL = {"synthetic": {"n": 120, "dim": 6, "n_arms": 3, "seed": 1}, "max_queue": 8, "capacity": [1, 2, 1]}


def constant_env(p: float, *, n: int = 20, k: int = 2, **kwargs) -> QueueingEnv:
    """Every prompt is satisfied with probability p by every model."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
    return QueueingEnv(x, np.full((n, k), p), np.full((n, k), 1e-3), **kwargs)


# -- gymnasium ---------------------------------------------------------------------------------------------
def test_passes_gymnasium_env_checker():
    """check_env raises on a broken contract and only warns on softer problems: both fail this test."""
    import warnings

    env = make_queueing_env(SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_seeded_resets_and_steps_are_deterministic():
    def rollout(seed: int) -> list:
        env = make_queueing_env(SMALL)
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(123)
        trace = [obs["contexts"].copy(), obs["mask"].copy()]
        for _ in range(30):
            obs, r, *_, info = env.step(env.action_space.sample())
            trace += [obs["contexts"].copy(), obs["mask"].copy(), r, info["satisfied"], info["retried"]]
        return trace

    a, b, c = rollout(5), rollout(5), rollout(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_a_seed_gives_every_policy_the_same_arrivals():
    """Arrivals come from their own stream: what is served does not change them (common random numbers)."""
    traces = []
    for serve_all in (True, False):
        env = constant_env(0.5, arrival_rate=2.0, capacity=1)
        _, info = env.reset(seed=3)
        rows = [env.job_rows(info["arrivals"]).tolist()]
        for _ in range(50):
            jobs, _ = env.waiting()
            n = min(len(jobs), 2) if serve_all else 0
            env.serve(jobs[:n], np.arange(n))
            rows.append(env.job_rows(env.arrive()).tolist())
        traces.append(rows)
    assert traces[0] == traces[1]


def test_registered_with_gymnasium_and_rllib():
    register()
    env = gym.make(QUEUEING_ENV_ID, config=SMALL)
    assert env.observation_space["contexts"].shape == (8, 6)
    assert env.action_space.nvec.tolist() == [4] * 8
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from envs import QUEUEING_RLLIB_ENV_NAME

    assert _global_registry.contains(ENV_CREATOR, QUEUEING_RLLIB_ENV_NAME)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown queueing env config keys"):
        make_queueing_env({**SMALL, "lod": 0.9})
    with pytest.raises(ValueError, match="exactly one of"):
        constant_env(0.5, arrival_rate=1.0, load=0.5)
    with pytest.raises(ValueError, match="Bernoulli"):
        constant_env(0.5, arrival_rate=1.5, arrivals="bernoulli")
    with pytest.raises(ValueError, match="capacity"):
        constant_env(0.5, arrival_rate=1.0, capacity=[1, 2, 3])
    with pytest.raises(ValueError, match="lie in"):
        QueueingEnv(np.zeros((2, 3)), np.array([[0.5, 1.5], [0.1, 0.2]]), np.ones((2, 2)), arrival_rate=1.0)


# -- arrivals, capacity, outcomes ------------------------------------------------------------------------
@pytest.mark.parametrize(("process", "rate"), [("poisson", 3.0), ("bernoulli", 0.3)])
def test_arrival_rate_matches_lambda(process, rate):
    env = constant_env(0.5, arrival_rate=rate, arrivals=process)
    env.reset(seed=0)
    first = env.queue_length
    counts = np.array([len(env.arrive()) for _ in range(20000)])
    assert counts.mean() == pytest.approx(rate, abs=4 * np.sqrt(rate / 20000))
    if process == "poisson":
        assert counts.var() == pytest.approx(rate, rel=0.08)  # Poisson: variance = mean
    else:
        assert counts.max() == 1 and counts.var() == pytest.approx(rate * (1 - rate), rel=0.08)
    assert env.queue_length == first + counts.sum() == len(env.waiting()[0]) == env.row_counts.sum()


def test_capacity_is_respected():
    env = constant_env(1.0, k=3, arrival_rate=6.0, capacity=[1, 2, 0], max_queue=6)
    env.reset(seed=0)
    while env.queue_length < 6:
        env.arrive()
    jobs, _ = env.waiting()
    with pytest.raises(ValueError, match="capacity"):
        env.serve(jobs[:2], [0, 0])
    with pytest.raises(ValueError, match="capacity"):
        env.serve(jobs[:1], [2])
    with pytest.raises(ValueError, match="same job twice"):
        env.serve([jobs[0], jobs[0]], [0, 1])
    # gymnasium: every slot asks for model 1 (capacity 2): two are served, the rest dropped
    _, _, _, _, info = env.step(np.full(6, 1))
    assert info["served"] == 2 and info["dropped"] == 4
    _, _, _, _, info = env.step(np.full(6, 3))  # 3 = do not serve
    assert info["served"] == 0 and info["dropped"] == 0


@pytest.mark.parametrize("p_retry", [0.0, 0.3, 1.0])
def test_unsatisfied_users_retry_with_p_retry_else_abandon(p_retry):
    env = constant_env(0.0, arrival_rate=30.0, capacity=[15, 15], p_retry=p_retry)
    env.reset(seed=1)
    retried = abandoned = served = 0
    for _ in range(200):
        jobs, _ = env.waiting()
        jobs = jobs[:30]
        arms = np.arange(len(jobs)) % 2
        before = env.queue_length
        out = env.serve(jobs, arms)
        assert not out.satisfied.any()
        assert (out.retried ^ out.abandoned).all()
        assert env.queue_length == before - int(out.abandoned.sum())  # retried jobs stay
        # a retried job re-enters at the back of the queue
        if out.retried.any():
            assert set(env.waiting()[0][-int(out.retried.sum()) :]) == set(out.jobs[out.retried])
        retried, abandoned, served = retried + out.retried.sum(), abandoned + out.abandoned.sum(), served + len(out)
        env.arrive()
    assert retried / served == pytest.approx(p_retry, abs=0.02)
    assert abandoned / served == pytest.approx(1 - p_retry, abs=0.02)
    assert env.row_counts.sum() == env.queue_length


def test_satisfied_users_leave_and_costs_accrue_per_service():
    env = constant_env(1.0, arrival_rate=4.0, capacity=2, p_retry=1.0)
    env.reset(seed=2)
    jobs, _ = env.waiting()
    n = min(4, len(jobs))
    out = env.serve(jobs[:n], np.arange(n) % 2)
    assert out.satisfied.all() and env.queue_length == len(jobs) - n
    assert env.totals["cost"] == pytest.approx(1e-3 * n)


# -- satisfaction models ------------------------------------------------------------------------------------
def test_logistic_fit_recovers_synthetic_parameters():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 4))
    theta = np.array([1.5, -1.0, 0.5, 0.0, -0.3])  # last: the bias
    p = 1 / (1 + np.exp(-(x @ theta[:-1] + theta[-1])))
    y = (rng.random(len(p)) < p).astype(float)
    fitted = fit_logistic(x, y, reg=1e-3)
    np.testing.assert_allclose(fitted, theta, atol=0.06)
    # per model, with missing labels skipped
    scores = np.column_stack([y, 1 - y])
    scores[:100, 1] = np.nan
    both = fit_satisfaction(x, scores, reg=1e-3)
    np.testing.assert_allclose(both[0], theta, atol=0.06)
    np.testing.assert_allclose(both[1], -theta, atol=0.06)
    np.testing.assert_allclose(logistic_success(x[:3], both)[:, 0], p[:3], atol=0.03)


def test_logistic_regularisation_shrinks_weights_not_the_bias():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 3))
    y = (rng.random(500) < 0.8).astype(float)  # no signal in x, mean 0.8
    theta = fit_logistic(x, y, reg=1e4)
    assert np.abs(theta[:-1]).max() < 1e-2
    assert 1 / (1 + np.exp(-theta[-1])) == pytest.approx(y.mean(), abs=1e-3)


def test_logged_table_fills_missing_cells_with_the_models_mean():
    scores = np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 0.0]])
    filled = fill_missing(scores)
    assert filled[0, 1] == pytest.approx(0.5)
    t = table_from_arrays(np.zeros((3, 2)), scores, np.ones((3, 2)), models=("a", "b"), satisfaction="logged", tau=1.0)
    np.testing.assert_array_equal(t.success, filled)
    with pytest.raises(ValueError, match="no value"):
        fill_missing(np.array([[np.nan, 1.0]]))


# -- the oracle's rule and the load ----------------------------------------------------------------------
def naive_greedy(u: np.ndarray, cap: np.ndarray) -> tuple[list[int], list[int]]:
    cap, used, jobs, arms = cap.copy(), set(), [], []
    pairs = sorted((-u[j, a], j, a) for j in range(len(u)) for a in range(u.shape[1]))
    for _, j, a in pairs:
        if j not in used and cap[a] > 0:
            used.add(j)
            cap[a] -= 1
            jobs.append(j)
            arms.append(a)
    return jobs, arms


def test_greedy_assignment_serves_the_largest_pairs_first():
    u = np.array([[0.9, 0.95], [0.1, 0.9], [0.5, 0.2]])
    jobs, arms = greedy_assignment(u, np.array([1, 1]))
    assert list(zip(jobs.tolist(), arms.tolist(), strict=True)) == [(0, 1), (2, 0)]
    # ties go to the older job
    jobs, arms = greedy_assignment(np.ones((5, 2)), np.array([1, 1]))
    assert sorted(jobs.tolist()) == [0, 1]
    rng = np.random.default_rng(0)
    for _ in range(50):  # the candidate pruning never changes the answer (ties included)
        u = rng.integers(0, 3, size=(int(rng.integers(1, 40)), 3)) / 2
        cap = rng.integers(0, 3, size=3)
        jobs, arms = greedy_assignment(u, cap)
        assert (jobs.tolist(), arms.tolist()) == naive_greedy(u, cap)


def test_service_rate_of_the_saturated_oracle():
    cap = np.array([2, 1, 3])
    always = service_rate(np.ones((10, 3)), cap, 0.5, steps=200, warmup=10)
    assert always.rate == 6.0 and always.stderr == 0.0  # every slot busy, every job satisfied
    q, r = 0.4, 0.5  # a job leaves with probability q + (1 - q)(1 - r)
    half = service_rate(np.full((10, 3), q), cap, r, steps=4000, warmup=100)
    assert half.rate == pytest.approx(6 * (q + (1 - q) * (1 - r)), abs=4 * half.stderr + 0.02)
    # the oracle's matching: prompt 0 only model 0 solves, prompt 1 only model 1
    matched = service_rate(np.array([[1.0, 0.0], [0.0, 1.0]]), 1, 1.0, steps=2000, warmup=100)
    wrong = np.array([[0.0, 1.0], [1.0, 0.0]])  # ranks the model that never satisfies first
    wrong_rank = service_rate(np.array([[1.0, 0.0], [0.0, 1.0]]), 1, 1.0, utility=wrong, steps=2000, warmup=100)
    assert matched.rate > wrong_rank.rate + 0.2
    with pytest.raises(ValueError, match="never leave"):
        service_rate(np.array([[0.0, 0.0], [1.0, 1.0]]), 1, 1.0)


def test_load_sets_lambda_from_the_service_rate():
    env = constant_env(1.0, k=2, load=0.5, capacity=[1, 2])
    assert env.rate.rate == 3.0
    assert env.arrival_rate == pytest.approx(1.5) and env.load == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="cannot keep"):
        constant_env(1.0, k=2, load=1.2, capacity=1)


# -- queue-eval ----------------------------------------------------------------------------------------------
def test_routing_regret_per_decision_on_the_same_state():
    u = np.array([[0.9, 0.2], [0.6, 0.5]])
    cap = np.array([1, 1])
    oj, oa = greedy_assignment(u, cap)
    assert decision_regret(u, cap, oj, oa) == (0.0, 0.0)  # the oracle's own step
    # served (1, 0) then (0, 1): the first could have had 0.9, the second was the best left
    per, whole = decision_regret(u, cap, np.array([0, 1]), np.array([1, 0]))
    assert per == pytest.approx(0.3) and whole == pytest.approx(1.4 - 0.8)
    # an idle slot while a job waits costs what the oracle would have served on it
    assert decision_regret(np.array([[0.7, 0.3]]), cap, np.zeros(0, int), np.zeros(0, int)) == pytest.approx((0.7, 0.7))
    # greedy is not a maximum-weight matching: the set-level variant goes negative, per decision it cannot
    u = np.array([[0.9, 0.8], [0.85, 0.1]])
    per, whole = decision_regret(u, cap, np.array([0, 1]), np.array([1, 0]))
    assert whole == pytest.approx(1.0 - 1.65) and per == pytest.approx(0.05)


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,7") == [0, 2, 7]
    for bad in ("4-2", "a", "1,1", ""):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def _quiet_eval(tmp_path, table, **kw):
    """run_queue_eval on a synthetic table, raw features, one seed and one worker unless `kw` says otherwise,
    without progress bars or log lines."""
    opts = dict(seeds=[0], features="none", workers=1, rate_steps=400, progress=False, log_fn=lambda *_: None)
    return run_queue_eval("synthetic", tmp_path, table=table, **{**opts, **kw})


def test_queue_eval_smoke_writes_the_documented_shape(tmp_path):
    table = synthetic_table(n=200, dim=6, n_arms=3, seed=0, satisfaction="logistic")
    res = _quiet_eval(
        tmp_path, table, steps=40, seeds=[0, 1], satisfaction="logistic", policies=["acqb", "linucb", "oracle"], workers=2
    )
    data = json.loads((tmp_path / "queue.json").read_text())
    assert {"dataset", "load", "steps", "seeds", "satisfaction", "policies"} <= set(data)
    assert data["steps"] == 40 and data["seeds"] == [0, 1] and data["satisfaction"] == "logistic"
    keys = {
        "time_avg_queue_length",
        "final_queue_length",
        "retrial_rate",
        "abandon_rate",
        "satisfaction",
        "cost",
        "regret",
        "queue_regret",
    }
    assert set(data["policies"]) == {"acqb", "linucb", "oracle"}
    for p in data["policies"].values():
        assert set(p) == keys
        assert p["retrial_rate"] + p["abandon_rate"] + p["satisfaction"] == pytest.approx(1.0)
        ts, cum = zip(*p["regret"], strict=True)
        assert list(ts) == sorted(ts) and ts[-1] == 40
        assert cum[0] >= 0 and (np.diff(cum) >= -1e-9).all()  # per-decision regret is >= 0 every step
        assert all(len(pt) == 2 for pt in p["queue_regret"]) and p["queue_regret"][-1][0] == 40
    # the oracle is its own benchmark: no regret, no queue-length regret
    assert all(v == 0 for _, v in data["policies"]["oracle"]["regret"])
    assert all(v == 0 for _, v in data["policies"]["oracle"]["queue_regret"])
    for fig in ("queue_length.png", "regret.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    assert json.loads((tmp_path / "checks.json").read_text()) == json.loads(json.dumps(res.checks))


def test_queue_eval_policies_learn_from_the_retrial_signal(tmp_path):
    """ACQB sees only retried / not retried; if that signal were lost or inverted it would do no better than
    random scheduling (gain 6: which model satisfies depends strongly on the context)."""
    table = synthetic_table(n=300, dim=6, n_arms=3, seed=0, satisfaction="logistic", reg=0.1)
    res = _quiet_eval(tmp_path, table, steps=400, satisfaction="logistic", policies=["acqb", "random_pool", "oracle"], capacity=2)
    p = res.results["policies"]
    assert p["acqb"]["regret"][-1][1] < 0.5 * p["random_pool"]["regret"][-1][1]
    assert p["acqb"]["satisfaction"] > p["random_pool"]["satisfaction"] + 0.05


def test_queue_eval_refuses_bad_input(tmp_path):
    table = synthetic_table(n=50, dim=4, n_arms=2)
    kw = dict(
        table=table, features="none", steps=10, seeds=[0], workers=1, rate_steps=100, progress=False, log_fn=lambda *_: None
    )
    with pytest.raises(ValueError, match="unknown queue-eval policies"):
        run_queue_eval("synthetic", tmp_path, policies=["acqb", "nope"], **kw)
    with pytest.raises(ValueError, match="Bernoulli"):
        run_queue_eval("synthetic", tmp_path, policies=["oracle"], arrivals="bernoulli", **kw)
    with pytest.raises(ValueError, match="satisfaction"):
        run_queue_eval("synthetic", tmp_path, policies=["oracle"], satisfaction="score", **kw)
    assert set(QUEUE_POLICIES) >= {"acqb", "acqb_ts", "acqb_eps", "oracle", "linucb", "barp", "greedy", "random"}


def test_cli_queue_eval_rejects_bad_seeds():
    from typer.testing import CliRunner

    from banditrouter.cli import app

    res = CliRunner().invoke(app, ["queue-eval", "--seeds", "4-2", "--steps", "10"])
    assert res.exit_code == 2 and "seeds" in res.output


def test_logged_mode_oracle_knows_theta_star_not_the_outcome(tmp_path):
    """In `logged` mode the theta*-oracle ranks by mu(z^T theta*) (a fitted per-model scorer), not by each
    prompt's own 0/1 outcome: the load is set against the rate a learner of ACQB's class could reach. The
    clairvoyant reference, which does know the outcome, sustains more."""
    table = synthetic_table(n=300, dim=6, n_arms=3, seed=0, satisfaction="logged")
    assert set(np.unique(table.success)) <= {0.0, 1.0}
    assert table.theta is not None and table.theta.shape == (3, 7)
    np.testing.assert_allclose(table.oracle_success, logistic_success(table.contexts, table.theta))
    assert not np.array_equal(table.oracle_success, table.success)
    env = QueueingEnv.from_table(table, load=0.9, capacity=1)
    theta_rate = service_rate(table.success, 1, utility=table.oracle_success)
    clairvoyant_rate = service_rate(table.success, 1)
    assert env.rate.rate == theta_rate.rate
    assert clairvoyant_rate.rate > theta_rate.rate + 4 * (clairvoyant_rate.stderr + theta_rate.stderr)
    res = _quiet_eval(tmp_path, table, steps=300, satisfaction="logged", policies=["oracle", "clairvoyant"])
    pol = res.results["policies"]
    assert all(v == 0 for _, v in pol["oracle"]["regret"])
    assert pol["clairvoyant"]["satisfaction"] > pol["oracle"]["satisfaction"]
    assert res.results["config"]["arrival_rate"] == pytest.approx(0.9 * theta_rate.rate, rel=0.05)


def test_logistic_mode_oracle_knows_the_truth():
    table = synthetic_table(n=200, dim=6, n_arms=3, seed=0, satisfaction="logistic")
    np.testing.assert_array_equal(table.oracle_success, table.success)


def test_queue_regret_quarters_check():
    from banditrouter.evaluation.queue import queue_checks

    steps = 8
    oracle = {"queue": np.full(steps, 5.0), "cum_regret": np.zeros(steps), "cum_set_regret": np.zeros(steps)}

    def run(q):
        cum = np.arange(1.0, steps + 1)
        return {"queue": np.asarray(q, dtype=float), "cum_regret": cum, "cum_set_regret": cum}

    pol = {"acqb": {"time_avg_queue_length": 1.0}, "random_pool": {"time_avg_queue_length": 2.0}}
    halves = queue_checks(pol, {"oracle": oracle, "acqb": run([9, 9, 6, 6, 6, 6, 6, 6])}, steps)["queue_regret_quarters"]["acqb"]
    assert halves["first"] == 4 and halves["last"] == 1 and halves["ratio"] == 0.25 and halves["met"]
    stuck = queue_checks(pol, {"oracle": oracle, "acqb": run([9, 9, 9, 9, 9, 9, 8, 8])}, steps)["queue_regret_quarters"]["acqb"]
    assert stuck["ratio"] == 0.75 and not stuck["met"]
    # no excess in the first quarter: met only while the queue stays no longer than the oracle's
    below = queue_checks(pol, {"oracle": oracle, "acqb": run([4, 4, 5, 5, 5, 5, 4, 4])}, steps)["queue_regret_quarters"]["acqb"]
    assert below["ratio"] is None and below["met"]
    grew = queue_checks(pol, {"oracle": oracle, "acqb": run([4, 4, 5, 5, 5, 5, 7, 7])}, steps)["queue_regret_quarters"]["acqb"]
    assert grew["ratio"] is None and not grew["met"]
