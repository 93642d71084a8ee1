"""`banditrouter simulate`: the loop through the real HTTP API, closed or open.

Closed loop (default): `concurrency` workers send a split's prompts (shuffled, cycled) with a preference
drawn per request, post as feedback the logged score of the chosen model only (bandit feedback), and with
`retrials` let unsatisfied simulated users ask again (probability 1 / (1 + exp(k (score - 0.5))) ). Writes
`online.json` (per window of 100 requests: mean reward, accuracy, cost, policy versions in use, learner
staleness; plus staleness_p95_s and the learner's latest checkpoint) and `online.png`.

Open loop (`rate`, issue 10 §4): requests arrive as a Poisson process at `rate` per second whatever the
service does, so a backlog forms when the service is slower (concurrency no longer bounds the load). With
`retrials`, each original request is a conversation of its own user (user id per original request, so the
buffer's per-user state is exercised): a simulated user is satisfied with probability equal to the logged
score of the model that answered (a Bernoulli draw); an unsatisfied user re-sends the same conversation
(same messages, same user, no assistant turn: a regenerate) after a short random delay inside the retrial
window, up to `max_retries` times; a 503, a 5xx or no answer within `patience_s` counts as unsatisfied too.
No explicit feedback is posted unless asked (`feedback=True`): the learner sees only the implicit signals.
Writes `online.json` with the retrial rate per window of 500 original requests (the share of requests whose
user re-sent them), the queue length over time (from each answer's `routing.queue_length`, the router's
count of other waiting requests at decision), 503 counts and staleness, and `online.png`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
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
    feedback: bool = True,
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
            if feedback and math.isfinite(q):
                async with session.post(
                    f"{url}/v1/feedback", json={"decision_id": routing["decision_id"], "score": q, "user": user}
                ) as fb:
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
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency * 2), timeout=timeout, headers=_auth()
    ) as session:
        health = await _check_service(session, url, log)
        tau_box["tau"] = float(health["tau"])
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return outcomes, failures


API_KEY_ENV = "BANDITROUTER_API_KEY"
"""A deployment with API keys (gateway.auth.mode: keys) needs an admin key here: simulate reads /health's full
answer, resets and flushes the learner."""


def _auth() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    return {"authorization": f"Bearer {key}"} if key else {}


async def _check_service(session, url: str, log) -> dict:
    """GET /health; refuse a service that does not learn online or routes to models the log lacks."""
    async with session.get(f"{url}/health") as resp:
        health = await resp.json()
    if "models" not in health:  # /health says only {"status": "ok"} to callers without the admin scope
        raise SimulationError(f"{url} needs an admin API key for simulate: set {API_KEY_ENV}")
    if not health.get("learning"):
        raise SimulationError(f"{url} does not learn online (its config has learning.enabled: false)")
    if set(health["models"]) - set(log.models):
        raise SimulationError(f"the service routes to models not in {log.name}: {set(health['models']) - set(log.models)}")
    return health


def _get(url: str, path: str, method: str = "GET") -> dict:
    import requests as http

    # state-changing routes take JSON only (the gateway refuses other content types: 415)
    resp = http.request(method, f"{url}{path}", timeout=60, headers=_auth(), **({"json": {}} if method == "POST" else {}))
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


# ---------------------------------------------------------------------------------------------------------
# open loop: Poisson arrivals, simulated users who re-send what did not satisfy them
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrialUsers:
    """How simulated users behave in the open loop [ours]."""

    max_retries: int = 3
    """Re-sends per original request at most (after that the user gives up)."""
    delay_s: tuple[float, float] = (0.5, 2.0)
    """An unsatisfied user re-sends after a delay drawn uniformly from this range (keep it inside the
    service's retrial window, `learning.retrial_window_s`, or the re-send is not a retrial)."""
    patience_s: float = 30.0
    """No answer within this (client timeout) counts as unsatisfied: the user re-sends."""

    def __post_init__(self) -> None:
        lo, hi = self.delay_s
        if self.max_retries < 0 or not (0 <= lo <= hi) or not self.patience_s > 0:
            raise SimulationError(
                f"max_retries >= 0, 0 <= delay low <= high and patience > 0 needed, got {self.max_retries}, "
                f"{self.delay_s}, {self.patience_s}"
            )


@dataclass
class Attempt:
    """One HTTP request of an open-loop conversation."""

    k: int
    """The original request (conversation) it belongs to, in arrival order."""
    attempt: int
    """0: the original; 1, 2, ...: re-sends of the same conversation."""
    sent: float
    done: float
    status: int
    """HTTP status; 0 when no answer came (client timeout after `patience_s`, connection error)."""
    model: str | None
    version: int | None
    score: float | None
    """The logged score of the model that answered (None: no answer, or no logged score)."""
    satisfied: bool
    queue_length: int | None
    """Other requests waiting in the router replica when this one was decided (`routing.queue_length`)."""
    queue_wait_s: float | None
    retry_after: str | None
    """The 503's Retry-After header."""
    feedback: int = 0


async def _open_loop(
    url: str,
    log,
    requests: int,
    rate: float,
    retrials: bool,
    feedback: bool,
    seed: int,
    prefs: np.ndarray,
    users: RetrialUsers,
    progress,
) -> tuple[list[Attempt], list[list[float]], list[float], dict]:
    import aiohttp

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(log))
    gaps = rng.exponential(1.0 / rate, size=requests)
    model_index = {m: j for j, m in enumerate(log.models)}
    attempts: list[Attempt] = []
    outstanding = {"n": 0}
    samples: list[list[float]] = []  # [t, outstanding HTTP requests] every second: the backlog the users see
    arrivals: list[float] = []

    async def send(session, k: int, n: int, i: int, user: str) -> Attempt:
        wq, wc = float(prefs[k][0]), float(prefs[k][1])
        body = {
            "model": "router",
            "messages": [{"role": "user", "content": log.prompts[i]}],  # a regenerate: the same conversation
            "user": user,
            "routing": {"preference": {"quality": wq, "cost": wc}},
        }
        sent, status, data, retry_after = time.time(), 0, None, None
        outstanding["n"] += 1
        try:
            async with session.post(
                f"{url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=users.patience_s)
            ) as resp:
                status, retry_after = resp.status, resp.headers.get("Retry-After")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            status = 0
        finally:
            outstanding["n"] -= 1
        a = Attempt(k, n, sent, time.time(), status, None, None, None, False, None, None, retry_after)
        if status == 200 and isinstance(data, dict) and isinstance(data.get("routing"), dict):
            r = data["routing"]
            a.model, a.version = r.get("model"), r.get("policy_version")
            a.queue_length, a.queue_wait_s = r.get("queue_length"), r.get("queue_wait_s")
            q = float(log.scores[i, model_index[a.model]]) if a.model in model_index else float("nan")
            a.score = q if math.isfinite(q) else None
            if feedback and a.score is not None:
                try:
                    async with session.post(
                        f"{url}/v1/feedback", json={"decision_id": r["decision_id"], "score": a.score, "user": user}
                    ) as fb:
                        a.feedback = fb.status
                        await fb.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    a.feedback = 0
        return a

    async def conversation(session, k: int) -> None:
        crng = np.random.default_rng([seed, k])  # its own stream: the same outcomes give the same draws
        i, user = int(order[k % len(order)]), f"sim{seed}-u{k}"  # one user per original request
        for n in range(users.max_retries + 1 if retrials else 1):
            a = await send(session, k, n, i, user)
            if a.score is not None:
                a.satisfied = bool(crng.random() < a.score)  # a Bernoulli draw on the logged score
            attempts.append(a)
            if a.satisfied or not retrials or n == users.max_retries:
                break
            await asyncio.sleep(float(crng.uniform(*users.delay_s)))
        progress.update(1)

    async def sampler(t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append([time.time() - t0, float(outstanding["n"])])
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout, headers=_auth()) as session:
        health = await _check_service(session, url, log)
        t0, stop = time.time(), asyncio.Event()
        watch = asyncio.create_task(sampler(t0, stop))
        tasks, start, due = [], time.monotonic(), 0.0
        for k in range(requests):
            due += float(gaps[k])
            delay = start + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            arrivals.append(time.time() - t0)
            tasks.append(asyncio.create_task(conversation(session, k)))
        await asyncio.gather(*tasks)
        stop.set()
        await watch
    return attempts, samples, arrivals, health


def retrial_windows(attempts: list[Attempt], size: int = 500) -> list[dict]:
    """Per window of `size` original requests (arrival order): the retrial rate (the share whose user re-sent
    them, for any reason: unsatisfied, 503, no answer), how the first answers went, and the 503s."""
    by_k: dict[int, list[Attempt]] = {}
    for a in attempts:
        by_k.setdefault(a.k, []).append(a)
    ks = sorted(by_k)
    out = []
    for start in range(0, len(ks), size):
        convs = [sorted(by_k[k], key=lambda a: a.attempt) for k in ks[start : start + size]]
        firsts = [c[0] for c in convs]
        every = [a for c in convs for a in c]
        answered = [a for a in firsts if a.status == 200]
        models: dict[str, int] = {}
        for a in answered:
            models[a.model or "?"] = models.get(a.model or "?", 0) + 1
        versions = [a.version for a in every if a.version is not None]
        out.append(
            {
                "requests": [start, start + len(convs)],
                "retrial_rate": float(np.mean([len(c) > 1 for c in convs])),
                "first_answer_satisfied": float(np.mean([a.satisfied for a in firsts])),
                "first_answer_mean_score": float(np.mean([a.score for a in answered if a.score is not None]))
                if answered
                else None,
                "gave_up": float(np.mean([not c[-1].satisfied for c in convs])),
                "attempts": len(every),
                "status_503": sum(a.status == 503 for a in every),
                "no_answer": sum(a.status == 0 for a in every),
                "first_answer_models": dict(sorted(models.items(), key=lambda kv: -kv[1])),
                "policy_versions": [min(versions), max(versions)] if versions else None,
            }
        )
    return out


def queue_over_time(attempts: list[Attempt], samples: list[list[float]], t0: float, bin_s: float = 10.0) -> list[dict]:
    """Per `bin_s` of the run: the router's queue length at decision (mean, max over the answers decided
    then), the mean queue wait, the users' outstanding requests (max of the per-second samples), 503s."""
    end = max([a.done - t0 for a in attempts] + [s[0] for s in samples] + [0.0])
    out = []
    for b in range(int(end // bin_s) + 1):
        lo, hi = b * bin_s, (b + 1) * bin_s
        done = [a for a in attempts if lo <= a.done - t0 < hi]
        ql = [a.queue_length for a in done if a.queue_length is not None]
        qw = [a.queue_wait_s for a in done if a.queue_wait_s is not None]
        out_n = [n for t, n in samples if lo <= t < hi]
        out.append(
            {
                "t": [lo, hi],
                "answered": sum(a.status == 200 for a in done),
                "queue_length_mean": float(np.mean(ql)) if ql else None,
                "queue_length_max": int(max(ql)) if ql else None,
                "queue_wait_mean_s": float(np.mean(qw)) if qw else None,
                "outstanding_max": int(max(out_n)) if out_n else None,
                "status_503": sum(a.status == 503 for a in done),
            }
        )
    return out


def plot_retrials(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    w100 = result["windows_100"]
    x = [w["requests"][1] for w in w100]
    axes[0].plot(x, [w["retrial_rate"] for w in w100], marker="o", ms=3, alpha=0.5, label="per 100 requests")
    for j, w in enumerate(result["windows"]):
        axes[0].hlines(w["retrial_rate"], *w["requests"], lw=2.2, color="tab:orange", label="per 500" if j == 0 else None)
    axes[0].set(title="retrial rate (share of requests re-sent)", xlabel="original requests", ylim=(0, None))
    axes[0].legend()
    q = result["queue"]
    t = [b["t"][1] for b in q]

    def series(key):
        return [b[key] if b[key] is not None else np.nan for b in q]

    axes[1].plot(t, series("queue_length_max"), label="router pool: max")
    axes[1].plot(t, series("queue_length_mean"), label="router pool: mean")
    axes[1].plot(t, series("outstanding_max"), alpha=0.6, label="users waiting: max")
    axes[1].set(title="queue length at decision (per 10 s)", xlabel="seconds", ylim=(0, None))
    axes[1].legend()
    axes[2].bar(t, [b["status_503"] for b in q], width=8, color="tab:red")
    axes[2].set(title="503 answers (per 10 s)", xlabel="seconds")
    fig.suptitle(
        f"{result['policy']} live, open loop {result['rate']:g}/s, {result['requests']} requests, no explicit feedback"
        if not result["feedback"]
        else f"{result['policy']} live, open loop {result['rate']:g}/s, {result['requests']} requests"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _learner_settled(url: str) -> dict:
    """Let the learner consume the tail of the log, then flush (final commit + checkpoint export)."""
    for _ in range(100):
        stats = _get(url, "/v1/learner/stats")
        if stats["learner"]["seen"] >= stats["buffer"]["last_seq"] and stats["learner"]["waiting_samples"] == 0:
            break
        time.sleep(0.2)
    stats["learner"] = _get(url, "/v1/learner/flush", "POST")
    return stats


def run_open_loop(
    url: str,
    dataset: str,
    split: str,
    requests: int,
    rate: float,
    out: Path,
    *,
    retrials: bool = True,
    feedback: bool | None = None,
    cold_start: bool = False,
    seed: int = 0,
    sampler: str = "uniform",
    w_cost: float | None = None,
    users: RetrialUsers = RetrialUsers(),
    data_dir=None,
    progress: bool = True,
) -> dict:
    """Open-loop simulation (module docstring); `feedback` None: posted only without `retrials`."""
    from tqdm import tqdm

    from banditrouter.data import load_dataset

    if not (math.isfinite(rate) and rate > 0):
        raise SimulationError(f"--rate must be a positive number of requests per second, got {rate}")
    feedback = (not retrials) if feedback is None else feedback
    url = url.rstrip("/")
    log = load_dataset(dataset, split, data_dir=data_dir)
    prefs = _preferences(requests, seed, sampler, w_cost)
    start_version = None
    if cold_start:
        start_version = _get(url, "/v1/learner/reset", "POST")["version"]
        time.sleep(1.0)  # routers install the fresh policy (long-poll push)
    t0 = time.time()
    with tqdm(total=requests, desc=f"open loop {rate:g}/s", disable=None if progress else True) as bar:
        attempts, samples, arrivals, health = asyncio.run(
            _open_loop(url, log, requests, rate, retrials, feedback, seed, prefs, users, bar)
        )
    wall = time.time() - t0
    stats = _learner_settled(url)
    windows500 = retrial_windows(attempts, 500)
    statuses: dict[str, int] = {}
    for a in attempts:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    ql = [a.queue_length for a in attempts if a.queue_length is not None]
    first, last = windows500[0]["retrial_rate"], windows500[-1]["retrial_rate"]
    result = {
        "mode": "open_loop",
        "url": url,
        "dataset": dataset,
        "split": split,
        "requests": requests,
        "rate": rate,
        "achieved_rate": (len(arrivals) - 1) / arrivals[-1] if len(arrivals) > 1 and arrivals[-1] > 0 else None,
        "retrials": retrials,
        "feedback": feedback,
        "users": {"max_retries": users.max_retries, "delay_s": list(users.delay_s), "patience_s": users.patience_s},
        "preference": {"w_cost": w_cost} if w_cost is not None else {"sampler": sampler},
        "cold_start": cold_start,
        "start_version": start_version,
        "seed": seed,
        "policy": health.get("policy"),
        "wall_s": wall,
        "attempts": len(attempts),
        "status_counts": statuses,
        "status_503": statuses.get("503", 0),
        "retrial_rate": _retried_share(attempts),
        "retrial_rate_first_500": first,
        "retrial_rate_last_500": last,
        "retrial_ratio_last_first": last / first if first else None,
        "queue_length_max": int(max(ql)) if ql else None,
        "queue_length_mean": float(np.mean(ql)) if ql else None,
        "outstanding_max": int(max(n for _, n in samples)) if samples else None,
        "staleness_p50_s": stats["learner"]["staleness_p50_s"],
        "staleness_p95_s": stats["learner"]["staleness_p95_s"],
        "checkpoint": stats["learner"]["checkpoint"],
        "learner": stats["learner"],
        "buffer": stats["buffer"],
        "windows": windows500,
        "windows_100": retrial_windows(attempts, 100),
        "queue": queue_over_time(attempts, samples, t0),
        "outstanding": samples,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "online.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "attempts.jsonl").write_text("".join(json.dumps(asdict(a)) + "\n" for a in attempts))
    plot_retrials(result, out / "online.png")
    return result


def _retried_share(attempts: list[Attempt]) -> float:
    """Over the whole run: the share of original requests whose user re-sent them."""
    retried = {a.k for a in attempts if a.attempt > 0}
    return len(retried) / max(1, len({a.k for a in attempts}))


def _preferences(n: int, seed: int, sampler: str, w_cost: float | None) -> np.ndarray:
    """Per request (w_quality, w_cost): a fixed one when `w_cost` is given, else drawn by `sampler`."""
    if w_cost is None:
        return sample_preferences(n, np.random.default_rng([seed, 1]), sampler)
    if not (math.isfinite(w_cost) and 0 <= w_cost <= 1):
        raise SimulationError(f"--w-cost must lie in [0, 1], got {w_cost}")
    return np.tile([1.0 - w_cost, w_cost], (n, 1))


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
    feedback: bool = True,
) -> dict:
    """Closed loop (module docstring); `feedback=False` posts no explicit score (implicit signals only)."""
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
            _simulate(url, log, requests, concurrency, retrials, seed, sampler, n_users, retry_steepness, bar, feedback)
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
        "feedback": feedback,
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
