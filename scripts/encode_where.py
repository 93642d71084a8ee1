"""Where the embedder replica's encode loses speed against the bench's in-process raw half; prints JSON.

On RouterBench prompts the embedder replica is busy encoding nearly all of a routed phase, yet routes 9-20% below
the raw half (README, "The embedder alone on a core"). Three in-process checks, torch on the CPU with one thread
(as the replica), over RouterBench test prompts as `banditrouter bench` picks them:

- `batches`: one `Embedder.encode` call over all the prompts (the raw half's way) against random batches of k
  (the routed way: a coalesced list is about five prompts);
- `thread`: batches of five encoded on the main thread against `asyncio.to_thread` (the replica's long prompts);
- `interferer`: this process pinned to CPU 0 while a busy loop runs pinned to CPU 1 (`python`: a pure-Python
  spin; `matmul`: numpy float32 matmuls), against CPU 1 idle.

    .venv/bin/python scripts/encode_where.py                       # all three, 2 rounds
    .venv/bin/python scripts/encode_where.py --checks batches --prompts 240

Wall-clock rates on a shared machine: compare rows of one run, and rerun before trusting a gap of a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np

SPIN = {
    "python": "import time\nt = time.time()\nwhile time.time() - t < 600: pass",
    "matmul": "import time, numpy as np\na = np.random.rand(1500, 1500).astype(np.float32)\nt = time.time()\n"
    "while time.time() - t < 600: a @ a",
}


def rate(emb, prompts: list[str], k: int, rng) -> float:
    t0 = time.perf_counter()
    if k == 0:
        emb.encode(prompts)
    else:
        order = rng.permutation(len(prompts))
        for i in range(0, len(prompts), k):
            emb.encode([prompts[j] for j in order[i : i + k]])
    return round(len(prompts) / (time.perf_counter() - t0), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--prompts", type=int, default=120, help="RouterBench test prompts per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checks", default="batches,thread,interferer")
    args = ap.parse_args()
    checks = set(args.checks.split(","))
    if "interferer" in checks and len(os.sched_getaffinity(0)) < 2:
        sys.exit("the interferer check needs two CPUs (this process and the busy loop each pinned to one)")

    import torch

    from banditrouter.bench import bench_prompts
    from banditrouter.config import load_config
    from banditrouter.embeddings import Embedder

    torch.set_num_threads(1)
    prompts = bench_prompts(load_config(args.config), args.prompts)
    emb = Embedder(device="cpu", batch_size=32, cache=False, backend="torch", num_threads=1)
    emb.encode(prompts[:8])  # load and warm up
    rng = np.random.default_rng(0)
    out: dict = {"prompts": len(prompts), "prompts_per_s": {}}
    rows = out["prompts_per_s"]
    for _ in range(args.rounds):
        if "batches" in checks:
            for k in (0, 5, 10, 16):
                rows.setdefault("one call" if k == 0 else f"random batches of {k}", []).append(rate(emb, prompts, k, rng))
        if "thread" in checks:
            rows.setdefault("batches of 5, main thread", []).append(rate(emb, prompts, 5, rng))
            rows.setdefault("batches of 5, asyncio.to_thread", []).append(
                asyncio.run(asyncio.to_thread(rate, emb, prompts, 5, rng))
            )
        if "interferer" in checks:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})
            try:
                rows.setdefault(f"pinned to CPU {cpus[0]}, CPU {cpus[1]} idle", []).append(rate(emb, prompts, 0, rng))
                for name, code in SPIN.items():
                    spin = subprocess.Popen(["taskset", "-c", str(cpus[1]), sys.executable, "-c", code])
                    try:
                        time.sleep(1.0)
                        rows.setdefault(f"pinned to CPU {cpus[0]}, {name} loop on CPU {cpus[1]}", []).append(
                            rate(emb, prompts, 0, rng)
                        )
                    finally:
                        spin.kill()
                        spin.wait()
            finally:
                os.sched_setaffinity(0, set(cpus))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
