"""Time ACQB's scheduling decision on one core and print JSON.

A decision is one `schedule(contexts, preferences, free)` call that fills every free slot from the waiting pool
(default: 11 models, one free slot each, 64 waiting jobs, so 11 assignments per call; `--free 1,0,0,0,0,0,0,0,0,0,0`
times the live router's case of one freed slot). The policy is first fed
`--warm` samples (so H_k and the cost model are not the identity) and the clock covers the call only.
`ms_*` are wall-clock; `cpu_ms_per_call` is the calling thread's CPU time, which other processes on a shared
machine inflate far less (the wall figures are only meaningful on an idle core).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_acqb.py --dims 384,64

Each width in --dims is the width the policy's parameters see (z = [features, 1]): 384 is the raw MiniLM
embedding, 64 stands for the learned projection (simulated by building the policy with context_dim=64 and
random 64-d contexts, which is what the policy sees after projecting).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from banditrouter.policies import BanditBatch, make_policy  # noqa: E402


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench(dim: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    models = [f"m{k}" for k in range(args.models)]
    pol = make_policy("acqb", models, dim, tau=1.0, seed=args.seed, update_rule=args.update_rule)
    truth = rng.standard_normal((args.models, dim + 1))
    for _ in range(0, args.warm, 32):  # learn from a logistic ground truth, so the posterior is not the prior
        x = unit_rows(rng, 32, dim)
        arms = rng.integers(0, args.models, 32)
        p = 1 / (1 + np.exp(-(np.hstack([x, np.ones((32, 1))]) * truth[arms]).sum(axis=1)))
        pol.update(
            BanditBatch(
                x, np.tile([1.0, 0.0], (32, 1)), arms, np.ones(32), (rng.random(32) < p).astype(float), rng.uniform(0, 1, 32)
            )
        )
    free = np.array([int(v) for v in args.free.split(",")])
    free = np.full(args.models, free[0]) if len(free) == 1 else free
    if free.shape != (args.models,):
        raise SystemExit(f"--free takes one count or {args.models} comma-separated counts")
    pools = [unit_rows(rng, args.jobs, dim) for _ in range(args.repeats)]
    prefs = np.column_stack([np.ones(args.jobs) - (w := rng.uniform(0, 1, args.jobs) * args.cost_weight), w])
    for x in pools[: args.warmup]:
        pol.schedule(x, prefs, free)
    times, cpu, counts = [], [], []
    for x in pools:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = pol.schedule(x, prefs, free)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        counts.append(len(out))
    ms = np.array(times) * 1e3
    per = ms / np.array(counts)
    return {
        "feature_dim": dim + 1,
        "assignments_per_call": float(np.mean(counts)),
        "ms_per_call": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean())},
        "ms_per_assignment": {
            "p50": float(np.percentile(per, 50)),
            "p95": float(np.percentile(per, 95)),
            "mean": float(per.mean()),
        },
        "cpu_ms_per_call": {"p50": float(np.percentile(cpu, 50) * 1e3), "p95": float(np.percentile(cpu, 95) * 1e3)},
        "calls": len(ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="384,64", help="Comma-separated context widths to time.")
    ap.add_argument("--models", type=int, default=11)
    ap.add_argument("--jobs", type=int, default=64, help="Waiting jobs per decision.")
    ap.add_argument("--free", default="1", help="Free slots per decision: one count for every model, or one per model.")
    ap.add_argument("--cost-weight", type=float, default=0.5, help="w_cost drawn from U(0, this) per job.")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--warm", type=int, default=2000, help="Samples learned before timing.")
    ap.add_argument("--update-rule", default="newton", choices=["newton", "irls"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if "torch" in sys.modules:  # ACQB does not import torch; if something did, keep it on one thread too
        sys.modules["torch"].set_num_threads(1)
    result = {
        "models": args.models,
        "waiting_jobs": args.jobs,
        "free": args.free,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "load_average_1m_before": os.getloadavg()[0],  # other processes on the machine inflate the figures
        "numpy": np.__version__,
        "results": [bench(int(d), args) for d in args.dims.split(",")],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
