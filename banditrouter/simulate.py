"""`banditrouter simulate`: the closed loop through the real HTTP API.

Sends a split's prompts (shuffled, cycled) with a preference drawn per request, posts as feedback the
logged score of the chosen model only (bandit feedback), and with `retrials` lets unsatisfied simulated
users ask again (probability 1 / (1 + exp(k (score - 0.5))) ). Writes `online.json` (per window of 100
requests: mean reward, accuracy, cost, policy versions in use, learner staleness; plus staleness_p95_s and
the learner's latest checkpoint) and `online.png`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from banditrouter.reward import sample_preferences


@dataclass
class Outcome:
    k: int
    done: float
    w_cost: float
    model: str
    version: int
    score: float
    cost: float
    reward: float
    latency_s: float
    retrial: bool
    feedback: int


class SimulationError(RuntimeError):
    pass


async def _simulate(
    url: str,
    log,
    requests: int,
    concurrency: int,
    retrials: bool,
    seed: int,
    sampler: str,
    n_users: int,
    retry_steepness: float,
    progress,
) -> tuple[list[Outcome], dict[str, int]]:
    import aiohttp

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(log))
    prefs = sample_preferences(requests, rng, sampler)
    model_index = {m: j for j, m in enumerate(log.models)}
    outcomes: list[Outcome] = []
    failures: dict[str, int] = {}
    next_k = 0
    tau_box: dict[str, float] = {}

    async def call(session, k: int, i: int, user: str, retrial: bool) -> None:
        wq, wc = float(prefs[k][0]), float(prefs[k][1])
        body = {
            "model": "router",
            "messages": [{"role": "user", "content": log.prompts[i]}],
            "user": user,
            "routing": {"preference": {"quality": wq, "cost": wc}},
        }
        t0 = time.perf_counter()
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    failures[str(resp.status)] = failures.get(str(resp.status), 0) + 1
                    return
            routing = data["routing"]
            latency = time.perf_counter() - t0
            q = float(log.scores[i, model_index[routing["model"]]])
            cost = float(routing["cost_usd"] or 0.0)
            fb_status = 0
            if math.isfinite(q):
                async with session.post(f"{url}/v1/feedback", json={"decision_id": routing["decision_id"], "score": q}) as fb:
                    fb_status = fb.status
                    await fb.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as e:
            failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            return
        r = wq * q - wc * min(cost / tau_box["tau"], 1.0) if math.isfinite(q) else float("nan")
        outcomes.append(
            Outcome(k, time.time(), wc, routing["model"], int(routing["policy_version"]), q, cost, r, latency, retrial, fb_status)
        )
        if retrials and not retrial and math.isfinite(q):
            p_retry = 1.0 / (1.0 + math.exp(retry_steepness * (q - 0.5)))
            if rng.random() < p_retry:  # the unsatisfied user asks the same question again
                await call(session, k, i, user, True)

    async def worker(session):
        nonlocal next_k
        while next_k < requests:
            k = next_k
            next_k += 1
            await call(session, k, int(order[k % len(order)]), f"user-{k % n_users}", False)
            progress.update(1)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2), timeout=timeout) as session:
        async with session.get(f"{url}/health") as resp:
            health = await resp.json()
        if not health.get("learning"):
            raise SimulationError(f"{url} does not learn online (its config has learning.enabled: false)")
        if set(health["models"]) - set(log.models):
            raise SimulationError(f"the service routes to models not in {log.name}: {set(health['models']) - set(log.models)}")
        tau_box["tau"] = float(health["tau"])
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return outcomes, failures


def _get(url: str, path: str, method: str = "GET") -> dict:
    import requests as http

    resp = http.request(method, f"{url}{path}", timeout=60)
    resp.raise_for_status()
    return resp.json()


def windows(outcomes: list[Outcome], installs: list[dict], size: int = 100) -> list[dict]:
    firsts = [o for o in sorted(outcomes, key=lambda o: o.done) if not o.retrial]
    out = []
    for start in range(0, len(firsts), size):
        w = firsts[start : start + size]
        t0, t1 = w[0].done, w[-1].done
        st = [i["staleness_s"] for i in installs if t0 <= i["time"] <= t1 and i["staleness_s"] is not None]
        out.append(
            {
                "requests": [start, start + len(w)],
                "mean_reward": float(np.nanmean([o.reward for o in w])),
                "accuracy": float(np.nanmean([o.score for o in w])),
                "mean_cost": float(np.mean([o.cost for o in w])),
                "policy_versions": sorted({o.version for o in w}),
                "staleness_p50_s": float(np.median(st)) if st else None,
                "staleness_max_s": float(np.max(st)) if st else None,
            }
        )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = result["windows"]
    x = [w["requests"][1] for w in ws]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    r = np.array([w["mean_reward"] for w in ws], dtype=float)
    axes[0].plot(x, r, marker="o", ms=3, alpha=0.45, label="per 100 requests")
    k = min(5, len(r))  # each window draws its own preferences: the rolling mean shows the trend
    if k > 1:
        axes[0].plot(
            x[k - 1 :], np.convolve(r, np.ones(k) / k, mode="valid"), lw=2.2, color="tab:blue", label=f"mean of last {k * 100}"
        )
    if result.get("reference_reward") is not None:
        axes[0].axhline(result["reference_reward"], color="grey", ls="--", label="offline reference")
    axes[0].legend()
    axes[0].set(title="mean reward while serving (exploring)", xlabel="requests", ylabel="w_q q - w_c c~")
    axes[1].plot(x, [w["accuracy"] for w in ws], marker="o", ms=3, color="tab:green")
    axes[1].set(title="accuracy (logged score of the chosen model)", xlabel="requests")
    axes[2].plot(x, [w["mean_cost"] for w in ws], marker="o", ms=3, color="tab:red")
    axes[2].set(title="mean cost per request (USD)", xlabel="requests")
    fig.suptitle(f"online learning: {result['policy']} ({'cold start' if result['cold_start'] else 'warm'}), {result['url']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_simulation(
    url: str,
    dataset: str,
    split: str,
    requests: int,
    concurrency: int,
    out: Path,
    *,
    retrials: bool = False,
    cold_start: bool = False,
    seed: int = 0,
    sampler: str = "uniform",
    n_users: int = 1000,
    retry_steepness: float = 6.0,
    data_dir=None,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    from banditrouter.data import load_dataset

    url = url.rstrip("/")
    log = load_dataset(dataset, split, data_dir=data_dir)
    start_version = None
    if cold_start:
        start_version = _get(url, "/v1/learner/reset", "POST")["version"]
        time.sleep(1.0)  # routers install the fresh policy (long-poll push)
    t0 = time.time()
    with tqdm(total=requests, desc="simulated requests", disable=None if progress else True) as bar:
        outcomes, failures = asyncio.run(
            _simulate(url, log, requests, concurrency, retrials, seed, sampler, n_users, retry_steepness, bar)
        )
    wall = time.time() - t0
    # let the learner consume the tail of the log before reading its figures
    for _ in range(100):
        stats = _get(url, "/v1/learner/stats")
        if stats["learner"]["seen"] >= stats["buffer"]["last_seq"] and stats["learner"]["waiting_samples"] == 0:
            break
        time.sleep(0.2)
    stats["learner"] = _get(url, "/v1/learner/flush", "POST")  # final commit + checkpoint export
    firsts = [o for o in outcomes if not o.retrial]
    result = {
        "url": url,
        "dataset": dataset,
        "split": split,
        "requests": requests,
        "concurrency": concurrency,
        "retrials": retrials,
        "cold_start": cold_start,
        "start_version": start_version,
        "seed": seed,
        "preference_sampler": sampler,
        "policy": stats["learner"]["policy"],
        "wall_s": wall,
        "completed": len(firsts),
        "retried": sum(o.retrial for o in outcomes),
        "failed": failures,
        "failed_fraction": sum(failures.values()) / max(1, requests),
        "feedback_status": {str(s): sum(o.feedback == s for o in outcomes) for s in sorted({o.feedback for o in outcomes})},
        "mean_reward": float(np.nanmean([o.reward for o in firsts])) if firsts else None,
        "staleness_p50_s": stats["learner"]["staleness_p50_s"],
        "staleness_p95_s": stats["learner"]["staleness_p95_s"],
        "checkpoint": stats["learner"]["checkpoint"],
        "learner": stats["learner"],
        "buffer": stats["buffer"],
        "windows": windows(outcomes, _get(url, "/v1/learner/installs")["installs"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "online.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "outcomes.jsonl").write_text("".join(json.dumps(asdict(o)) + "\n" for o in outcomes))
    plot(result, out / "online.png")
    return result
