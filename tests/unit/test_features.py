"""The learned context projection (banditrouter/features.py): training brings prompts with the same success
pattern closer on held-out rows; it saves and loads without pickle; it travels in checkpoints and pushed
weights, survives a cold start, and a projection that does not fit is refused."""

from __future__ import annotations

import numpy as np
import pytest
from factories import synthetic_problem

from banditrouter.evaluation import evaluate_policy
from banditrouter.features import (
    Projection,
    ProjectionConfig,
    load_or_train_projection,
    random_projection,
    success_pattern_auc,
    train_projection,
)
from banditrouter.pipeline import Split
from banditrouter.policies import (
    POLICIES,
    StateError,
    load_checkpoint,
    make_policy,
    save_checkpoint,
    takes_features,
    untrained_like,
)
from banditrouter.synthetic import make_synthetic
from banditrouter.training import train_policy
from learner.core import install

DIM, OUT, ARMS = 16, 8, 4
PREF = np.array([[0.7, 0.3]])
LEARNERS = ["barp", "linucb", "lints", "acqb"]


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem(DIM, ARMS)


@pytest.fixture(scope="module")
def projection(problem):
    x_tr, train, *_ = problem
    return train_projection(Split(train, x_tr), out_dim=OUT, seed=0, config=ProjectionConfig(epochs=20), progress=False)


_TRAINED: dict[str, object] = {}


def _trained(name, problem, projection):
    if name not in _TRAINED:
        x_tr, train, _, _, tau = problem
        pol = make_policy(name, train.models, DIM, tau, seed=0, features=projection)
        train_policy(pol, x_tr, train, epochs=3, seed=0)
        _TRAINED[name] = pol
    return _TRAINED[name]


# -- the projection itself --------------------------------------------------------------------------------------
def test_training_brings_same_success_pattern_prompts_closer_on_held_out_prompts():
    """32-d contexts whose success pattern (which of 4 arms answers well) depends on 4 directions; an 8-d
    projection. Held out: the random orthogonal projection training starts from ~0.57, the raw embedding
    ~0.63, the trained projection ~0.93 (P(a same-pattern pair is closer than a different-pattern pair))."""
    x, log = make_synthetic(n=1500, dim=32, n_arms=4, seed=0)
    tr, te = np.arange(1000), np.arange(1000, 1500)
    proj = train_projection(Split(log.subset(tr), x[tr]), out_dim=8, seed=0, config=ProjectionConfig(epochs=30), progress=False)
    trained = success_pattern_auc(proj.apply(x[te]), log.scores[te])
    raw = success_pattern_auc(x[te], log.scores[te])
    untrained = max(success_pattern_auc(random_projection(32, 8, s).apply(x[te]), log.scores[te]) for s in range(3))
    assert trained > untrained + 0.2, (trained, untrained)
    assert trained > raw + 0.15, (trained, raw)
    assert proj.meta["loss_last_epoch"] < proj.meta["loss_first_epoch"]


def test_projection_output_is_unit_norm_and_seeded(problem, projection):
    x_tr, train, x_te, *_ = problem
    z = projection.apply(x_te)
    assert z.shape == (len(x_te), OUT) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    again = train_projection(Split(train, x_tr), out_dim=OUT, seed=0, config=ProjectionConfig(epochs=20), progress=False)
    np.testing.assert_array_equal(again.W, projection.W)
    other = train_projection(Split(train, x_tr), out_dim=OUT, seed=1, config=ProjectionConfig(epochs=20), progress=False)
    assert not np.array_equal(other.W, projection.W)
    assert projection.meta | {"split": "train", "in_dim": DIM, "out_dim": OUT, "full_information": True} == projection.meta


def test_projection_is_trained_on_the_train_split_only(problem):
    x_tr, train, *_ = problem
    with pytest.raises(ValueError, match="train split only"):
        train_projection(Split(train, x_tr), split_name="test", progress=False)
    with pytest.raises(ValueError, match="out_dim"):
        train_projection(Split(train, x_tr), out_dim=DIM + 1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        ProjectionConfig(epochs=0)


def test_projection_save_load_round_trip(projection, problem, tmp_path):
    path = projection.save(tmp_path / "p.safetensors")
    assert path.read_bytes()[8:9] == b"{", "a safetensors file (JSON header), not a pickle"
    back = Projection.load(path)
    np.testing.assert_array_equal(back.W, projection.W)
    np.testing.assert_array_equal(back.b, projection.b)
    assert back.meta == projection.meta
    np.testing.assert_array_equal(back.apply(problem[2]), projection.apply(problem[2]))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a projection")
    with pytest.raises(StateError):
        Projection.load(junk)
    from safetensors.numpy import save_file

    save_file({"W": np.zeros((2, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StateError, match="not a banditrouter projection"):
        Projection.load(tmp_path / "other.safetensors")


def test_projection_is_cached_per_dataset_split_seed_and_width(problem, tmp_path, monkeypatch):
    monkeypatch.setattr("banditrouter.features.cache_dir", lambda: tmp_path)
    x_tr, train, *_ = problem
    split = Split(train, x_tr)
    cfg = ProjectionConfig(epochs=2)
    first = load_or_train_projection(split, "synthetic", seed=0, out_dim=OUT, config=cfg, progress=False)
    files = sorted((tmp_path / "projections").iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"synthetic-train-seed0-d{OUT}-")
    calls = []
    monkeypatch.setattr("banditrouter.features.train_projection", lambda *a, **k: calls.append(1))
    again = load_or_train_projection(split, "synthetic", seed=0, out_dim=OUT, config=cfg, progress=False)
    assert not calls, "the cached projection is loaded, not retrained"
    np.testing.assert_array_equal(again.W, first.W)
    monkeypatch.undo()
    monkeypatch.setattr("banditrouter.features.cache_dir", lambda: tmp_path)
    load_or_train_projection(
        Split(train.subset(np.arange(400)), x_tr[:400]), "synthetic", seed=0, out_dim=OUT, config=cfg, progress=False
    )
    assert len(list((tmp_path / "projections").iterdir())) == 2, "other training rows: another cache entry"
    with pytest.raises(ValueError, match="train split only"):
        load_or_train_projection(split, "synthetic", split_name="test", progress=False)


# -- in policies ---------------------------------------------------------------------------------------------
def test_policies_without_a_projection_are_unchanged(problem):
    x_te = problem[2]
    pol = make_policy("linucb", problem[1].models, DIM, problem[4])
    state = pol.state_dict()
    assert pol.projection is None and pol.projected_dim == DIM
    np.testing.assert_array_equal(pol.project(x_te), x_te)
    assert "features" not in state["config"] and not any(k.startswith("features.") for k in state["params"])
    assert pol.A.shape[1] == DIM + 3


@pytest.mark.parametrize("name", [n for n in POLICIES if takes_features(n)])
def test_every_contextual_policy_sizes_its_parameters_by_the_projection(name, problem, projection):
    x_tr, train, x_te, _, tau = problem
    pol = make_policy(name, train.models, DIM, tau, seed=0, features=projection)
    assert pol.projected_dim == OUT
    train_policy(pol, x_tr[:64], train.subset(np.arange(64)), epochs=1, seed=0)
    dec = pol.select(x_te[:10], PREF)
    assert len(dec.arms) == 10 and pol.version > 0
    shapes = {k: np.asarray(v).shape for k, v in pol.state_dict()["params"].items()}
    assert shapes["features.W"] == (OUT, DIM) and shapes["features.b"] == (OUT,)
    assert DIM not in {s[-1] for k, s in shapes.items() if not k.startswith("features.") and s}, (
        f"{name} sized a parameter by the raw context width: {shapes}"
    )


def test_a_policy_learns_on_the_projection(problem, projection):
    """LinUCB on the 8-d projection still beats random by a wide margin on held-out rows (the projection
    keeps what decides the best arm)."""
    _, _, x_te, test, tau = problem
    mean = lambda p: float(np.mean([q["reward"] for q in evaluate_policy(p, x_te, test, tau)]))
    rand = make_policy("random", test.models, DIM, tau, seed=0)
    assert mean(_trained("linucb", problem, projection)) > mean(rand) + 0.15


@pytest.mark.parametrize("name", LEARNERS)
def test_checkpoint_with_projection_round_trips_with_identical_decisions(name, problem, projection, tmp_path):
    pol = _trained(name, problem, projection)
    path = save_checkpoint(pol, tmp_path / f"{name}.pt")
    back = load_checkpoint(path)
    assert back.projection is not None and back.projection.meta == pol.projection.meta
    np.testing.assert_array_equal(back.projection.W, projection.W)
    x_te = problem[2]
    for pref in (np.array([[1.0, 0.0]]), PREF, np.array([[0.2, 0.8]])):
        np.testing.assert_array_equal(back.select(x_te, pref).arms, pol.select(x_te, pref).arms)
    if name == "barp":
        np.testing.assert_array_equal(back.probabilities(x_te, PREF), pol.probabilities(x_te, PREF))


@pytest.mark.parametrize("name", LEARNERS)
def test_untrained_like_keeps_the_projection_and_resets_the_policy(name, problem, projection):
    pol = _trained(name, problem, projection)
    cold = untrained_like(pol)
    assert cold.version == 0 and cold.projection is not pol.projection
    np.testing.assert_array_equal(cold.projection.W, pol.projection.W)
    np.testing.assert_array_equal(cold.projection.b, pol.projection.b)
    fresh = make_policy(name, pol.models, DIM, pol.tau, seed=0, features=projection)
    for k, v in fresh._params().items():
        np.testing.assert_array_equal(cold._params()[k], v, err_msg=f"{name}: {k} kept trained values")
    cold.projection.W[:] = 0  # a copy: the trained policy's projection is not shared
    assert np.abs(pol.projection.W).sum() > 0


@pytest.mark.parametrize("name", LEARNERS)
def test_pushed_weights_install_with_the_projection(name, problem, projection):
    """A router's policy is a cold shell of the learner's; it installs the learner's state_dict whole."""
    pol = _trained(name, problem, projection)
    router = untrained_like(pol)
    installed = install(router, pol.state_dict())
    x_te = problem[2]
    np.testing.assert_array_equal(installed.select(x_te, PREF).arms, pol.select(x_te, PREF).arms)
    assert installed.version == pol.version
    plain = make_policy(name, pol.models, DIM, pol.tau)
    with pytest.raises(StateError, match="parameters"):
        install(plain, pol.state_dict())  # a router without the projection refuses weights that need it


def test_mis_shaped_or_non_finite_projection_is_refused(problem, projection, tmp_path):
    pol = _trained("linucb", problem, projection)
    state = pol.state_dict()
    target = untrained_like(pol)
    before = target.projection.W.copy()
    bad_w = dict(state, params={**state["params"], "features.W": state["params"]["features.W"][:, :-1]})
    with pytest.raises(StateError, match="features.W"):
        target.load_state_dict(bad_w)
    nan_b = dict(state, params={**state["params"], "features.b": np.full(OUT, np.nan, np.float32)})
    with pytest.raises(StateError, match="non-finite"):
        target.load_state_dict(nan_b)
    with pytest.raises(StateError, match="non-finite"):
        install(target, nan_b)
    lying = dict(state, config={**state["config"], "features": {**state["config"]["features"], "out_dim": OUT + 1}})
    with pytest.raises(StateError, match="out_dim"):
        target.load_state_dict(lying)
    np.testing.assert_array_equal(target.projection.W, before)
    assert target.version == 0, "a refused state leaves the policy as it was"
    # a checkpoint whose config declares no projection but whose params carry one
    path = save_checkpoint(pol, tmp_path / "p.pt")
    import torch

    raw = torch.load(path, weights_only=True)
    raw["config"].pop("features")
    torch.save(raw, path)
    with pytest.raises(StateError, match="projection"):
        load_checkpoint(path)
    with pytest.raises(StateError):
        Projection(np.zeros((4, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="contexts"):
        make_policy("linucb", pol.models, DIM + 1, pol.tau, features=projection)
    with pytest.raises(ValueError, match="takes no learned features"):
        make_policy("random", pol.models, DIM, pol.tau, features=projection)


def test_loading_a_state_installs_its_projection(problem, projection):
    """The state's projection replaces the policy's own (same shapes, other values): the blob is the truth."""
    pol = _trained("linucb", problem, projection)
    other = make_policy("linucb", pol.models, DIM, pol.tau, features=random_projection(DIM, OUT, seed=5))
    other.load_state_dict(pol.state_dict())
    np.testing.assert_array_equal(other.projection.W, projection.W)
    np.testing.assert_array_equal(other.select(problem[2], PREF).arms, pol.select(problem[2], PREF).arms)


def test_eval_with_features_projection(problem, tmp_path, monkeypatch):
    """`eval --features projection`: the projection is trained on the train split, every policy that uses
    the context learns on it (static baselines without), and results.json says which did and how well each
    representation separates the evaluated prompts; `--features none` leaves every policy on the raw
    embedding; a checkpoint carries its own features."""
    from banditrouter import pipeline

    x_tr, train, x_te, test, _ = problem
    splits = {"train": Split(train, x_tr), "test": Split(test, x_te)}
    monkeypatch.setattr(pipeline, "load_split", lambda dataset, split, **kw: splits[split])
    monkeypatch.setattr("banditrouter.features.cache_dir", lambda: tmp_path)
    kw = dict(policies=["linucb", "best_single"], epochs=1, progress=False, log_fn=lambda *a: None)
    res = pipeline.run_eval("synthetic", tmp_path / "with", features="projection", features_dim=OUT, **kw)
    assert res["policies"]["linucb"]["features"] == f"projection {DIM}->{OUT}"
    assert res["policies"]["best_single"]["features"] == "none"
    assert res["features"]["split"] == "train" and res["features"]["n_train"] == len(train)
    auc = res["features"]["success_pattern_auc"]
    assert auc["projection"] > auc["random_projection"], auc
    plain = pipeline.run_eval("synthetic", tmp_path / "without", **kw)
    assert plain["features"] is None and plain["policies"]["linucb"]["features"] == "none"
    ckpt = save_checkpoint(make_policy("linucb", train.models, DIM, problem[4]), tmp_path / "l.pt")
    with pytest.raises(ValueError, match="carries its own features"):
        pipeline.run_eval("synthetic", tmp_path / "c", checkpoints=[ckpt], features="projection", **kw)
    with pytest.raises(ValueError, match="unknown features"):
        pipeline.run_eval("synthetic", tmp_path / "c", features="pca", **kw)


@pytest.mark.parametrize("name", ["linucb", "barp"])
def test_learner_learns_from_raw_contexts_and_commits_the_projection(name, tmp_path, rng):
    """The buffer and the learner carry raw 8-d contexts; the policy projects them itself. A learner that
    restarts from its commit continues with the same parameters and projection; its .pt export loads."""
    from factories import MODELS, decision

    from learner.buffer import EventBuffer
    from learner.core import Learner, LearnerSettings

    proj = random_projection(8, 4, seed=3)
    buf = EventBuffer(tmp_path / "e.sqlite")
    for i in range(8):
        buf.append_decisions([decision(i, rng)])
        buf.add_feedback(f"d{i}", float(i % 3) / 2)
    settings = LearnerSettings(batch_size=4, max_wait_s=60)
    a = Learner(make_policy(name, MODELS, 8, tau=0.01, features=proj), tmp_path / "a", settings)
    a.consume(buf.log.read(0))
    a.update()
    assert a.policy.version > 0
    b = Learner(untrained_like(a.policy), tmp_path / "a", settings)
    assert b.restore(lambda after, limit: buf.log.read(after, limit))
    for k, v in a.policy.state_dict()["params"].items():
        np.testing.assert_array_equal(b.policy.state_dict()["params"][k], v, err_msg=k)
    exported = load_checkpoint(a.export_path)
    np.testing.assert_array_equal(exported.projection.W, proj.W)
    x = np.stack([np.asarray(decision(i, rng)["context"]) for i in range(20)])
    np.testing.assert_array_equal(exported.select(x, PREF).arms, a.policy.select(x, PREF).arms)
