"""Issue 12, live must-show 3: one API key with a `zcl` budget and one with a `hard` budget (the same budget, the
same short period) under the same open-loop traffic for one whole period, through the real HTTP API of the replay
app (in-process Ray, every socket on 127.0.0.1).

    flock /tmp/ray.lock timeout 600 .venv/bin/python scripts/live_pacing.py          # ~4.5 minutes
    flock /tmp/ray.lock timeout 600 .venv/bin/python scripts/live_pacing.py --rate 2 --period-range 120 150

Steps: train the policy (LinUCB by default) on the RouterBench train split restricted to a five-model pool, with
its pacing calibration (`banditrouter.pipeline.pacing_calibration`: L, U and the cost estimator, as
`banditrouter train` stores them); start the app; pick a "<N>s" period (N in --period-range) whose next
epoch-aligned start is a few seconds away and create the two keys then (the key store reloads its file every
2 s); the budget is what the unpaced policy would spend over the period divided by --overspend (its mean logged
cost per request on the test prompts x rate x N), so unpaced traffic spends --overspend times the budget. From
the period's start to its end each key gets Poisson arrivals at --rate per second: the request body of
`banditrouter simulate --rate` (the test prompts, shuffled; the config's default preference). simulate itself
sends with one key, needs an admin key and online learning on, so this script sends its traffic for two keys
itself. Every --poll-s seconds it reads GET /v1/budget for both keys (the ledger actor when the route is absent).

Writes <out>/pacing.json: the settings, the spend series of both keys, the zcl key's maximum deviation from the
straight line 0 -> budget over the period (USD and as a share of the budget), whether either key's spend ever
exceeded the budget, the time of each key's first 429 (seconds after the period's start; null: none), the models
each key was served, and <out>/spend_over_time.png (both keys and the straight line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL = ("gpt-4-1106-preview", "claude-v1", "gpt-3.5-turbo-1106", "mistralai/mixtral-8x7b-chat", "mistralai/mistral-7b-chat")
"""Five RouterBench models from dear to cheap (mean logged cost per call $0.005 ... $0.00008)."""
PORT = 8041
APP = "live-pacing"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="routerbench")
    ap.add_argument("--policy", default="linucb", help="policy trained for the run (its value estimate paces)")
    ap.add_argument("--rate", type=float, default=3.0, help="requests per second per key (Poisson)")
    ap.add_argument("--overspend", type=float, default=2.5, help="unpaced spend over the period / budget")
    ap.add_argument("--period-range", type=int, nargs=2, default=(150, 200), metavar=("MIN_S", "MAX_S"))
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--bins", type=int, default=48, help="pacing.bins: time bins per period")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs over the train split (LinUCB: 2 suffice)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse / write the trained policy here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "pacing")
    a = ap.parse_args(argv)
    lo, hi = a.period_range
    if not (10 <= lo <= hi):
        ap.error("--period-range needs 10 <= MIN_S <= MAX_S")
    if not (a.rate > 0 and math.isfinite(a.rate)) or not a.overspend > 0 or not a.poll_s > 0:
        ap.error("--rate, --overspend and --poll-s must be positive")
    return a


def prepare_policy(args):
    """Train on the train split (pool only) with the pacing calibration; the unpaced policy's mean cost per
    request on the test prompts at the default preference. Returns (checkpoint, test prompts, mean cost, cal)."""
    from banditrouter.config import Preference
    from banditrouter.pipeline import Split, load_split, pacing_calibration, train_one
    from banditrouter.policies import load_checkpoint, save_checkpoint
    from deployments.router import checkpoint_extra

    ckpt = args.checkpoint or ROOT / "checkpoints" / f"pacing-{args.policy}-{args.dataset}.pt"
    cal = checkpoint_extra(ckpt).get("pacing") if ckpt.exists() else None
    if cal is not None and tuple(load_checkpoint(ckpt).models) == POOL:
        pol = load_checkpoint(ckpt, expect=args.policy)
        print(f"reusing {ckpt} (delete it to retrain)")
    else:
        train = load_split(args.dataset, "train")
        train = Split(train.log.with_models(list(POOL)), train.contexts)
        pol = train_one(args.policy, train, seed=args.seed, epochs=args.epochs, progress=True)
        cal = {**pacing_calibration(pol, train), "tuning": f"{args.dataset}/train"}
        save_checkpoint(pol, ckpt, extra={"dataset": args.dataset, "split": "train", "pacing": cal})
    test = load_split(args.dataset, "test")
    log = test.log.with_models(list(POOL))
    pref = np.tile(np.asarray(Preference().as_tuple()), (len(log), 1))
    arms = np.asarray(pol.select(test.contexts, pref).arms)
    order = [log.models.index(m) for m in pol.models]
    costs = log.costs[np.arange(len(log)), np.asarray(order)[arms]]
    return ckpt, list(log.prompts), float(np.nanmean(costs)), cal


def pick_period(lo: int, hi: int, lead_s: float = 6.0) -> tuple[int, float]:
    """The N in [lo, hi] whose next epoch-aligned period start (at least `lead_s` from now) comes first."""
    now = time.time()
    best = min(range(lo, hi + 1), key=lambda n: math.ceil((now + lead_s) / n) * n)
    return best, float(math.ceil((now + lead_s) / best) * best)


async def run_traffic(args, keys: dict[str, str], prompts: list[str], start: float, end: float, budget_poll) -> dict:
    import aiohttp

    base = f"http://127.0.0.1:{PORT}"
    results = {name: [] for name in keys}
    polls = {name: [] for name in keys}

    async def send(session, name: str, key: str, text: str):
        t = time.time()
        body = {"model": "router", "messages": [{"role": "user", "content": text}]}
        try:
            async with session.post(f"{base}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as resp:
                data = await resp.json(content_type=None)
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            status, data, retry_after = 0, {"error": {"code": type(e).__name__}}, None
        rec = {"t": t - start, "done": time.time() - start, "status": status}
        if status == 200:
            r = data.get("routing", {})
            rec.update(model=r.get("model"), cost=r.get("cost_usd"), paced=r.get("paced"), z=r.get("pacing_z"))
            rec.update(eligible=r.get("eligible"), cheapest=r.get("fallback_cheapest"), allowed=r.get("allowed"))
        else:
            err = (data.get("error") or {}) if isinstance(data, dict) else {}
            rec.update(code=err.get("code"), message=err.get("message"), retry_after=retry_after)
        results[name].append(rec)

    async def key_load(session, name: str, key: str, seed: int):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(prompts))
        tasks, due, k = [], start, 0
        while True:
            due += float(rng.exponential(1.0 / args.rate))
            if due >= end:
                break
            await asyncio.sleep(max(0.0, due - time.time()))
            tasks.append(asyncio.create_task(send(session, name, key, prompts[order[k % len(order)]])))
            k += 1
        await asyncio.gather(*tasks)

    async def poller(session, stop: asyncio.Event):
        while not stop.is_set():
            for name, key in keys.items():
                try:
                    u = await budget_poll(session, name, key)
                    polls[name].append({"t": time.time() - start, **u})
                except Exception as e:  # noqa: BLE001 (a missed poll is a gap in the series, reported)
                    polls[name].append({"t": time.time() - start, "error": repr(e)})
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.poll_s)
            except asyncio.TimeoutError:
                pass

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.sleep(max(0.0, start - time.time()))
        stop = asyncio.Event()
        watch = asyncio.create_task(poller(session, stop))
        await asyncio.gather(*(key_load(session, n, k, args.seed + j) for j, (n, k) in enumerate(keys.items())))
        await asyncio.sleep(args.poll_s)  # the last settlements
        stop.set()
        await watch
    return {"requests": results, "polls": polls}


def analyse(run: dict, budget: float, period_s: int, max_request_cost: float) -> dict:
    out = {}
    for name, polls in run["polls"].items():
        ok = [p for p in polls if "spent" in p and 0 <= p["t"] <= period_s]
        t = np.array([p["t"] for p in ok])
        spent = np.array([p["spent"] for p in ok])
        line = budget * t / period_s
        reqs = run["requests"][name]
        s429 = [r for r in reqs if r["status"] == 429]
        served = [r for r in reqs if r["status"] == 200]
        # a 429 with Retry-After 1: the rest of the budget is reserved by requests in flight (they settle shortly);
        # any other 429: the budget is spent for the period
        held = [r for r in s429 if r.get("retry_after") == "1"]
        spent_out = [r for r in s429 if r.get("retry_after") != "1"]
        last_answer = max((r["t"] for r in served), default=None)
        models: dict[str, int] = {}
        for r in served:
            models[r["model"]] = models.get(r["model"], 0) + 1
        dev = spent - line
        out[name] = {
            "requests": len(reqs),
            "answered": len(served),
            "status_429": len(s429),
            "other_errors": sum(r["status"] not in (200, 429) for r in reqs),
            "first_429_s": min((r["t"] for r in s429), default=None),
            "status_429_held_by_in_flight": len(held),
            "status_429_spent": len(spent_out),
            "first_429_spent_s": min((r["t"] for r in spent_out), default=None),
            "last_answer_s": last_answer,
            "refused_from_s": min((r["t"] for r in s429 if last_answer is None or r["t"] > last_answer), default=None),
            "final_spent_usd": float(max((p["spent"] for p in polls if "spent" in p), default=0.0)),
            "sum_answered_cost_usd": float(sum(r["cost"] or 0.0 for r in served)),
            "ever_exceeded_budget": bool(any(p.get("spent", 0.0) > budget + 1e-9 for p in polls)),
            "max_deviation_usd": float(np.abs(dev).max()) if len(dev) else None,
            "max_deviation_share_of_budget": float(np.abs(dev).max() / budget) if len(dev) else None,
            "max_above_line_usd": float(dev.max()) if len(dev) else None,
            "max_below_line_usd": float(-dev.min()) if len(dev) else None,
            "models_served": dict(sorted(models.items(), key=lambda kv: -kv[1])),
            "paced_share": float(np.mean([bool(r.get("paced")) for r in served])) if served else None,
            "fallback_cheapest_share": float(np.mean([bool(r.get("cheapest")) for r in served])) if served else None,
            "polls_missed": sum("spent" not in p for p in polls),
        }
    out["max_request_cost_usd"] = max_request_cost
    return out


def plot(run: dict, budget: float, period_s: int, figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([0, period_s], [0, budget], "k--", lw=1.2, label="straight line 0 -> budget")
    ax.axhline(budget, color="grey", lw=0.8)
    colors = {"zcl": "tab:blue", "hard": "tab:red"}
    for name, polls in run["polls"].items():
        ok = [p for p in polls if "spent" in p and p["t"] <= period_s]  # later polls read the next period
        ax.plot([p["t"] for p in ok], [p["spent"] for p in ok], color=colors.get(name), lw=2, label=f"{name} key: spend")
        f429, gone = figures[name]["first_429_s"], figures[name]["refused_from_s"]
        if f429 is not None:
            ax.axvline(f429, color=colors.get(name), ls=":", lw=1.0, label=f"{name}: first 429 at {f429:.0f} s")
        if gone is not None:
            ax.axvline(gone, color=colors.get(name), ls="-.", lw=1.2, label=f"{name}: every request refused from {gone:.0f} s")
    ax.set(xlabel="seconds into the budget period", ylabel="spend (USD, settled)", xlim=(0, period_s * 1.02))
    ax.set_title(
        f"zcl vs hard budget, ${budget:.4f} per {period_s} s, same traffic "
        f"(zcl max deviation {figures['zcl']['max_deviation_share_of_budget']:.1%} of budget)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_begin = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="live_pacing-"))
    ckpt, prompts, mean_cost, cal = prepare_policy(args)
    print(f"policy {args.policy}: unpaced mean cost per request ${mean_cost:.6f}; L={cal['L']:.4g} U={cal['U']:.4g}")

    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.ray_local import init_local_ray
    from deployments.app import build_app
    from deployments.gateway.auth import create_key
    from deployments.gateway.budgets import get_or_create_ledger, kill_ledgers
    from deployments.gateway.cost import CostModel, input_token_bound

    keys_file = work / "keys.yaml"
    create_key(keys_file, "operator", ["admin"])  # the store needs a key at start; the two budget keys come later
    cfg = load_config(
        {
            "server": {"host": "127.0.0.1", "port": PORT},
            "policy": {"name": args.policy, "checkpoint": str(ckpt)},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}, "device": "cpu"},
            "router": {"ray_actor_options": {"num_cpus": 0.1}},
            "gateway": {"auth": {"mode": "keys", "keys_file": str(keys_file)}, "state_dir": str(work / "gw")},
            "pacing": {"bins": args.bins},
            "models": [{"name": m, "replay": {"split": "test"}, "ray_actor_options": {"num_cpus": 0.05}} for m in POOL],
        }
    )
    cost_model = CostModel.from_config(cfg)
    max_request = max(cost_model.max_cost("router", input_token_bound([{"role": "user", "content": p}]), None) for p in prompts)
    init_local_ray(num_cpus=4, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        serve.run(build_app(cfg), name=APP, route_prefix="/")
        ledger = get_or_create_ledger(cfg)
        print(f"app up after {time.time() - t_begin:.0f} s")

        period_s, start = pick_period(*args.period_range)
        budget = round(args.rate * period_s * mean_cost / args.overspend, 6)
        keys, key_ids = {}, {}
        stamp = int(start)
        for name in ("zcl", "hard"):
            key_ids[name] = f"{name}-{stamp}"
            keys[name], _ = create_key(keys_file, key_ids[name], ["route"], budget_usd=budget, period=f"{period_s}s", pacing=name)
        print(f"period {period_s} s from {start:.0f} (in {start - time.time():.1f} s); budget ${budget} per key")

        route = {"ok": None}

        async def budget_poll(session, name, key):
            if route["ok"] is not False:
                async with session.get(f"http://127.0.0.1:{PORT}/v1/budget", headers={"authorization": f"Bearer {key}"}) as resp:
                    if resp.status == 200:
                        route["ok"] = True
                        u = await resp.json()
                        return {"spent": u["spent_usd"], "reserved": u.get("reserved_usd"), "z": u.get("z"), "via": "api"}
                    if resp.status != 404 or route["ok"]:
                        raise RuntimeError(f"GET /v1/budget: {resp.status} {await resp.text()}")
                    route["ok"] = False
            u = await ledger.usage.remote(key_ids[name], f"{period_s}s")
            return {"spent": u["spent"], "reserved": u["reserved"], "via": "ledger"}

        run = asyncio.run(run_traffic(args, keys, prompts, start, start + period_s, budget_poll))
    finally:
        serve.shutdown()
        kill_ledgers()
        import ray

        ray.shutdown()

    figures = analyse(run, budget, period_s, max_request)
    result = {
        "command": "flock /tmp/ray.lock timeout 600 .venv/bin/python scripts/live_pacing.py " + " ".join(argv or sys.argv[1:]),
        "dataset": args.dataset,
        "policy": args.policy,
        "pool": list(POOL),
        "rate_per_key": args.rate,
        "period_s": period_s,
        "bins": args.bins,
        "budget_usd": budget,
        "unpaced_mean_cost_usd": mean_cost,
        "unpaced_expected_spend_usd": args.rate * period_s * mean_cost,
        "calibration": {"L": cal["L"], "U": cal["U"], "tuning": cal["tuning"], "preference": cal["preference"]},
        "budget_source": run["polls"]["zcl"][0].get("via") if run["polls"]["zcl"] else None,
        "figures": figures,
        "checks": {
            "zcl_never_exceeded": not figures["zcl"]["ever_exceeded_budget"],
            "hard_never_exceeded": not figures["hard"]["ever_exceeded_budget"],
            "zcl_no_429": figures["zcl"]["first_429_s"] is None,
            "zcl_no_429_budget_spent": figures["zcl"]["first_429_spent_s"] is None,
            "zcl_answered_until_the_end": (figures["zcl"]["last_answer_s"] or 0) >= 0.95 * period_s,
            "hard_ran_out_early": figures["hard"]["refused_from_s"] is not None
            and figures["hard"]["refused_from_s"] < 0.9 * period_s,
        },
        "wall_s": round(time.time() - t_begin, 1),
        "series": run["polls"],
        "requests": run["requests"],
    }
    (args.out / "pacing.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(run, budget, period_s, figures, args.out / "spend_over_time.png")
    summary = {k: v for k, v in result.items() if k not in ("series", "requests")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
