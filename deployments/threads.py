"""Native thread pools in a Serve replica: no more BLAS threads than the CPUs Ray gave the replica.

Ray sets `OMP_NUM_THREADS` to a worker's CPU allotment (at least 1) when the worker takes an actor, but numpy's
OpenBLAS reads its thread count once, when numpy loads. A replica's class is unpickled before that, and its module
(deployments/model.py through the backends, for one) imports numpy, so a model replica with `num_cpus: 0.05` ran
its numpy on one OpenBLAS thread per core. The replay backend's nearest-prompt search (a matrix-vector product
per request) then woke OpenBLAS's worker thread, which spins between calls: 0.37-0.40 of a core in the busiest
model replica on 200-character prompts, on this 2-core machine (README, "Routing overhead").

Each deployment calls `limit_blas_threads()` first thing in its constructor. Outside a Ray worker (a driver, the
unit tests) it leaves the process alone."""

from __future__ import annotations

import math


def blas_threads(cpus: float | None) -> int:
    """Ray's rule for `OMP_NUM_THREADS`: the floor of the CPUs assigned, and 1 for under one CPU or none."""
    return max(1, math.floor(cpus)) if cpus else 1


def replica_cpus() -> float | None:
    """The CPUs Ray assigned to this worker process, or None when this process is not a Ray worker."""
    import ray

    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    return ctx.get_assigned_resources().get("CPU", 0.0)


def limit_blas_threads() -> int | None:
    """In a Ray worker, cap this process's BLAS thread pools (OpenBLAS, MKL) at `blas_threads` of its CPUs and
    return that count; None (and nothing changed) outside one. torch's own pool is the embedder's to set."""
    cpus = replica_cpus()
    if cpus is None:
        return None
    from threadpoolctl import threadpool_limits

    n = blas_threads(cpus)
    threadpool_limits(limits=n, user_api="blas")  # process-wide, for the replica's life
    return n
