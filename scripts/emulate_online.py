"""Emulate the online learning loop in one process, to compare learner settings over many seeds in seconds.

The live loop (`banditrouter serve --config configs/online.yaml` + `banditrouter simulate --cold-start`)
takes minutes per run; its result moves by several points from one seed to the next, so settings must be
compared over many seeds. This script runs the same `learner.core.Learner` on the same events (a decision
with context, preference, arm, propensity and cost, then an explicit score) without Ray or HTTP:

- a router copy of the policy samples arms (explore=True) for `--per-update` requests at a time, with the
  weights the learner published `--lag` updates earlier (the live loop: ~10 samples per update, because
  the learner updates every `max_wait_s`; staleness ~1 update);
- preferences w_cost ~ U(0, 1), prompts from the train split shuffled per seed and cycled, as `simulate`;
- after `--requests`, the learner's policy is scored like `banditrouter eval`: mean reward over the
  11-point w grid on the test split, as a share of the offline-trained checkpoint's.

    python scripts/emulate_online.py --seeds 0-7                    # the learner's defaults: 4 relabelled steps
    python scripts/emulate_online.py --seeds 0-7 --replay-steps 16 --no-relabel

Prints one JSON object: per seed the mean reward and share, and their mean and min.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from banditrouter.evaluation import evaluate_policy  # noqa: E402
from banditrouter.pipeline import Split, load_split  # noqa: E402
from banditrouter.policies import Policy, load_checkpoint, untrained_like  # noqa: E402
from banditrouter.reward import sample_preferences  # noqa: E402
from learner.core import Learner, LearnerSettings, install  # noqa: E402


def grid_reward(policy: Policy, test: Split) -> float:
    return float(np.mean([p["reward"] for p in evaluate_policy(policy, test.contexts, test.log, policy.tau)]))


def run_once(
    reference: Policy, train: Split, test: Split, seed: int, settings: LearnerSettings, requests: int, per_update: int, lag: int
) -> float:
    fresh = untrained_like(reference)
    with tempfile.TemporaryDirectory() as state_dir:
        learner = Learner(fresh, state_dir, settings)
        published = [fresh.state_dict()]
        router = install(fresh, published[0])
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train.log))
        prefs = sample_preferences(requests, rng, "uniform")
        seq = 0
        for start in range(0, requests, per_update):
            ks = np.arange(start, min(start + per_update, requests))
            rows = order[ks % len(order)]
            dec = router.select(train.contexts[rows], prefs[ks], explore=True)
            events = []
            for i, k, a, prop in zip(rows, ks, dec.arms, dec.propensities, strict=True):
                q, c = train.log.scores[i, a], train.log.costs[i, a]
                if not (np.isfinite(q) and np.isfinite(c)):
                    continue  # the live simulator posts no score for a missing cell
                d = f"d{k}"
                decision = {
                    "kind": "decision",
                    "decision_id": d,
                    "event_id": f"e{seq + 1}",
                    "context": train.contexts[i],
                    "preference": prefs[k],
                    "model": reference.models[a],
                    "propensity": float(prop),
                    "cost_usd": float(c),
                }
                score = {"kind": "explicit", "decision_id": d, "event_id": f"e{seq + 2}", "value": float(q)}
                events += [(seq + 1, decision), (seq + 2, score)]
                seq += 2
            learner.consume(events)
            learner.update(commit=False)
            published.append(learner.policy.state_dict())
            router = install(router, published[max(0, len(published) - 1 - lag)])
        return grid_reward(learner.policy, test)


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/barp.pt", help="offline-trained reference (make run writes it)")
    ap.add_argument("--dataset", default="routerbench")
    ap.add_argument("--seeds", default="0-4", help="'0-9' or '0,3,7'")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--per-update", type=int, default=10, help="samples per learner update")
    ap.add_argument("--lag", type=int, default=1, help="updates between a version's publication and routers using it")
    ap.add_argument("--batch-size", type=int, default=32, help="learning.batch_size: the replay minibatch")
    ap.add_argument("--replay-steps", type=int, default=LearnerSettings.replay_steps)
    ap.add_argument("--no-relabel", action="store_true", help="replay samples under the preference they were served with")
    args = ap.parse_args()

    reference = load_checkpoint(args.checkpoint)
    train = load_split(args.dataset, "train", progress=False)
    test = load_split(args.dataset, "test", progress=False)
    train = Split(train.log.with_models(reference.models), train.contexts)
    test = Split(test.log.with_models(reference.models), test.contexts)
    ref = grid_reward(reference, test)
    settings = LearnerSettings(batch_size=args.batch_size, replay_steps=args.replay_steps, replay_relabel=not args.no_relabel)
    seeds, per_seed = parse_seeds(args.seeds), {}
    t0 = time.perf_counter()
    for seed in seeds:
        r = run_once(reference, train, test, seed, settings, args.requests, args.per_update, args.lag)
        per_seed[seed] = {"mean_reward": round(r, 4), "share": round(r / ref, 4)}
        print(f"seed {seed}: {r:.4f} ({r / ref:.1%} of offline)", file=sys.stderr, flush=True)
    shares = [v["share"] for v in per_seed.values()]
    print(json.dumps({
        "reference": {"checkpoint": args.checkpoint, "mean_reward": round(ref, 4)},
        "settings": {**vars(args), "replay_relabel": not args.no_relabel},
        "per_seed": per_seed,
        "share_mean": round(float(np.mean(shares)), 4),
        "share_min": round(float(np.min(shares)), 4),
        "seeds_at_or_above_90pct": int(sum(s >= 0.9 for s in shares)),
        "wall_s": round(time.perf_counter() - t0, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
