#!/usr/bin/env python3
"""Check the routing-core acceptance figures against an `eval` report and print them as JSON.

    .venv/bin/python scripts/must_show.py reports/routerbench/results.json

Exit status 1 if any criterion fails. The thresholds are those of the issue (RouterBench test split).
"""

from __future__ import annotations

import json
import sys


def check(results: dict) -> dict:
    pols = results["policies"]
    barp = pols["barp"]["points"]
    sup = next(v for k, v in pols.items() if "supervised" in k)
    by_w = sorted(barp, key=lambda p: p["w_cost"])
    costs = [p["cost"] for p in by_w]

    def best_acc_under(budget: float):
        ok = [p for p in barp if p["cost"] <= budget]
        return max(ok, key=lambda p: p["accuracy"]) if ok else None

    out = {}
    for name, acc, budget in (("acc_ge_0.86_at_cost_le_2.5e-3", 0.86, 2.5e-3), ("acc_ge_0.80_at_cost_le_5e-4", 0.80, 5e-4)):
        p = best_acc_under(budget)
        out[name] = {"pass": bool(p and p["accuracy"] >= acc), "point": p and {k: p[k] for k in ("w_cost", "accuracy", "cost")}}
    out["cost_non_increasing_in_w_cost"] = {"pass": all(b <= a for a, b in zip(costs, costs[1:], strict=False)), "costs": costs}
    others = {k: pols[k]["mean_reward"] for k in ("linucb", "lints", "epsilon_greedy") if k in pols}
    out["mean_reward_ge_linear_baselines"] = {
        "pass": all(pols["barp"]["mean_reward"] >= v for v in others.values()),
        "barp": pols["barp"]["mean_reward"],
        **others,
    }
    out["aiq_ge_0.95x_supervised"] = {
        "pass": pols["barp"]["aiq"] >= 0.95 * sup["aiq"],
        "barp": pols["barp"]["aiq"],
        "supervised": sup["aiq"],
        "ratio": pols["barp"]["aiq"] / sup["aiq"],
    }
    out["all_pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict) and "pass" in v)
    # information only: what mixing two grid preferences per request reaches on BaRP's convex hull
    import numpy as np

    from banditrouter.evaluation import upper_hull

    hull = upper_hull([(p["cost"], p["accuracy"]) for p in barp])
    out["info_barp_hull_accuracy_at_cost"] = {
        f"{c:.1e}": float(np.interp(c, [h[0] for h in hull], [h[1] for h in hull])) for c in (5e-4, 1e-3, 2.5e-3)
    }
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    res = check(json.load(open(sys.argv[1])))
    print(json.dumps(res, indent=2))
    sys.exit(0 if res["all_pass"] else 1)
