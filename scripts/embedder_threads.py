"""Summarise `scripts/embedder_threads.sh`'s log: per 2 s interval, the embedder replica's cores in all and its
busiest thread's cores and involuntary context switches per second (how often it was taken off a CPU while it
could run). Prints JSON: the intervals, and the means over those where the busiest thread used over half a core."""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict

TICKS = os.sysconf("SC_CLK_TCK")


def main(path: str) -> None:
    snaps: OrderedDict[float, dict[str, tuple[int, int, int]]] = OrderedDict()
    for line in open(path):
        p = line.split()
        if len(p) == 5:
            snaps.setdefault(float(p[0]), {})[p[1]] = (int(p[2]), int(p[3]), int(p[4]))
    ts = list(snaps)
    rows = []
    for t0, t1 in zip(ts, ts[1:], strict=False):
        a, b, w = snaps[t0], snaps[t1], t1 - t0
        per = [((b[t][0] - a[t][0]) / TICKS / w, (b[t][2] - a[t][2]) / w, t) for t in b if t in a]
        if not per:
            continue
        top = max(per)
        rows.append(
            {
                "at_s": round(t1 - ts[0], 1),
                "cores": round(sum(x[0] for x in per), 3),
                "busiest_thread_cores": round(top[0], 3),
                "busiest_thread_involuntary_per_s": round(top[1]),
            }
        )
    busy = [r for r in rows if r["busiest_thread_cores"] > 0.5]
    mean = (
        {
            k: round(sum(r[k] for r in busy) / len(busy), 3)
            for k in ("cores", "busiest_thread_cores", "busiest_thread_involuntary_per_s")
        }
        if busy
        else None
    )
    print(json.dumps({"intervals": rows, "busy_intervals": len(busy), "mean_over_busy": mean}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: embedder_threads.py <log of scripts/embedder_threads.sh>")
    main(sys.argv[1])
