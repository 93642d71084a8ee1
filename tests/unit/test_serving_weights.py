"""The weights the learner publishes (`Policy.serving_state_dict`): for ACQB only what a decision reads
(theta, chol_inv, cost_beta, the counters), several times smaller than the full state; a router that installs
them decides exactly as one that installs the full state, refuses a corrupted blob, and cannot learn. The
learner's own commits and export stay full. The other policies publish their full state, as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import MODELS as EVENT_MODELS
from factories import decision
from scipy.special import expit

from banditrouter.policies import (
    POLICIES,
    BanditBatch,
    StateError,
    load_checkpoint,
    make_policy,
    save_checkpoint,
    untrained_like,
)
from banditrouter.policies.base import ServingOnlyError
from learner.core import Learner, LearnerSettings, install

QUALITY_COST = np.array([[0.7, 0.3]])
FULL_ONLY = {"H", "cost_A", "cost_b", "prior_theta", "prior_H", "window_z", "window_y", "window_n"}


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def learned_acqb(k=5, context_dim=12, samples=600, seed=0, **config):
    """An ACQB policy that has learned from a logistic ground truth, with per-model costs."""
    rng = np.random.default_rng(seed)
    models = tuple(f"m{i}" for i in range(k))
    pol = make_policy("acqb", models, context_dim, tau=1.0, seed=seed, **config)
    truth = rng.normal(scale=2.0, size=(k, pol.feature_dim))
    for _ in range(samples // 50):
        x = unit_rows(rng, 50, context_dim)
        arms = rng.integers(0, k, 50)
        z = pol.features(x)
        y = (rng.random(50) < expit((z * truth[arms]).sum(axis=1))).astype(float)
        pol.update(
            BanditBatch(
                contexts=x,
                preferences=np.tile([0.7, 0.3], (50, 1)),
                arms=arms,
                propensities=np.ones(50),
                scores=y,
                costs=0.1 + 0.1 * arms + 0.05 * rng.random(50),
            )
        )
    return pol


def array_bytes(state) -> int:
    return sum(np.asarray(v).nbytes for v in state["params"].values())


def decisions(pol, seed=0):
    """Everything a router asks of the policy, in one fixed sequence (draws included)."""
    rng = np.random.default_rng(seed)
    d, k = pol.context_dim, pol.n_arms
    x = unit_rows(rng, 40, d)
    prefs = np.column_stack([w := rng.random(40), 1 - w])
    sel = pol.select(x, prefs, explore=True)
    greedy = pol.select(x, prefs, explore=False)
    sched = pol.schedule(x[:17], prefs[:17], np.resize([2, 0, 3, 1], k), explore=True)
    sched_greedy = pol.schedule(x[:17], prefs[:17], np.full(k, 2), explore=False)
    sel_after = pol.select(x[:5], QUALITY_COST, explore=True)  # t moved on: eps differs
    return {
        "select_arms": sel.arms,
        "select_propensities": sel.propensities,
        "select_version": sel.policy_version,
        "greedy_arms": greedy.arms,
        "schedule": [(a.job, a.arm, a.propensity, a.policy_version) for a in sched],
        "schedule_greedy": [(a.job, a.arm, a.propensity) for a in sched_greedy],
        "select_after_arms": sel_after.arms,
        "select_after_propensities": sel_after.propensities,
        "values": pol.values(x, prefs),
        "arm_probabilities": pol.arm_probabilities(x, prefs, explore=True),
        "fallback": pol.fallback_probabilities(x, prefs, np.arange(k) % 2 == 0, explore=True),
        "satisfaction": pol.predict_satisfaction(x),
        "t": pol.t,
    }


def assert_same_decisions(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


# -- (a) size -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["newton", "irls"])
def test_acqb_serving_blob_is_at_least_3x_smaller(rule):
    """d = 385 (384-wide contexts + the bias), K = 11: H and cost_A (2 K d^2 float64) stay home. (The sizes
    are fixed by K and d; learning changes the values, not the arrays: no update here, it is slow at d = 385.)"""
    pol = make_policy("acqb", tuple(f"m{i}" for i in range(11)), 384, tau=1.0, update_rule=rule)
    assert pol.feature_dim == 385
    full, serving = pol.state_dict(), pol.serving_state_dict()
    assert serving["serving"] is True and "serving" not in full
    assert set(serving["params"]) == {"theta", "chol_inv", "cost_beta", "counters"}
    assert serving["params"]["chol_inv"].dtype == np.float32  # as the policy keeps it
    assert serving["params"]["theta"].dtype == serving["params"]["cost_beta"].dtype == np.float64
    assert array_bytes(full) >= 3 * array_bytes(serving), (array_bytes(full), array_bytes(serving))
    for key in ("policy", "models", "context_dim", "tau", "version", "config"):
        assert serving[key] == full[key], key


# -- (b) same decisions -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "k", "context_dim", "samples"),
    [("newton", 5, 12, 600), ("irls", 5, 12, 600), ("newton", 11, 64, 1200)],
)
def test_serving_install_decides_exactly_as_full_install(rule, k, context_dim, samples):
    src = learned_acqb(k=k, context_dim=context_dim, samples=samples, update_rule=rule, irls_window=40)
    src.select(unit_rows(np.random.default_rng(9), 7, context_dim), QUALITY_COST, explore=True)  # decisions pending
    # two routers built alike, the same random stream: one installs the full blob, the other the serving blob
    from_full = install(untrained_like(src, seed=5), src.state_dict())
    from_serving = install(untrained_like(src, seed=5), src.serving_state_dict())
    assert from_serving.serving_only and not from_full.serving_only
    assert from_serving.version == from_full.version == src.version and from_serving.t == from_full.t == src.t
    np.testing.assert_array_equal(from_serving.chol_inv, from_full.chol_inv)
    np.testing.assert_array_equal(from_serving.cost_beta, from_full.cost_beta)
    assert_same_decisions(decisions(from_full), decisions(from_serving))
    # the router's stream continues across installs of serving blobs, as with full ones
    again = install(from_serving, src.serving_state_dict())
    assert again.rng is from_serving.rng and again.serving_only
    # and a serving policy republishes what it holds
    re = again.serving_state_dict()
    for key, val in src.serving_state_dict()["params"].items():
        np.testing.assert_array_equal(re["params"][key], val, err_msg=key)


def test_serving_blob_carries_the_learned_projection():
    from banditrouter.features import Projection

    d = 10
    W = np.linalg.qr(np.random.default_rng(0).standard_normal((d, 4)))[0].T
    proj = Projection(W.astype(np.float32), np.zeros(4, np.float32), {})
    src = make_policy("acqb", ("a", "b", "c"), d, tau=1.0, seed=0, features=proj)
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 60, d)
    src.update(BanditBatch(x, np.tile([0.7, 0.3], (60, 1)), np.arange(60) % 3, np.ones(60), np.arange(60) % 2, np.full(60, 0.2)))
    serving = src.serving_state_dict()
    assert {"features.W", "features.b"} <= set(serving["params"]) and serving["config"]["features"] == proj.meta
    a = install(untrained_like(src, seed=2), src.state_dict())
    b = install(untrained_like(src, seed=2), serving)
    assert_same_decisions(decisions(a), decisions(b))


# -- (c) corrupted blobs ------------------------------------------------------------------------------------
def test_corrupted_serving_blob_is_refused_and_the_router_keeps_serving():
    src = learned_acqb(samples=300)
    router = install(untrained_like(src, seed=5), src.serving_state_dict())
    twin = install(untrained_like(src, seed=5), src.serving_state_dict())
    newer = learned_acqb(samples=600)  # what the learner would publish next
    good = newer.serving_state_dict()
    p = good["params"]
    R_upper = p["chol_inv"].copy()
    R_upper[0, 0, 1] = 0.5
    R_neg = p["chol_inv"].copy()
    R_neg[1, 2, 2] = -R_neg[1, 2, 2]
    nan_R = p["chol_inv"].copy()
    nan_R[2, 3, 1] = np.nan
    cases = {
        "missing key": ({k: v for k, v in p.items() if k != "chol_inv"}, "serving parameters"),
        "extra full key": ({**p, "H": newer.H.copy()}, "serving parameters"),
        "wrong shape theta": ({**p, "theta": p["theta"][:, :3]}, "shape"),
        "wrong shape chol_inv": ({**p, "chol_inv": p["chol_inv"][:, :-1, :-1]}, "shape"),
        "NaN chol_inv": ({**p, "chol_inv": nan_R}, "non-finite"),
        "inf cost_beta": ({**p, "cost_beta": np.full_like(p["cost_beta"], np.inf)}, "non-finite"),
        "NaN theta": ({**p, "theta": np.full_like(p["theta"], math.nan)}, "non-finite"),
        "not triangular": ({**p, "chol_inv": R_upper}, "lower triangular"),
        "negative diagonal": ({**p, "chol_inv": R_neg}, "positive diagonal"),
        "negative counters": ({**p, "counters": np.array([-1, 0])}, "non-negative"),
        "integer chol_inv": ({**p, "chol_inv": np.zeros(p["chol_inv"].shape, np.int64)}, "floating"),
    }
    for name, (params, match) in cases.items():
        with pytest.raises(StateError, match=match):
            install(router, {**good, "params": params})
        # load_state_dict itself (what install runs) changes nothing on refusal
        before = (router.theta.copy(), router.chol_inv.copy(), router.cost_beta.copy(), router.t, router.version)
        with pytest.raises(StateError, match=match):
            router.load_state_dict({**good, "params": params})
        after = (router.theta, router.chol_inv, router.cost_beta, router.t, router.version)
        for b, a in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    with pytest.raises(StateError, match="serving"):
        install(router, {**good, "serving": "yes"})
    # a serving blob of the wrong pool, or for a policy that publishes its full state
    with pytest.raises(StateError, match="models"):
        install(router, {**good, "models": ["x"] * 5})
    linucb = make_policy("linucb", ("a", "b"), 12, tau=1.0)
    with pytest.raises(StateError, match="no serving blob"):
        linucb.load_state_dict({**linucb.state_dict(), "serving": True})
    # the router still serves the weights it had, exactly as an untouched twin
    assert router.version == src.version
    assert_same_decisions(decisions(twin), decisions(router))
    assert install(router, good).version == newer.version


# -- (d) a serving policy cannot learn ---------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["newton", "irls"])
def test_serving_loaded_acqb_refuses_to_learn_or_be_checkpointed(rule, tmp_path):
    src = learned_acqb(samples=300, update_rule=rule, irls_window=40)
    router = install(untrained_like(src, seed=1), src.serving_state_dict())
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 8, 12)
    b = BanditBatch(x, np.tile([0.7, 0.3], (8, 1)), np.arange(8) % 5, np.ones(8), np.arange(8) % 2, np.full(8, 0.3))
    theta, version = router.theta.copy(), router.version
    with pytest.raises(ServingOnlyError, match="serving blob"):
        router.update(b)
    with pytest.raises(ServingOnlyError, match="serving blob"):
        router.state_dict()
    with pytest.raises(ServingOnlyError):
        router.training_state()
    with pytest.raises(ServingOnlyError):
        save_checkpoint(router, tmp_path / "router.pt")
    assert not (tmp_path / "router.pt").exists()
    np.testing.assert_array_equal(router.theta, theta)
    assert router.version == version
    # loading a full state makes it a learner again, continuing exactly as the source
    router.load_state_dict(src.state_dict())
    assert not router.serving_only
    for p in (router, src):
        p.update(b)
    for key, val in src.state_dict()["params"].items():
        np.testing.assert_array_equal(router.state_dict()["params"][key], val, err_msg=key)


# -- (e) other policies publish their full state -----------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in POLICIES if n != "acqb"])
def test_other_policies_serving_blob_is_their_state_dict(name):
    pol = make_policy(name, ("a", "b", "c"), 8, tau=0.5, seed=0)
    rng = np.random.default_rng(0)
    x = unit_rows(rng, 16, 8)
    if not pol.full_information:
        pol.update(
            BanditBatch(
                x, np.tile([0.7, 0.3], (16, 1)), np.arange(16) % 3, np.full(16, 1 / 3), np.arange(16) % 2 / 1.0, np.full(16, 0.3)
            )
        )
    full, serving = pol.state_dict(), pol.serving_state_dict()
    assert "serving" not in serving
    assert serving.keys() == full.keys() and serving["params"].keys() == full["params"].keys()
    for key in full:
        if key != "params":
            assert serving[key] == full[key], key
    for key, val in full["params"].items():
        np.testing.assert_array_equal(serving["params"][key], val, err_msg=key)
    router = install(untrained_like(pol), serving)
    assert not router.serving_only
    router.state_dict()  # a full blob: the router could checkpoint it


# -- the learner: publishes the serving blob, commits and exports the full state -----------------------------
def _acqb_learner(path, batch_size=4):
    pol = make_policy("acqb", EVENT_MODELS, 8, tau=0.01, seed=0)
    return Learner(pol, path, LearnerSettings(batch_size=batch_size, max_wait_s=60))


def test_learner_publishes_serving_weights_and_keeps_full_checkpoints(tmp_path, rng, monkeypatch):
    import learner.actors as actors
    from learner.buffer import EventBuffer

    buf = EventBuffer(tmp_path / "e.sqlite")
    for i in range(12):
        buf.append_decisions([decision(i, rng)])
        buf.add_feedback(f"d{i}", float(i % 2))
    ln = _acqb_learner(tmp_path / "learner")
    ln.consume(buf.log.read(0))
    assert ln.update() is not None and ln.policy.version >= 1
    ln.commit(export=True)

    # what the actor puts in the object store (the actor class without Ray: ray.put replaced by identity)
    monkeypatch.setattr(actors.ray, "put", lambda obj: obj)
    actor = object.__new__(actors.LearnerActor.__ray_actor_class__)
    actor.core, actor._event_loop = ln, None
    version, blob = actor._publish()
    assert version == ln.policy.version and blob["serving"] is True
    assert set(blob["params"]) == {"theta", "chol_inv", "cost_beta", "counters"}
    assert not ln.policy.serving_only  # publishing does not touch the learner's policy

    # the .pt export and the commit keep everything the learner needs to go on learning
    exported = load_checkpoint(ln.export_path)
    np.testing.assert_array_equal(exported.H, ln.policy.H)
    np.testing.assert_array_equal(exported.cost_A, ln.policy.cost_A)
    back = _acqb_learner(tmp_path / "learner")
    assert back.restore(lambda after, limit: buf.log.read(after, limit))
    assert not back.policy.serving_only and back.policy.version == ln.policy.version
    for key, val in ln.policy.state_dict()["params"].items():
        np.testing.assert_array_equal(back.policy.state_dict()["params"][key], val, err_msg=key)
    # and a router installing the published blob decides as one installing the full state
    a = install(untrained_like(ln.policy, seed=4), ln.policy.state_dict())
    b = install(untrained_like(ln.policy, seed=4), blob)
    assert_same_decisions(decisions(a), decisions(b))
