"""Size and install time of the weights the learner publishes, full state vs serving blob, for ACQB; prints JSON.

The learner puts one blob per version in Ray's object store and every router replica installs it
(`learner.core.install`). Before, that blob was `state_dict()`; now it is `serving_state_dict()`, which for ACQB
holds only what a decision reads (theta, chol_inv, cost_beta, counters), not the precision and cost Gram
matrices H and cost_A (2 K d^2 float64) that only learning reads. Per width it reports, for both blobs: the
pickled size (`pickle.dumps`, protocol 5, as Ray serialises), the bytes of the numpy arrays, and the wall time
of `install()` on a router-like policy (median, min and max of `--repeats`), plus whether a router installed
from the serving blob makes the same decisions as one installed from the full blob (same seed: select arms
and propensities, schedule assignments and propensities).

    .venv/bin/python scripts/bench_weights.py            # d = 385 and 65 (K = 11, 2000 samples learned)

One BLAS thread (as a Ray worker runs by default); wall times on a shared machine are upper bounds.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # set before numpy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from banditrouter.policies import BanditBatch, make_policy, untrained_like  # noqa: E402
from learner.core import install  # noqa: E402


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def learned(dim: int, models: int, samples: int, seed: int):
    """ACQB on `dim`-wide contexts (feature width dim + 1) after `samples` synthetic logistic samples."""
    rng = np.random.default_rng(seed)
    pol = make_policy("acqb", [f"m{k}" for k in range(models)], dim, tau=1.0, seed=seed)
    truth = rng.standard_normal((models, dim + 1))
    for start in range(0, samples, 32):
        n = min(32, samples - start)
        x = unit_rows(rng, n, dim)
        arms = rng.integers(0, models, n)
        p = 1 / (1 + np.exp(-(np.hstack([x, np.ones((n, 1))]) * truth[arms]).sum(axis=1)))
        w = rng.uniform(0, 1, n)
        pol.update(
            BanditBatch(x, np.column_stack([1 - w, w]), arms, np.ones(n), (rng.random(n) < p).astype(float), 0.1 + 0.05 * arms)
        )
    return pol


def decisions(router, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, 32, router.context_dim)
    w = rng.uniform(0, 1, 32)
    prefs = np.column_stack([1 - w, w])
    sel = router.select(x, prefs, explore=True)
    sched = router.schedule(x, prefs, np.ones(router.n_arms), explore=True)
    return sel.arms.tolist(), sel.propensities.tolist(), [(a.job, a.arm, a.propensity) for a in sched]


def bench(dim: int, args: argparse.Namespace) -> dict:
    pol = learned(dim, args.models, args.samples, args.seed)
    shell = untrained_like(pol, seed=1)  # the router's current policy
    out: dict = {
        "context_dim": dim,
        "feature_dim": pol.feature_dim,
        "models": args.models,
        "samples_learned": pol.samples_learned,
    }
    for kind, blob in (("full", pol.state_dict()), ("serving", pol.serving_state_dict())):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            install(shell, blob)
            times.append(time.perf_counter() - t0)
        out[kind] = {
            "params": sorted(blob["params"]),
            "pickle_bytes": len(pickle.dumps(blob, protocol=5)),
            "array_bytes": int(sum(np.asarray(v).nbytes for v in blob["params"].values())),
            "install_ms": {
                "median": round(1e3 * statistics.median(times), 2),
                "min": round(1e3 * min(times), 2),
                "max": round(1e3 * max(times), 2),
            },
        }
    out["size_ratio"] = round(out["full"]["pickle_bytes"] / out["serving"]["pickle_bytes"], 2)
    out["install_speedup"] = round(out["full"]["install_ms"]["median"] / out["serving"]["install_ms"]["median"], 2)
    a = install(untrained_like(pol, seed=7), pol.state_dict())
    b = install(untrained_like(pol, seed=7), pol.serving_state_dict())
    out["same_decisions"] = decisions(a, 0) == decisions(b, 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="384,64", help="context widths (the feature width is one more)")
    ap.add_argument("--models", type=int, default=11)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = [bench(int(d), args) for d in args.dims.split(",")]
    print(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "cpus": os.cpu_count(),
                    "blas_threads": 1,
                },
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
