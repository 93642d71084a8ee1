"""`banditrouter bench`: how much of the raw embedder's throughput survives the routed HTTP path.

One run, the same prompts for both halves:
1. the raw embedder in this process, with the thread count the embedder replica gets (before Ray starts,
   so nothing competes with it): batched throughput and single-prompt latency;
2. the app from the config on a local Ray (127.0.0.1), replay backends with simulated latency off, driven
   over HTTP by `concurrency` concurrent clients: routed throughput and p50/p99 latency.

`ratio = routed_rps / raw_embedder_rps`: the embedder is the one piece of real compute on the routed path,
so the ratio is the share of its capacity that the serving chain (proxy, ingress, router, model replicas,
and the load generator, all on this machine) leaves usable.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from banditrouter.config import AppConfig


def bench_prompts(cfg: AppConfig, n: int, seed: int = 0, max_chars: int | None = None) -> list[str]:
    """n distinct prompts from the test split of the log the replay models answer from; `max_chars` cuts
    each one short (short prompts make the embedder cheap, so the serving chain's overhead shows)."""
    from banditrouter.data import load_dataset

    replay = [m.replay for m in cfg.models if m.backend == "replay"]
    if not replay:
        raise ValueError("bench needs at least one replay model in the config (it supplies the prompts)")
    log = load_dataset(replay[0].dataset, "test", data_dir=replay[0].data_dir)
    idx = np.random.default_rng(seed).permutation(len(log))[: min(n, len(log))]
    return [log.prompts[i][:max_chars] if max_chars else log.prompts[i] for i in idx]


def embedder_threads(cfg: AppConfig) -> int:
    e = cfg.embedder
    return e.num_threads or max(1, int(e.ray_actor_options.get("num_cpus", 1) or 1))


def raw_embedder(cfg: AppConfig, prompts: list[str], single: int = 100) -> dict:
    import torch

    from banditrouter.embeddings import Embedder

    threads = embedder_threads(cfg)
    torch.set_num_threads(threads)
    # the same backend the embedder deployment runs (embedder.backend), so routed / raw compares like with like
    emb = Embedder(
        device="cpu", batch_size=cfg.embedder.batch_size, cache=False, backend=cfg.embedder.backend, num_threads=threads
    )
    emb.encode(prompts[:8])  # load and warm up
    t0 = time.perf_counter()
    emb.encode(prompts)
    rps = len(prompts) / (time.perf_counter() - t0)
    lat = []
    for p in prompts[:single]:
        t = time.perf_counter()
        emb.encode([p])
        lat.append(time.perf_counter() - t)
    return {"raw_embedder_rps": rps, "single_embed_p50_ms": 1e3 * float(np.median(lat))}


async def _drive(url: str, prompts: list[str], requests: int, concurrency: int, progress) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures: dict[str, int] = {}
    models: dict[str, int] = {}
    next_i = 0

    async def worker(session):
        nonlocal next_i
        while next_i < requests:
            i, next_i = next_i, next_i + 1
            body = {"model": "router", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
            t = time.perf_counter()
            try:
                async with session.post(url, json=body) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        failures[str(resp.status)] = failures.get(str(resp.status), 0) + 1
                    else:
                        latencies.append(time.perf_counter() - t)
                        m = json.loads(data)["model"]
                        models[m] = models.get(m, 0) + 1
            except aiohttp.ClientError as e:
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            progress.update(1)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return {
        "routed_rps": len(latencies) / wall,
        "routed_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "routed_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "routed_ok": len(latencies),
        "routed_failed": failures,
        "routed_models": dict(sorted(models.items(), key=lambda kv: -kv[1])),
        "routed_wall_s": wall,
    }


def routed(cfg: AppConfig, prompts: list[str], requests: int, concurrency: int, warmup: int = 50) -> dict:
    from ray import serve
    from tqdm import tqdm

    from banditrouter.ray_local import init_local_ray
    from deployments.app import build_app

    models = [
        m.model_copy(update={"replay": m.replay.model_copy(update={"simulate_latency": False})}) if m.replay else m
        for m in cfg.models
    ]
    # the chain is measured against the raw model: no embedding cache on the routed path either
    cfg = cfg.model_copy(update={"models": models, "embedder": cfg.embedder.model_copy(update={"cache": False})})
    init_local_ray(log_to_driver=False)
    try:
        serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
        serve.run(build_app(cfg), name="banditrouter", route_prefix="/")
        url = f"http://{cfg.server.host}:{cfg.server.port}/v1/chat/completions"
        with tqdm(total=warmup, desc="warm-up", disable=None) as bar:
            asyncio.run(_drive(url, prompts[::-1], warmup, min(concurrency, warmup), bar))
        with tqdm(total=requests, desc="routed requests", disable=None) as bar:
            return asyncio.run(_drive(url, prompts, requests, concurrency, bar))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def run_bench(
    cfg: AppConfig, requests: int, concurrency: int, out: Path | None, seed: int = 0, max_chars: int | None = None
) -> dict:
    prompts = bench_prompts(cfg, requests, seed, max_chars)
    result: dict = {
        "prompt_max_chars": max_chars,
        "prompt_mean_chars": float(np.mean([len(p) for p in prompts])),
        "requests": requests,
        "concurrency": concurrency,
        "distinct_prompts": len(prompts),
        "embedder_threads": embedder_threads(cfg),
        "embedder_batch_size": cfg.embedder.batch_size,
        "embedder_backend": cfg.embedder.backend,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    result.update(raw_embedder(cfg, prompts))
    result.update(routed(cfg, prompts, requests, concurrency))
    result["ratio"] = result["routed_rps"] / result["raw_embedder_rps"]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result
