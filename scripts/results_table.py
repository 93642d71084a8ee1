#!/usr/bin/env python3
"""Print an `eval` report (results.json) as a Markdown table: per policy AIQ, mean reward over the w grid,
and the (accuracy, cost) points at w_cost = 0, 0.1, 0.5 and 1.

    .venv/bin/python scripts/results_table.py reports/routerbench/results.json
"""

from __future__ import annotations

import json
import sys


def table(r: dict) -> str:
    ws = (0.0, 0.1, 0.5, 1.0)
    head = "| policy | AIQ | mean reward | " + " | ".join(f"w_c={w:g}: acc / $ per query" for w in ws) + " |"
    rows = [head, "|" + "---|" * (3 + len(ws))]
    for name, pol in sorted(r["policies"].items(), key=lambda kv: -kv[1]["aiq"]):
        pts = {round(p["w_cost"], 1): p for p in pol["points"]}
        cells = " | ".join(f"{pts[w]['accuracy']:.3f} / {pts[w]['cost']:.2e}" for w in ws)
        rows.append(f"| {name} | {pol['aiq']:.4f} | {pol['mean_reward']:.4f} | {cells} |")
    o = r["references"]["oracle"]
    singles = {k.split(":", 1)[1]: v for k, v in r["references"].items() if k.startswith("single:")}
    best = max(singles.items(), key=lambda kv: kv[1]["accuracy"])
    rows.append("")
    rows.append(
        f"References: per-prompt oracle {o['accuracy']:.3f} at ${o['cost']:.2e}; best single model {best[0]} "
        f"{best[1]['accuracy']:.3f} at ${best[1]['cost']:.2e} (n_test = {r['n_test']}, tau = {r['tau']:.3g})."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(table(json.load(open(sys.argv[1]))))
