"""BLAS threads in a Ray actor: no more than the CPUs Ray gave it.

Ray sets `OMP_NUM_THREADS` to an actor's CPUs (at least 1) as the actor starts, but OpenBLAS reads its thread count
when numpy loads, and a worker may load numpy before that (the worker hook of `banditrouter.ray_local` imports
`ray.serve` under `server.proxy: haproxy`), leaving one BLAS thread per core. Each replica and learning actor calls
`limit_blas_threads()` first in its constructor; it acts on the BLAS libraries loaded by then, leaves a count the
user set alone, and does nothing outside a Ray worker."""

from __future__ import annotations

import math
import os


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


def user_set_threads(n: int) -> bool:
    """True when the environment holds a BLAS thread count the user chose: OPENBLAS_NUM_THREADS or
    MKL_NUM_THREADS, or an OMP_NUM_THREADS other than the `n` Ray sets (Ray keeps one the user exported)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    return any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")) or (omp not in (None, str(n)))


def limit_blas_threads() -> int | None:
    """In a Ray worker, cap this process's BLAS pools (OpenBLAS, MKL; not torch's) at `blas_threads` of its CPUs
    and return that count; None, with nothing changed, outside a worker or where the user set a count."""
    cpus = replica_cpus()
    if cpus is None:
        return None
    n = blas_threads(cpus)
    if user_set_threads(n):
        return None
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")  # process-wide, for the actor's life
    return n
