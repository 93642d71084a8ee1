"""`banditrouter queue-eval`: policies in the queueing env (envs/queueing.py), learning from retrials only.

Every policy runs `steps` steps of the same env (one process per (policy, seed) task, `workers` at a time; a
seed gives every policy the same arrivals). What each policy sees of a served job is the implicit signal:
retried -> 0, not retried (satisfied, or abandoned: the system cannot tell) -> 1, learned through
`policy.update(BanditBatch(...))` every `update_batch` samples.

    queue-aware (one shared pool, each step `schedule(pool, preferences, free)`):
        acqb         ACQB (banditrouter/policies/acqb.py), default config
        acqb_ts      ACQB without forced exploration (forced_exploration=False): pure Thompson sampling
        acqb_eps     ACQB with v = 1e-6: the posterior draw collapses onto theta^, so it explores only by its
                     forced exploration and is greedy on theta^ otherwise ("epsilon-only", ours)
        oracle       the theta*-oracle: knows mu(z^T theta*_k) (theta* fitted per model on the full table)
                     and serves the largest first (`envs.queueing.greedy_assignment`, the paper's rule). In
                     `logistic` mode that is the true probability; in `logged` mode it is a per-model logistic
                     scorer fitted on the full table (a reference, not an upper bound), not the prompt's own
                     0/1 outcome
        clairvoyant  (on request, `logged` mode) greedy on the true success probabilities, i.e. each prompt's
                     logged outcome: what no learner on these features can match (ours; a reference only)
        random_pool  uniformly random jobs on uniformly random free slots (work-conserving, ours)
    routing at arrival (per-model FIFO queues; a retried job is routed again, as a new request would be):
        linucb, barp the registry's policies, select(explore=True) at arrival
        greedy       context-free greedy (ours): the model with the best running mean of the signal, each
                     model tried first (the "best average model", learned)
        random       a uniformly random model

The pool a queue-aware policy schedules is the `window` oldest waiting jobs (default 256, as the live router's
ACQB pool holds at most `queue_capacity` = 256 requests); it only binds when a queue has grown past it.

Preferences: quality-only, w = (1, 0), unless `preference` says otherwise; the oracle, random and the regret
then rank pairs by u = w_q * p - w_c * min(c / tau, 1) (with w = (1, 0): the success probability p).

Metrics (each a mean over seeds):
    time_avg_queue_length  mean over steps of Q(t), the queue after step t's service
    final_queue_length     Q(steps)
    retrial_rate, abandon_rate, satisfaction   fractions of services (the three sum to 1)
    cost                   mean USD per service
    regret                 [[t, cumulative routing regret]]: per step, on the policy's own queue state (its
                           `window` oldest waiting jobs, plus for FIFO policies the jobs they served, every slot
                           free), the paper's mu* - mu_chosen per decision (`decision_regret`): the served
                           pairs in decreasing order of the oracle's utility, each charged the best utility still
                           available minus its own, and idle slots charged what the oracle would have served.
                           >= 0 every step; 0 for the oracle. checks.json also holds the set-level variant (the
                           oracle's whole greedy assignment of the state minus the policy's), which can go
                           negative because greedy is not a maximum-weight matching.
    queue_regret           [[t, E[Q(t)] - E[Q*(t)]]]: the policy's mean queue length minus the oracle's (same
                           seeds, so the same arrivals), averaged over the block of steps ending at t.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envs.queueing import (
    ARRIVAL_PROCESSES,
    CONTEXT_SPLITS,
    DEFAULT_P_RETRY,
    SATISFACTION_MODELS,
    QueueingEnv,
    QueueTable,
    check_capacity,
    greedy_assignment,
    service_rate,
)

QUEUE_AWARE = ("acqb", "acqb_ts", "acqb_eps", "oracle", "random_pool", "clairvoyant")
AT_ARRIVAL = ("linucb", "barp", "greedy", "random")
QUEUE_POLICIES = QUEUE_AWARE[:-1] + AT_ARRIVAL + ("clairvoyant",)
"""Order matters: a policy's index seeds its random stream (clairvoyant came last, so the others kept theirs)."""
DEFAULT_QUEUE_POLICIES = ("acqb", "acqb_ts", "linucb", "barp", "greedy", "random", "random_pool", "oracle")
"""The issue's list (plus random_pool); acqb_eps is on request (`--policies`), for the logistic run."""
BASELINES = ("linucb", "barp", "greedy", "random", "random_pool")
"""The non-oracle baselines must-show 1 compares ACQB with (the ACQB ablations are not baselines)."""
ACQB_VARIANTS: dict[str, dict[str, Any]] = {"acqb": {}, "acqb_ts": {"forced_exploration": False}, "acqb_eps": {"v": 1e-6}}
N_BLOCKS = 200
"""queue_regret and the queue-length figure use this many equal blocks of steps."""


@dataclass(frozen=True)
class QueueEvalConfig:
    """What one queue-eval run holds fixed for every (policy, seed)."""

    arrival_rate: float
    capacity: tuple[int, ...]
    arrivals: str = "poisson"
    p_retry: float = DEFAULT_P_RETRY
    preference: tuple[float, float] = (1.0, 0.0)
    update_batch: int = 64
    """Samples per policy.update: the learner's small batches (about 6 steps of services at K = 11)."""
    window: int = 256
    """Queue-aware policies (and the regret's oracle) see the `window` oldest waiting jobs."""
    steps: int = 20000


# ========================================================================================================
# Policies the harness adds (not in the registry: they only make sense against this env)
# ========================================================================================================
class GreedyAverage:
    """Context-free greedy on the implicit signal (ours): every job goes to the model with the best running
    mean reward; models never tried come first, in turn. Deterministic: propensity 1."""

    name = "greedy"

    def __init__(self, n_arms: int, tau: float):
        self.n_arms, self.tau = n_arms, tau
        self.counts = np.zeros(n_arms)
        self.sums = np.zeros(n_arms)
        self.version = 0

    def select(self, contexts, preferences, *, explore: bool = True):
        from banditrouter.policies.base import deterministic

        n = len(contexts)
        unseen = np.flatnonzero(self.counts == 0)
        if len(unseen):
            arms = unseen[np.arange(n) % len(unseen)]
        else:
            arms = np.full(n, int(np.argmax(self.sums / self.counts)))
        return deterministic(arms, self.version)

    def update(self, batch) -> dict[str, float]:
        r = batch.rewards(self.tau)
        np.add.at(self.counts, batch.arms, 1.0)
        np.add.at(self.sums, batch.arms, r)
        self.version += 1
        return {}


class RandomAtArrival:
    """A uniformly random model per job (propensity 1/K)."""

    name = "random"

    def __init__(self, n_arms: int, seed: int):
        self.n_arms = n_arms
        self.rng = np.random.default_rng(seed)

    def select(self, contexts, preferences, *, explore: bool = True):
        from banditrouter.policies.base import Decisions

        n = len(contexts)
        return Decisions(self.rng.integers(0, self.n_arms, size=n), np.full(n, 1.0 / self.n_arms), 0)


def random_pairs(rng: np.random.Generator, n_jobs: int, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Work-conserving random scheduling: min(jobs, slots) distinct random jobs on distinct random free slots."""
    slots = np.repeat(np.arange(len(capacity)), capacity)
    m = min(n_jobs, len(slots))
    return rng.choice(n_jobs, size=m, replace=False), rng.choice(slots, size=m, replace=False)


def utility_table(table: QueueTable, preference: Sequence[float], *, clairvoyant: bool = False) -> np.ndarray:
    """u = w_q * p - w_c * min(c / tau, 1) per (prompt, model): what the oracle ranks and the regret counts.
    p is what the theta*-oracle knows (`table.oracle_success`: mu(z^T theta*)); `clairvoyant` uses the true
    success probabilities instead (in `logged` mode, each prompt's own 0/1 outcome)."""
    from banditrouter.reward import check_preferences, normalised_cost

    w = check_preferences(np.asarray(preference, dtype=np.float64))[0]
    p = table.success if clairvoyant else table.oracle_success
    return w[0] * p - w[1] * normalised_cost(table.costs, table.tau)


def decision_regret(u: np.ndarray, capacity: np.ndarray, jobs: np.ndarray, arms: np.ndarray) -> tuple[float, float]:
    """Routing regret of one step. `u`: (n, K) the utilities the oracle ranks by (`utility_table`: the true
    ones under `logistic`, theta*'s under `logged`) of the state's jobs (oldest first); the policy
    served (jobs[i], arms[i]) with every slot of `capacity` free at the start of the step.

    Per decision (the paper's "mu* - mu_chosen on the same queue state", one served pair at a time): take the
    served pairs in decreasing order of utility (ties: older job, lower model); each costs the best
    utility still available (jobs not yet served, models with a slot left) minus its own. Slots the policy
    left idle while jobs waited cost what the oracle's greedy rule would have served on them. Every term is
    >= 0, and the theta*-oracle's own steps cost exactly 0.

    Returns (per-decision regret, set-level regret): the second is the oracle's whole greedy assignment of the
    state minus the policy's, which can be negative (greedy is not a maximum-weight matching)."""
    jobs, arms = np.asarray(jobs, dtype=np.int64), np.asarray(arms, dtype=np.int64)
    served = u[jobs, arms]
    oj, oa = greedy_assignment(u, capacity)
    set_level = float(u[oj, oa].sum() - served.sum())
    work = u.astype(np.float64).copy()
    free = np.asarray(capacity, dtype=np.int64).copy()
    work[:, free == 0] = -np.inf
    total = 0.0
    for i in np.lexsort((arms, jobs, -served)):
        j, a = jobs[i], arms[i]
        total += float(work.max() - served[i])
        work[j, :] = -np.inf
        free[a] -= 1
        if free[a] == 0:
            work[:, a] = -np.inf
    left = np.ones(len(u), dtype=bool)
    left[jobs] = False
    if left.any() and free.any():
        rj, ra = greedy_assignment(u[left], free)
        total += float(u[left][rj, ra].sum())
    return total, set_level


# ========================================================================================================
# One (policy, seed) run
# ========================================================================================================
_WORKER: dict[str, Any] = {}


def _init_worker(table: QueueTable, utility: np.ndarray, cfg: QueueEvalConfig, projection, progress_queue) -> None:
    _WORKER.update(table=table, utility=utility, cfg=cfg, projection=projection, progress=progress_queue)


def _make_learner(name: str, table: QueueTable, seed: int, projection):
    from banditrouter.policies import make_policy

    d, models, tau = table.contexts.shape[1], table.models, table.tau
    kw = {} if projection is None else {"features": projection}
    if name in ACQB_VARIANTS:
        return make_policy("acqb", models, d, tau, seed=seed, **kw, **ACQB_VARIANTS[name])
    if name in ("linucb", "barp"):
        if name == "barp":
            import torch

            torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism
        return make_policy(name, models, d, tau, seed=seed, **kw)
    if name == "greedy":
        return GreedyAverage(len(models), tau)
    if name == "random":
        return RandomAtArrival(len(models), seed)
    return None


def run_policy(name: str, seed: int, steps: int | None = None) -> dict[str, Any]:
    """Run one policy for one seed in this process (after `_init_worker`); returns per-step arrays and totals."""
    from banditrouter.policies.base import BanditBatch

    table: QueueTable = _WORKER["table"]
    util: np.ndarray = _WORKER["utility"]
    cfg: QueueEvalConfig = _WORKER["cfg"]
    steps = cfg.steps if steps is None else steps
    progress = _WORKER.get("progress")
    env = QueueingEnv(
        table.contexts,
        table.success,
        table.costs,
        capacity=np.asarray(cfg.capacity),
        arrival_rate=cfg.arrival_rate,
        arrivals=cfg.arrivals,
        p_retry=cfg.p_retry,
        models=table.models,
        max_steps=steps,
    )
    _, info = env.reset(seed=seed)
    cap = env.capacity
    x = table.contexts
    pref = np.asarray([cfg.preference], dtype=np.float64)
    pref = pref / pref.sum()
    policy = _make_learner(name, table, seed, _WORKER.get("projection"))
    rng = np.random.default_rng([seed, QUEUE_POLICIES.index(name)])
    fifo = name in AT_ARRIVAL
    # what the greedy references rank by: the theta*-oracle by `util` (what it knows), the clairvoyant by the truth
    ranking = utility_table(table, cfg.preference, clairvoyant=True) if name == "clairvoyant" else util
    queues: list[deque] = [deque() for _ in range(env.n_models)]
    propensity: dict[int, float] = {}
    new = info["arrivals"]
    pending: list[tuple[np.ndarray, ...]] = []
    n_pending = 0
    queue = np.zeros(steps, dtype=np.int32)
    regret = np.zeros(steps)
    set_regret = np.zeros(steps)
    report_every = max(1, min(500, steps // 20))
    t0 = time.perf_counter()
    for t in range(steps):
        if fifo:
            if len(new):
                dec = policy.select(x[env.job_rows(new)], pref, explore=True)
                for j, a, p in zip(new.tolist(), dec.arms.tolist(), dec.propensities.tolist(), strict=True):
                    queues[a].append(j)
                    propensity[j] = p
            jobs, arms = [], []
            for k, q in enumerate(queues):
                for _ in range(min(int(cap[k]), len(q))):
                    jobs.append(q.popleft())
                    arms.append(k)
            props = np.array([propensity.pop(j) for j in jobs]) if jobs else np.zeros(0)
            # the state: the jobs served (wherever they sat in their model's queue) and the oldest waiting
            window = env.waiting(cfg.window)[0]
            state = np.concatenate([np.asarray(jobs, dtype=np.int64), window[~np.isin(window, jobs)]])
            regret[t], set_regret[t] = decision_regret(util[env.job_rows(state)], cap, np.arange(len(jobs)), arms)
            out = env.serve(jobs, arms)
        else:
            pool, rows = env.waiting(cfg.window)
            if len(pool) == 0:
                sel, arms, props = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
            elif name in ("oracle", "clairvoyant"):
                sel, arms = greedy_assignment(ranking[rows], cap)
                props = np.ones(len(sel))
            elif name == "random_pool":
                sel, arms = random_pairs(rng, len(pool), cap)
                props = np.ones(len(sel))
            else:
                assignments = policy.schedule(x[rows], pref, cap.copy(), explore=True)
                sel = np.array([a.job for a in assignments], dtype=np.int64)
                arms = np.array([a.arm for a in assignments], dtype=np.int64)
                props = np.array([a.propensity for a in assignments])
            regret[t], set_regret[t] = decision_regret(util[rows], cap, sel, arms)
            out = env.serve(pool[sel], arms)
        queue[t] = env.queue_length
        if policy is not None and hasattr(policy, "update") and len(out):
            pending.append((out.rows, out.arms, props, out.retried, out.costs))
            n_pending += len(out)
            if n_pending >= cfg.update_batch:
                rows_b, arms_b, props_b, retried_b, costs_b = (np.concatenate(c) for c in zip(*pending, strict=True))
                policy.update(
                    BanditBatch(
                        contexts=x[rows_b],
                        preferences=np.repeat(pref, len(rows_b), axis=0),
                        arms=arms_b,
                        propensities=np.clip(props_b, 1e-12, 1.0),
                        scores=(~retried_b).astype(np.float64),
                        costs=costs_b,
                        retrial=retried_b,
                    )
                )
                pending, n_pending = [], 0
        arrived = env.arrive()
        new = np.concatenate([out.jobs[out.retried], arrived]) if fifo else arrived
        if progress is not None and (t + 1) % report_every == 0:
            progress.put(report_every)
    if progress is not None and steps % report_every:
        progress.put(steps % report_every)
    return {
        "policy": name,
        "seed": seed,
        "policy_config": policy._config() if hasattr(policy, "_config") else {},
        "queue": queue,
        "regret": regret,
        "set_regret": set_regret,
        "totals": dict(env.totals),
        "seconds": time.perf_counter() - t0,
    }


def _run_task(task: tuple[str, int]) -> dict[str, Any]:
    return run_policy(*task)


# ========================================================================================================
# Aggregation, checks, figures
# ========================================================================================================
def regret_grid(steps: int) -> np.ndarray:
    """Steps (1-based) at which curves are reported: log-spaced (for log-log plots) and every steps/100."""
    geo = np.geomspace(1, steps, 120)
    lin = np.linspace(steps / 100, steps, 100)
    return np.unique(np.clip(np.round(np.concatenate([geo, lin])).astype(np.int64), 1, steps))


def block_means(series: np.ndarray, n_blocks: int = N_BLOCKS) -> tuple[np.ndarray, np.ndarray]:
    """(block end steps, mean of each block); blocks split `series` into near-equal consecutive parts."""
    edges = np.linspace(0, len(series), min(n_blocks, len(series)) + 1).round().astype(np.int64)
    means = np.array([series[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)])
    return edges[1:], means


def aggregate(runs: list[dict[str, Any]], steps: int) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Per policy: the queue.json entry (means over seeds) and the full-resolution mean series."""
    by_policy: dict[str, list[dict]] = {}
    for r in runs:
        by_policy.setdefault(r["policy"], []).append(r)
    series: dict[str, dict[str, np.ndarray]] = {}
    for name, rs in by_policy.items():
        series[name] = {
            "queue": np.mean([r["queue"] for r in rs], axis=0),
            "cum_regret": np.mean([np.cumsum(r["regret"]) for r in rs], axis=0),
            "cum_set_regret": np.mean([np.cumsum(r["set_regret"]) for r in rs], axis=0),
        }
    oracle = next((n for n in series if "oracle" in n), None)
    grid = regret_grid(steps)
    out: dict[str, dict] = {}
    for name, rs in by_policy.items():

        def frac(key: str, rs=rs) -> float:
            return float(np.mean([r["totals"][key] / max(r["totals"]["served"], 1) for r in rs]))

        entry = {
            "time_avg_queue_length": float(np.mean([r["queue"].mean() for r in rs])),
            "final_queue_length": float(np.mean([r["queue"][-1] for r in rs])),
            "retrial_rate": frac("retried"),
            "abandon_rate": frac("abandoned"),
            "satisfaction": frac("satisfied"),
            "cost": frac("cost"),
            "regret": [[int(t), float(series[name]["cum_regret"][t - 1])] for t in grid],
            "queue_regret": [],
        }
        if oracle is not None:
            ends, diff = block_means(series[name]["queue"] - series[oracle]["queue"])
            entry["queue_regret"] = [[int(t), float(v)] for t, v in zip(ends, diff, strict=True)]
        out[name] = entry
    return out, series


def loglog_slope(cum_regret: np.ndarray, start: int, end: int, points: int = 50) -> float | None:
    """Least-squares slope of log R(t) on log t over t in [start, end] (1-based), at log-spaced t; None when
    R is not positive there."""
    t = np.unique(np.round(np.geomspace(start, end, points)).astype(np.int64))
    r = cum_regret[t - 1]
    if (r <= 0).any():
        return None
    return float(np.polyfit(np.log(t), np.log(r), 1)[0])


def queue_checks(policies: dict[str, dict], series: dict[str, dict[str, np.ndarray]], steps: int) -> dict[str, Any]:
    """The issue's must-show figures, from the full-resolution means: ACQB's time-average queue length over
    the best non-oracle baseline's (target <= 0.8), its queue-length regret in the last vs first quarter
    (target <= 0.5; `met` also when ACQB's queue is no longer than the oracle's in both quarters), and every
    policy's log-log slope of cumulative routing regret over the second half
    (target for ACQB under `logistic` <= 0.6)."""
    checks: dict[str, Any] = {"slope_second_half": {}, "set_level_regret": {}}
    for name, s in series.items():
        checks["slope_second_half"][name] = loglog_slope(s["cum_regret"], max(1, steps // 2), steps)
        checks["set_level_regret"][name] = {
            "final": float(s["cum_set_regret"][-1]),
            "slope_second_half": loglog_slope(s["cum_set_regret"], max(1, steps // 2), steps),
        }
    base = {b: policies[b]["time_avg_queue_length"] for b in BASELINES if b in policies}
    if "acqb" in policies and base:
        best = min(base, key=base.get)
        checks["queue_vs_best_baseline"] = {
            "acqb": policies["acqb"]["time_avg_queue_length"],
            "best_baseline": best,
            "best_baseline_value": base[best],
            "ratio": policies["acqb"]["time_avg_queue_length"] / max(base[best], 1e-12),
            "target": 0.8,
        }
    oracle = next((n for n in series if "oracle" in n), None)
    if oracle is not None and steps >= 4:
        q = steps // 4
        checks["queue_regret_quarters"] = {}
        for name, s in series.items():
            if name == oracle:
                continue
            d = s["queue"] - series[oracle]["queue"]
            first, last = float(d[:q].mean()), float(d[-q:].mean())
            checks["queue_regret_quarters"][name] = {
                "first": first,
                "last": last,
                "ratio": last / first if first > 0 else None,
                "target": 0.5,
                # an excess queue over the oracle's must halve; a queue no longer than the oracle's in the
                # first quarter (first <= 0) has no excess to halve, and must stay so (last <= 0)
                "met": bool(last <= 0.5 * first) if first > 0 else bool(last <= 0),
            }
    return checks


STYLE = {
    "acqb": dict(color="tab:red", lw=2.4, zorder=6),
    "acqb_ts": dict(color="tab:orange", lw=1.6),
    "acqb_eps": dict(color="tab:pink", lw=1.6),
    "oracle": dict(color="black", lw=1.8, ls="--", zorder=5),
    "clairvoyant": dict(color="black", lw=1.2, ls=":"),
    "linucb": dict(color="tab:blue"),
    "barp": dict(color="tab:purple"),
    "greedy": dict(color="tab:olive"),
    "random": dict(color="tab:gray"),
    "random_pool": dict(color="tab:brown", ls=":"),
}


def plot_queue_length(results: dict, series: dict, path: Path, dpi: int = 110) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    oracle = next((n for n in series if "oracle" in n), None)
    for name, s in series.items():
        ends, means = block_means(s["queue"])
        axes[0].plot(ends, means, label=name, **STYLE.get(name, {}))
        if oracle is not None and name != oracle:
            ends, diff = block_means(s["queue"] - series[oracle]["queue"])
            axes[1].plot(ends, diff, label=name, **STYLE.get(name, {}))
    axes[0].set_ylabel("E[Q(t)] (mean over seeds, block means)")
    axes[1].set_ylabel("queue-length regret E[Q(t)] − E[Q*(t)]")
    for ax in axes:
        ax.set_xlabel("step t")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(
        f"{results['dataset']} ({results['config']['contexts']} contexts), {results['satisfaction']} satisfaction, "
        f"load {results['load']}, {len(results['seeds'])} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_regret(results: dict, series: dict, path: Path, dpi: int = 110) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    t = regret_grid(steps)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    top = 1.0
    for name, s in series.items():
        if "oracle" in name:
            continue
        r = s["cum_regret"][t - 1]
        keep = r > 0
        if keep.any():
            ax.plot(t[keep], r[keep], label=name, **STYLE.get(name, {}))
            top = max(top, float(r[keep].max()))
    ref = np.array([steps / 100, steps])
    for power, ls in ((0.5, ":"), (1.0, "-.")):
        anchor = series["acqb"]["cum_regret"][-1] if "acqb" in series and series["acqb"]["cum_regret"][-1] > 0 else top
        ax.plot(ref, anchor * (ref / steps) ** power, color="0.5", ls=ls, lw=1, label=f"∝ t^{power:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("cumulative routing regret vs the θ*-oracle")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{results['dataset']}: {results['satisfaction']} satisfaction, load {results['load']}")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ========================================================================================================
# The whole run
# ========================================================================================================
@dataclass
class QueueEvalResult:
    results: dict
    checks: dict
    series: dict = field(repr=False)
    seconds: float = 0.0


def parse_seeds(spec: str) -> list[int]:
    """Seeds from "0-4" (a range: [0, 1, 2, 3, 4]), "0,2,7" (a list) or "3"."""
    seeds: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"seeds must look like '0-4' or '0,2,7', got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {spec!r}")
    return seeds


def run_queue_eval(
    dataset: str,
    out_dir: Path,
    *,
    load: float = 0.9,
    steps: int = 20000,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    satisfaction: str = "logged",
    policies: Sequence[str] = DEFAULT_QUEUE_POLICIES,
    features: str = "projection",
    features_dim: int = 64,
    contexts: str = "test",
    capacity=1,
    arrivals: str = "poisson",
    p_retry: float = DEFAULT_P_RETRY,
    preference: Sequence[float] = (1.0, 0.0),
    update_batch: int = 64,
    window: int = 256,
    workers: int = 2,
    rate_steps: int = 4000,
    data_dir=None,
    table: QueueTable | None = None,
    projection=None,
    progress: bool = True,
    log_fn=print,
) -> QueueEvalResult:
    """Build the table (or take `table`, with `projection` for features='projection'), compute mu_sat (over
    `rate_steps` Monte Carlo steps) and lambda = load x mu_sat, run every (policy, seed) in `workers`
    processes, write queue.json, checks.json, queue_length.png and regret.png into `out_dir`."""
    from banditrouter.reward import check_preferences

    unknown = [p for p in policies if p not in QUEUE_POLICIES]
    if unknown or not policies:
        raise ValueError(f"unknown queue-eval policies {unknown}; choose from {list(QUEUE_POLICIES)}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"policies are listed twice: {list(policies)}")
    if satisfaction not in SATISFACTION_MODELS:
        raise ValueError(f"satisfaction must be one of {SATISFACTION_MODELS}, got {satisfaction!r}")
    if contexts not in CONTEXT_SPLITS:
        raise ValueError(f"contexts must be one of {CONTEXT_SPLITS}, got {contexts!r}")
    if arrivals not in ARRIVAL_PROCESSES:
        raise ValueError(f"arrivals must be one of {ARRIVAL_PROCESSES}, got {arrivals!r}")
    if not 0 <= p_retry <= 1:
        raise ValueError(f"p_retry must lie in [0, 1], got {p_retry}")
    if features not in ("none", "projection"):
        raise ValueError(f"features must be 'none' or 'projection', got {features!r}")
    if not (np.isfinite(load) and load > 0):
        raise ValueError(f"load must be a positive number, got {load}")
    if steps < 4:
        raise ValueError("steps must be at least 4")
    if update_batch < 1 or workers < 1 or window < 1:
        raise ValueError("update_batch, window and workers must be positive")
    pref = tuple(float(v) for v in check_preferences(np.asarray(preference, dtype=np.float64))[0])
    seeds = list(seeds)
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if table is None:
        from envs.queueing import load_queue_table, train_split_projection

        if features == "projection" and projection is None:
            projection = train_split_projection(dataset, data_dir=data_dir, out_dim=features_dim, progress=progress)
        table = load_queue_table(
            dataset,
            contexts=contexts,
            satisfaction=satisfaction,
            features=projection if features == "projection" else None,
            data_dir=data_dir,
            progress=progress,
        )
    elif features == "projection" and projection is None:
        raise ValueError("features='projection' with a given table needs the projection too")
    if features == "none":
        projection = None
    cap = check_capacity(capacity, len(table.models))
    util = utility_table(table, pref)
    t_rate = time.perf_counter()
    rate = service_rate(table.success, cap, p_retry, utility=util, steps=rate_steps, warmup=rate_steps // 4, seed=0)
    log_fn(
        f"oracle's saturated service rate mu_sat = {rate.rate:.3f} ± {rate.stderr:.3f} departures/step "
        f"({time.perf_counter() - t_rate:.1f}s); lambda = {load} x mu_sat = {load * rate.rate:.3f} jobs/step"
    )
    cfg = QueueEvalConfig(
        arrival_rate=float(load * rate.rate),
        capacity=tuple(int(c) for c in cap),
        arrivals=arrivals,
        p_retry=float(p_retry),
        preference=pref,
        update_batch=int(update_batch),
        window=int(window),
        steps=int(steps),
    )
    if arrivals == "bernoulli" and cfg.arrival_rate > 1:
        raise ValueError(
            f"Bernoulli arrivals bring at most one job per step, but lambda = {cfg.arrival_rate:.3g} at load {load}: "
            "use arrivals 'poisson', or lower the load or the capacities"
        )
    # the most expensive tasks first, so the last ones to finish are short
    cost_rank = {n: i for i, n in enumerate(("acqb", "acqb_ts", "acqb_eps", "barp", "linucb"))}
    tasks = sorted(((p, s) for p in policies for s in seeds), key=lambda ps: (cost_rank.get(ps[0], 99), ps[1]))
    runs = _execute(tasks, table, util, cfg, projection, workers, progress)

    policies_out, series = aggregate(runs, steps)
    results = {
        "dataset": dataset,
        "load": float(load),
        "steps": int(steps),
        "seeds": seeds,
        "satisfaction": table.satisfaction,
        "policies": {p: policies_out[p] for p in policies},
        "config": {
            "contexts": contexts,
            "n_prompts": len(table.contexts),
            "models": list(table.models),
            "features": "projection" if projection is not None else "none",
            "capacity": list(cfg.capacity),
            "arrivals": arrivals,
            "p_retry": cfg.p_retry,
            "preference": list(pref),
            "update_batch": cfg.update_batch,
            "window": cfg.window,
            "arrival_rate": cfg.arrival_rate,
            "service_rate": asdict(rate),
            "tau": table.tau,
            "theta_fit_rows": table.n_fit,
            "policy_configs": {p: next(r["policy_config"] for r in runs if r["policy"] == p) for p in policies},
            "seconds_per_run": {p: float(np.mean([r["seconds"] for r in runs if r["policy"] == p])) for p in policies},
        },
    }
    checks = queue_checks(results["policies"], series, steps)
    seconds = time.perf_counter() - t_start
    results["config"]["wall_seconds"] = round(seconds, 1)
    (out_dir / "queue.json").write_text(json.dumps(results, indent=1))
    (out_dir / "checks.json").write_text(json.dumps(checks, indent=2))
    plot_queue_length(results, series, out_dir / "queue_length.png")
    plot_regret(results, series, out_dir / "regret.png")
    return QueueEvalResult(results, checks, series, seconds)


def _execute(tasks, table, util, cfg, projection, workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    total = len(tasks) * cfg.steps
    if workers == 1 or len(tasks) == 1:
        _init_worker(table, util, cfg, projection, None)
        runs = []
        with tqdm(total=total, desc="queue-eval", unit="step", disable=not progress, smoothing=0.05) as bar:
            for task in tasks:
                runs.append(_run_task(task))
                bar.update(cfg.steps)
        return runs

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    ctx = mp.get_context("spawn")  # no forked BLAS / torch thread pools
    progress_queue = ctx.Queue()
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})  # one BLAS thread per worker: the workers are the parallelism
    try:
        with (
            ProcessPoolExecutor(
                max_workers=min(workers, len(tasks)),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(table, util, cfg, projection, progress_queue),
            ) as pool,
            tqdm(total=total, desc="queue-eval", unit="step", disable=not progress, smoothing=0.05) as bar,
        ):
            futures = {pool.submit(_run_task, t): t for t in tasks}
            pending = set(futures)
            runs = []
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in done:
                    runs.append(f.result())
                while True:
                    try:
                        bar.update(progress_queue.get_nowait())
                    except Empty:
                        break
            bar.n = total
            bar.refresh()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return runs
