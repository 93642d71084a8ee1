#!/usr/bin/env bash
# Issue 10 must-show 3: ACQB (joint routing + scheduling) against FIFO + LinUCB, both learning live from a cold
# start from the same implicit signal (retrial 0, accepted 1; no explicit feedback), under the same open-loop
# Poisson load above the best model's capacity. Each policy gets a fresh server process and a fresh state dir,
# back to back. Writes <out>/<policy>/online.json (+ online.png, attempts.jsonl), <out>/<policy>.load (uptime
# every 30 s), <out>/summary.json.
#
#   scripts/live_retrials.sh                   # 3000 requests at 6/s (best model: 2 slots / 0.5 s = 4/s)
#   N=300 RATE=6 OUT=/tmp/lr scripts/live_retrials.sh   # a short run
#   POLICIES=acqb OUT=reports/live_retrials_serving scripts/live_retrials.sh   # one policy (no comparison)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-3000}
RATE=${RATE:-6}
SEED=${SEED:-0}
OUT=${OUT:-reports/live_retrials}
POLICIES=${POLICIES:-acqb linucb}
URL=http://127.0.0.1:8030 # server.port in both configs
BR=.venv/bin/banditrouter
mkdir -p "$OUT"

[ -f checkpoints/acqb.pt ] || $BR train --policy acqb --out checkpoints/acqb.pt
[ -f checkpoints/linucb.pt ] || $BR train --policy linucb --out checkpoints/linucb.pt

run() {
    local name=$1 config=$2
    local state status=0
    state="state/live_retrials/$name-$(date +%Y%m%d-%H%M%S)" # fresh: a new event log, learner and spill
    echo "== $name: $config, state $state"
    $BR serve --config "$config" --state-dir "$state" >"$OUT/$name.serve.log" 2>&1 &
    local server=$!
    for _ in $(seq 300); do # Ray + the app: about a minute here
        curl -sf "$URL/health" >/dev/null 2>&1 && break
        kill -0 $server 2>/dev/null || { echo "server exited; see $OUT/$name.serve.log"; exit 1; }
        sleep 1
    done
    curl -sf "$URL/health" >/dev/null
    (while true; do echo "$(date +%s) $(uptime)"; sleep 30; done) >"$OUT/$name.load" &
    local watch=$!
    $BR simulate --url "$URL" --dataset routerbench --split train --requests "$N" --rate "$RATE" --retrials \
        --w-cost 0 --cold-start --seed "$SEED" --out "$OUT/$name" || status=$?
    kill $watch
    kill -INT $server
    wait $server || true
    [ "$status" -eq 0 ] || { echo "simulate failed ($status)"; exit "$status"; }
}

for policy in $POLICIES; do
    case $policy in
    acqb) run acqb configs/online-acqb.yaml ;;
    linucb) run linucb configs/online-linucb-implicit.yaml ;;
    *) echo "unknown policy $policy (acqb, linucb)" && exit 2 ;;
    esac
done
[ -f "$OUT/acqb/online.json" ] && [ -f "$OUT/linucb/online.json" ] || exit 0 # the comparison needs both

.venv/bin/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
res = {p: json.loads((out / p / "online.json").read_text()) for p in ("acqb", "linucb")}
keys = ("retrial_rate_first_500", "retrial_rate_last_500", "retrial_ratio_last_first", "retrial_rate", "status_503",
        "attempts", "queue_length_max", "queue_length_mean", "outstanding_max", "staleness_p50_s", "staleness_p95_s",
        "achieved_rate", "wall_s")
summary = {p: {k: r[k] for k in keys} for p, r in res.items()}
a, f = summary["acqb"], summary["linucb"]
summary["checks"] = {
    "acqb_last_500_le_0.8x_first_500": a["retrial_rate_last_500"] <= 0.8 * a["retrial_rate_first_500"],
    "acqb_last_500_below_fifo_linucb_last_500": a["retrial_rate_last_500"] < f["retrial_rate_last_500"],
    "acqb_staleness_p95_le_2s": a["staleness_p95_s"] is not None and a["staleness_p95_s"] <= 2.0,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for (p, r), color in zip(res.items(), ("tab:blue", "tab:red")):
    label = {"acqb": "ACQB (pool, joint scheduling)", "linucb": "LinUCB (FIFO per model)"}[p]
    w = r["windows_100"]
    axes[0].plot([x["requests"][1] for x in w], [x["retrial_rate"] for x in w], color=color, alpha=0.35)
    for j, x in enumerate(r["windows"]):
        axes[0].hlines(x["retrial_rate"], *x["requests"], color=color, lw=2.2, label=label if j == 0 else None)
    q = r["queue"]
    axes[1].plot([b["t"][1] for b in q], [b["queue_length_max"] if b["queue_length_max"] is not None else float("nan") for b in q],
                 color=color, label=label)
    axes[2].plot([b["t"][1] for b in q], [b["status_503"] for b in q], color=color, label=label)
axes[0].set(title="retrial rate (per 500 requests; thin: per 100)", xlabel="original requests", ylim=(0, 1))
axes[1].set(title="router queue length at decision (max per 10 s)", xlabel="seconds", ylim=(0, None))
axes[2].set(title="503 answers per 10 s", xlabel="seconds")
for ax in axes:
    ax.legend()
fig.suptitle(f"live, cold start, open loop {res['acqb']['rate']:g}/s (best model: 4/s), {res['acqb']['requests']} requests, "
             "implicit feedback only")
fig.tight_layout()
fig.savefig(out / "compare.png", dpi=120)
EOF
