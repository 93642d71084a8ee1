#!/usr/bin/env python3
"""Soak: does the online loop's memory stay flat with traffic? (issue 9, "Bounded state")

Sends `--decisions` routed decisions from as many distinct users (each with a 384-wide context, a user id
and a preference), and an explicit score for every one of them `--feedback-lag` decisions later, through
the buffer's logic (`learner.buffer.EventBuffer`, in this process) while the learner's logic
(`learner.core.Learner`, in a second process, reading the same SQLite log as the learner actor reads it
through the buffer actor) consumes, updates and commits. The buffer's clock is simulated: requests arrive
at `--rate` per second of it, so its per-user retrial state (TTL = the retrial window) holds the users of
the last window, as in service; the log's `received` stamps and the learner's pending horizon run on the
wall clock. Every 5,000 events the learner compacts the log as the actor does (consumed events older than
`--retention-s`, 0 by default so that compaction runs within the soak; in service it is a day).

What it does not exercise: decisions that never get a score (they wait up to `learning.pending_horizon_s`,
at most `learning.max_pending` of them, ~1.7 KB each), and the Ray actors themselves (their logic only).

Prints JSON: each process's RSS at each `--checkpoints` count (10k and 100k decisions by default), their
ratio, the sizes of every bounded structure, and the log file's size.

    .venv/bin/python scripts/soak_state.py --decisions 100000 --out reports/soak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


MODELS = tuple(f"model-{i}" for i in range(11))
DIM = 384


def learner_proc(conn, log_path: str, state_dir: str, policy: str, retention_s: float) -> None:
    """The learner's logic as the learner actor runs it: verified reads, updates, commits, retention."""
    from banditrouter.policies import make_policy
    from learner.core import Learner, LearnerSettings
    from learner.eventlog import SQLiteEventLog

    log = SQLiteEventLog(log_path)
    read = log.read
    core = Learner(make_policy(policy, MODELS, DIM, tau=0.01), state_dir, LearnerSettings(batch_size=32))
    core.restore(read, log.log_id())
    compacted = 0
    last_compact = 0
    while True:
        if conn.poll():
            msg = conn.recv()
            if msg[0] == "stop":
                return
            target = msg[1]
            while core.seen < target:  # catch up with everything the driver wrote
                rows = read(core.read_after(), 2000)
                core.consume(rows, read)
                while core.ready(now=float("inf")):
                    core.update()
            if core.samples:
                core.update()
            gc.collect()
            conn.send(
                {
                    "rss_mb": rss_mb(),
                    "version": core.policy.version,
                    "seen": core.seen,
                    "pending": len(core.pending),
                    "resolved": len(core.resolved),
                    "replay": len(core.replay),
                    "version_feedback_time": len(core.version_feedback_time),
                    "consumed_rows": core.db.execute("SELECT COUNT(*) FROM consumed").fetchone()[0],
                    "compacted_events": compacted,
                    "counts": {k: v for k, v in core.counts.items() if k in ("samples", "updates", "dropped_pending")},
                }
            )
            continue
        rows = read(core.read_after(), 2000)
        if core.consume(rows, read) == 0:
            time.sleep(0.01)
        if core.ready():
            core.update()
        if core.seen - last_compact >= 5000:  # retention, as the buffer actor runs it after commits
            last_compact = core.seen
            compacted += log.compact(core.compaction_floor(), retention_s)
            core.prune_consumed(log.first_seq())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=100_000, help="routed decisions, each from a distinct user")
    ap.add_argument("--checkpoints", default="10000,100000", help="decision counts at which RSS is read")
    ap.add_argument("--rate", type=float, default=200.0, help="simulated requests per second (event clock)")
    ap.add_argument("--feedback-lag", type=int, default=200, help="a decision's score comes this many decisions later")
    ap.add_argument("--policy", default="linucb", help="learner policy (linucb or barp)")
    ap.add_argument("--retrial-window-s", type=float, default=60.0)
    ap.add_argument("--retention-s", type=float, default=0.0, help="compact consumed events older than this (wall clock)")
    ap.add_argument("--state-dir", type=Path, default=None, help="fresh folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    import tempfile

    import numpy as np

    from banditrouter.schemas import DecisionEvent
    from learner.buffer import EventBuffer

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "events.sqlite"
    sim = [1.7e9]  # the simulated clock: requests arrive at --rate per second
    buf = EventBuffer(log_path, retrial_similarity=0.97, retrial_window_s=args.retrial_window_s, clock=lambda: sim[0])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=learner_proc, args=(child, str(log_path), str(state / "learner"), args.policy, args.retention_s))
    proc.start()
    rng = np.random.default_rng(0)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    t0, wall0 = 1.7e9, time.perf_counter()
    readings = []
    waiting: list[str] = []
    for i in range(1, args.decisions + 1):
        x = rng.normal(size=DIM).astype(np.float32)
        x /= np.linalg.norm(x)
        arm = int(rng.integers(len(MODELS)))
        now = sim[0] = t0 + i / args.rate
        ev = DecisionEvent(
            decision_id=f"d{i}",
            request_id=f"r{i}",
            model=MODELS[arm],
            arm=arm,
            propensity=1.0 / len(MODELS),
            policy=args.policy,
            policy_version=0,
            preference=(0.7, 0.3),
            context=x.tolist(),
            context_ref=None,
            cost_usd=float(rng.uniform(0, 0.01)),
            latency_s=0.1,
            pool_version="soak",
            user=f"user-{i}",
            time=now,
        )
        buf.append_decisions([ev.to_dict()])
        waiting.append(ev.decision_id)
        if len(waiting) > args.feedback_lag:
            buf.add_feedback(waiting.pop(0), float(rng.uniform()))
        if i % 1000 == 0:
            buf.sweep(now)
        if i in checkpoints:
            parent.send(("rss", buf.log.last_seq()))
            learner = parent.recv()
            gc.collect()
            st = buf.stats()
            readings.append(
                {
                    "decisions": i,
                    "events": st["last_seq"],
                    "wall_s": round(time.perf_counter() - wall0, 1),
                    "buffer": {
                        "rss_mb": round(rss_mb(), 1),
                        "tracked_users": st["tracked_users"],
                        "awaiting_acceptance": st["awaiting_acceptance"],
                        "log_rows": buf.log.db.execute("SELECT COUNT(*) FROM events").fetchone()[0],
                        "log_mb": round(sum(p.stat().st_size for p in state.glob("events.sqlite*")) / 2**20, 1),
                    },
                    "learner": {**learner, "rss_mb": round(learner["rss_mb"], 1)},
                }
            )
            print(json.dumps(readings[-1]), flush=True)
    parent.send(("stop",))
    proc.join(timeout=60)
    first, last = readings[0], readings[-1]
    out = {
        "decisions": args.decisions,
        "distinct_users": args.decisions,
        "events": last["events"],
        "policy": args.policy,
        "simulated_rate_per_s": args.rate,
        "readings": readings,
        "rss_ratio_last_over_first": {
            "buffer": round(last["buffer"]["rss_mb"] / first["buffer"]["rss_mb"], 3),
            "learner": round(last["learner"]["rss_mb"] / first["learner"]["rss_mb"], 3),
        },
    }
    out["flat_within_20pct"] = all(v <= 1.2 for v in out["rss_ratio_last_over_first"].values())
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
