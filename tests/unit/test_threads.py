"""A Ray actor's BLAS threads follow the CPUs Ray gave it (banditrouter/threads.py). The defect: under
`server.proxy: haproxy` the worker hook loads numpy before Ray sets OMP_NUM_THREADS, so a model replica with
`num_cpus: 0.05` ran OpenBLAS on one thread per core, and the spare thread spun at 0.4 core under load. Here a
process whose OpenBLAS runs 2 threads stands for that replica, and "in a Ray worker" is patched in."""

from __future__ import annotations

import inspect
import json

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import deployments.backends.replay  # noqa: F401  (loaded before the fixture, so it restores every BLAS library)
import deployments.embedder
import deployments.ingress
import deployments.model
import deployments.router
import learner.actors
from banditrouter import threads


def _blas_threads() -> set[int]:
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.fixture
def two_blas_threads(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    if not _blas_threads():
        pytest.skip("no BLAS library loaded")
    with threadpool_limits(limits=2, user_api="blas"):  # restores the process's own limits afterwards
        if _blas_threads() != {2}:
            pytest.skip("this BLAS cannot be set to 2 threads")
        yield


@pytest.mark.parametrize(("cpus", "n"), [(None, 1), (0.0, 1), (0.05, 1), (1.0, 1), (1.5, 1), (2.0, 2), (3.9, 3)])
def test_blas_threads_follow_rays_rule_for_omp_num_threads(cpus, n):
    assert threads.blas_threads(cpus) == n


def test_outside_a_ray_worker_nothing_changes(two_blas_threads):
    assert threads.replica_cpus() is None  # the test process is no Ray worker
    assert threads.limit_blas_threads() is None
    assert _blas_threads() == {2}


def _replay_model(tmp_path):
    from banditrouter.config import ModelConfig

    path = tmp_path / "log.jsonl"
    row = {"id": "p0", "prompt": "one", "outcomes": {"a": {"score": 1, "cost": 0.1, "response": "A"}}}
    path.write_text(json.dumps(row) + "\n")
    cfg = ModelConfig(name="a", backend="replay", replay={"dataset": str(path), "simulate_latency": False})
    return deployments.model.ModelDeployment.func_or_class(cfg)


def _router(tmp_path):
    from factories import FakeHandle

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint

    ckpt = save_checkpoint(make_policy("linucb", ("a", "b"), 8, tau=0.01, seed=0), tmp_path / "linucb.pt")
    cfg = load_config({"policy": {"name": "linucb", "checkpoint": str(ckpt)}, "models": [{"name": "a"}, {"name": "b"}]})
    return deployments.router.Router.func_or_class(cfg, FakeHandle(), {"a": FakeHandle(), "b": FakeHandle()})


@pytest.mark.parametrize("make", [_replay_model, _router], ids=["model replica", "router"])
def test_a_replica_under_one_cpu_runs_one_blas_thread(two_blas_threads, monkeypatch, tmp_path, make):
    monkeypatch.setattr(threads, "replica_cpus", lambda: 0.05)
    make(tmp_path)
    assert _blas_threads() == {1}


def test_a_replica_with_two_cpus_keeps_two(two_blas_threads, monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "replica_cpus", lambda: 2.0)
    _replay_model(tmp_path)
    assert _blas_threads() == {2}


@pytest.mark.parametrize(
    "env", [{"OPENBLAS_NUM_THREADS": "2"}, {"MKL_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "2"}], ids=lambda e: next(iter(e))
)
def test_a_count_the_user_set_is_kept(two_blas_threads, monkeypatch, env):
    monkeypatch.setattr(threads, "replica_cpus", lambda: 0.05)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert threads.limit_blas_threads() is None
    assert _blas_threads() == {2}


def test_rays_own_omp_num_threads_is_no_user_choice(two_blas_threads, monkeypatch):
    monkeypatch.setattr(threads, "replica_cpus", lambda: 0.05)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for a 0.05-CPU actor
    assert threads.limit_blas_threads() == 1
    assert _blas_threads() == {1}


class _Called(Exception):
    pass


@pytest.mark.parametrize(
    ("module", "cls"),
    [
        (deployments.model, deployments.model.ModelDeployment.func_or_class),
        (deployments.router, deployments.router.Router.func_or_class),
        (deployments.ingress, deployments.ingress.Ingress.func_or_class),
        (deployments.embedder, deployments.embedder.EmbedderDeployment.func_or_class),
        (learner.actors, learner.actors.BufferActor.__ray_metadata__.modified_class),
        (learner.actors, learner.actors.LearnerActor.__ray_metadata__.modified_class),
    ],
    ids=["model", "router", "ingress", "embedder", "buffer actor", "learner actor"],
)
def test_every_replica_and_learning_actor_caps_its_threads_before_anything_else(monkeypatch, module, cls):
    def called():
        raise _Called

    # the class as written (under Serve's and Ray's wrappers), and its constructor with every argument None
    own = next(k for k in cls.__mro__ if "__init__" in vars(k) and k.__init__.__code__.co_filename == module.__file__)
    params = inspect.signature(own.__init__).parameters.values()
    required = [p for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD][1:]
    monkeypatch.setitem(own.__init__.__globals__, "limit_blas_threads", called)  # serve.ingress copies the globals
    with pytest.raises(_Called):
        own.__init__(object.__new__(own), *([None] * len(required)))
