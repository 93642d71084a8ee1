"""A replica's BLAS threads follow the CPUs Ray gave it (deployments/threads.py). The defect: a model replica with
`num_cpus: 0.05` ran numpy on one OpenBLAS thread per core, because numpy loaded (while Ray unpickled the
deployment class) before Ray set OMP_NUM_THREADS; the spare thread spun at 0.4 core under load. Here a process
whose OpenBLAS runs 2 threads stands for that replica, and "in a Ray worker" is patched in."""

from __future__ import annotations

import json

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from deployments import threads


def _blas_threads() -> set[int]:
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.fixture
def two_blas_threads():
    if not _blas_threads():
        pytest.skip("no BLAS library loaded")
    with threadpool_limits(limits=2, user_api="blas"):  # restores the process's own limits afterwards
        assert _blas_threads() == {2}
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
    from deployments.model import ModelDeployment

    return ModelDeployment.func_or_class(cfg)


def _fused_router(tmp_path):
    from factories import FakeHandle

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.router import Router

    ckpt = save_checkpoint(make_policy("linucb", ("a", "b"), 8, tau=0.01, seed=0), tmp_path / "linucb.pt")
    cfg = load_config({"policy": {"name": "linucb", "checkpoint": str(ckpt)}, "models": [{"name": "a"}, {"name": "b"}]})
    return Router.func_or_class(cfg, FakeHandle(), {"a": FakeHandle(), "b": FakeHandle()})


@pytest.mark.parametrize("make", [_replay_model, _fused_router], ids=["model replica", "router"])
def test_a_replica_under_one_cpu_runs_one_blas_thread(two_blas_threads, monkeypatch, tmp_path, make):
    monkeypatch.setattr(threads, "replica_cpus", lambda: 0.05)
    make(tmp_path)
    assert _blas_threads() == {1}


def test_a_replica_with_two_cpus_keeps_two(two_blas_threads, monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "replica_cpus", lambda: 2.0)
    _replay_model(tmp_path)
    assert _blas_threads() == {2}
