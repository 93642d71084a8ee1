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
    """min(n, the split's size) distinct prompts from the test split of the log the replay models answer from
    (the routed phase cycles over them for n requests); `max_chars` cuts each one short (short prompts make
    the embedder cheap, so the serving chain's overhead shows)."""
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

    from banditrouter.embeddings import Embedder, embedder_device

    threads = embedder_threads(cfg)
    torch.set_num_threads(threads)
    # the backend and device the embedder deployment runs, so routed / raw compares like with like
    device = embedder_device(cfg.embedder)
    emb = Embedder(
        device=device, batch_size=cfg.embedder.batch_size, cache=False, backend=cfg.embedder.backend, num_threads=threads
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
    return {"raw_embedder_rps": rps, "single_embed_p50_ms": 1e3 * float(np.median(lat)), "embedder_device": device}


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


def routed(cfg: AppConfig, prompts: list[str], requests: int, concurrency: int, warmup: int = 50, unloaded: int = 0) -> dict:
    """The loaded run (`requests` at `concurrency`), then `unloaded` requests one at a time on the same app
    (target: routing overhead with nothing queued), reported under `unloaded_*`. The replay replicas' indexes
    must be in the embedding cache beforehand (`banditrouter bench` warms them once, before every phase), or
    they are built under load."""
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
    init_local_ray(log_to_driver=False, proxy=cfg.server.proxy)
    try:
        serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
        serve.run(build_app(cfg), name="banditrouter", route_prefix="/")
        url = f"http://{cfg.server.host}:{cfg.server.port}/v1/chat/completions"
        with tqdm(total=warmup, desc="warm-up", disable=None) as bar:
            asyncio.run(_drive(url, prompts[::-1], warmup, min(concurrency, warmup), bar))
        embedder = serve.get_deployment_handle("embedder", app_name="banditrouter")
        before = embedder.stats.remote().result()
        with tqdm(total=requests, desc="routed requests", disable=None) as bar:
            result = asyncio.run(_drive(url, prompts, requests, concurrency, bar))
        after = embedder.stats.remote().result()
        batches = after["batches"] - before["batches"]
        result["embedder_mean_batch_size"] = (after["prompts"] - before["prompts"]) / batches if batches else None
        result["embedder_busy_share"] = (after["busy_s"] - before["busy_s"]) / result["routed_wall_s"]
        prompts_in = after["prompts"] - before["prompts"]
        # handle calls the embedder took per prompt: 1 without router.coalesce_embeds, less with it
        result["embedder_calls_per_prompt"] = (after["calls"] - before["calls"]) / prompts_in if prompts_in else None
        if unloaded:
            with tqdm(total=unloaded, desc="unloaded (concurrency 1)", disable=None) as bar:
                one = asyncio.run(_drive(url, prompts, unloaded, 1, bar))
            result.update({f"unloaded_{k.removeprefix('routed_')}": v for k, v in one.items() if k != "routed_models"})
        return result
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def learner_absorb(cfg: AppConfig, checkpoint: Path, samples: int = 1600, seed: int = 0) -> dict:
    """Samples per second the learner absorbs at its smallest batches, the worst case for keeping up: each
    cycle the buffer takes `learning.batch_size` decisions and their feedback (appended as a router and the
    ingress would), and the learner reads them, updates (BaRP: plus `learning.replay_steps` replay steps),
    serialises the weights it publishes (what `ray.put` pickles) and commits to its state dir, as the learner
    actor's step does. One thread, no Ray, fresh temporary state."""
    import pickle
    import tempfile

    from banditrouter.policies import load_checkpoint
    from banditrouter.schemas import DecisionEvent
    from learner.buffer import EventBuffer
    from learner.core import Learner, LearnerSettings

    lc = cfg.learning
    policy = load_checkpoint(checkpoint)
    rng = np.random.default_rng(seed)
    batch = lc.batch_size
    n = max(batch, samples - samples % batch)
    x = rng.normal(size=(n, policy.context_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    arms = rng.integers(0, len(policy.models), size=n)
    events = [
        DecisionEvent(
            decision_id=f"d{i}",
            request_id=f"r{i}",
            model=policy.models[arms[i]],
            arm=int(arms[i]),
            propensity=float(rng.uniform(0.05, 1.0)),
            policy=policy.name,
            policy_version=0,
            preference=(0.7, 0.3),
            context=x[i].tolist(),
            context_ref=None,
            cost_usd=float(rng.uniform(1e-5, 1e-2)),
            latency_s=0.5,
            pool_version="bench",
        ).to_dict()
        for i in range(n)
    ]
    scores = rng.integers(0, 2, size=n).astype(float)
    settings = LearnerSettings(
        batch_size=batch, max_wait_s=lc.max_wait_s, replay_steps=lc.replay_steps, replay_relabel=lc.replay_relabel
    )
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        buf = EventBuffer(Path(tmp) / "events.sqlite")
        learner = Learner(policy, Path(tmp) / "learner", settings)
        t_buffer = t_learner = 0.0
        for start in range(0, n, batch):
            t = time.perf_counter()
            buf.append_decisions(events[start : start + batch])
            for i in range(start, start + batch):
                buf.add_feedback(f"d{i}", scores[i], f"f{i}")
            t_buffer += time.perf_counter() - t
            t = time.perf_counter()
            learner.consume(buf.log.read(learner.read_after(), 2000))
            if learner.update(commit=False) is not None:
                pickle.dumps(policy.serving_state_dict(), protocol=5)
                learner.commit()
            t_learner += time.perf_counter() - t
        learned = learner.counts["samples"]
        replay = lc.replay_steps if learner._uses_replay else 0
    return {
        "policy": policy.name,
        "context_dim": policy.context_dim,
        "batch_size": batch,
        "replay_steps": replay,
        "samples": int(learned),
        "learner_samples_per_s": learned / t_learner,
        "buffer_samples_per_s": n / t_buffer,
    }


def run_bench(
    cfg: AppConfig,
    requests: int,
    concurrency: int,
    out: Path | None,
    seed: int = 0,
    max_chars: int | None = None,
    unloaded: int = 0,
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
    # the single-prompt embedding p50 over the same prompts the unloaded phase sends (the first `unloaded`)
    result.update(raw_embedder(cfg, prompts, single=unloaded or 100))
    result.update(routed(cfg, prompts, requests, concurrency, unloaded=unloaded))
    result["ratio"] = result["routed_rps"] / result["raw_embedder_rps"]
    if unloaded and result.get("unloaded_p50_ms") is not None:
        result["unloaded_p50_over_embed_p50"] = result["unloaded_p50_ms"] / result["single_embed_p50_ms"]
        result["unloaded_added_ms"] = result["unloaded_p50_ms"] - result["single_embed_p50_ms"]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


SUITE_TARGETS = {
    "short_prompts_ratio": 0.60,
    "routerbench_ratio": 0.85,
    "unloaded_p50_over_embed_p50": 2.0,
    "unloaded_short_p50_over_embed_p50": 2.0,
    "learner_over_routed": 2.0,
}
"""Issue 13's bars: the two throughput ratios and the learner's margin are floors, the unloaded latency
ratios (RouterBench prompts and 200-character prompts) ceilings."""
CEILINGS = frozenset({"unloaded_p50_over_embed_p50", "unloaded_short_p50_over_embed_p50"})


def run_suite(
    cfg: AppConfig,
    out: Path,
    *,
    learner_config: AppConfig | None = None,
    short_requests: int = 2000,
    full_requests: int = 1000,
    concurrency: int = 16,
    unloaded: int = 200,
    seed: int = 0,
) -> dict:
    """`make bench`: every target of the routing-overhead work in one run, each phase with fresh state.

    1. 200-character prompts at `concurrency`, then `unloaded` of them one at a time;
    2. RouterBench test prompts as they are, the same;
    3. the learner's absorb rate (`learner_absorb`) for the policies of `learner_config` (default: BaRP
       and LinUCB checkpoints beside the configured one), against the routed throughput of run 2.
    Writes `out` (all figures) and returns the summary of ratios against `SUITE_TARGETS`."""
    short = run_bench(cfg, short_requests, concurrency, None, seed, 200, unloaded=unloaded)
    full = run_bench(cfg, full_requests, concurrency, None, seed, None, unloaded=unloaded)
    lcfg = learner_config or cfg
    folder = cfg.policy.checkpoint.parent
    learners = [
        learner_absorb(lcfg, folder / f"{name}.pt", seed=seed) for name in ("barp", "linucb") if (folder / f"{name}.pt").exists()
    ]
    slowest = min((r["learner_samples_per_s"] for r in learners), default=None)
    summary = {
        "short_prompts_ratio": short["ratio"],
        "routerbench_ratio": full["ratio"],
        "unloaded_p50_over_embed_p50": full["unloaded_p50_over_embed_p50"],
        "unloaded_added_ms": full["unloaded_added_ms"],
        "unloaded_short_p50_over_embed_p50": short["unloaded_p50_over_embed_p50"],
        "unloaded_short_added_ms": short["unloaded_added_ms"],
        "learner_over_routed": None if slowest is None else slowest / full["routed_rps"],
    }
    # a figure the run could not measure (no BaRP/LinUCB checkpoint for the learner) is not met
    met = {
        k: v is not None and (v <= SUITE_TARGETS[k] if k in CEILINGS else v >= SUITE_TARGETS[k])
        for k, v in summary.items()
        if k in SUITE_TARGETS
    }
    result = {
        "summary": summary,
        "targets": SUITE_TARGETS,
        "met": met,
        "short_prompts": short,
        "routerbench": full,
        "learner": learners,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
