#!/usr/bin/env bash
# The SCHED_BATCH trial of issue 13 (README, "The embedder alone on a core"): while a bench runs, once the app's
# embedder is busy, move every thread of every other process of the app (Ray's daemons and workers, Serve's
# controller and proxy, the other replicas, HAProxy, the load generator) to SCHED_BATCH (`chrt -a -b`), so
# their wake-ups stop preempting the embedder's encode. No privilege is needed for one's own processes.
#
#   scripts/batch_others.sh &
#   .venv/bin/banditrouter bench --config configs/local.yaml --requests 600 --unloaded 0 --out /tmp/batched.json
#
# The raw half of the bench runs before the app exists, so it is not affected. The processes it moved end with
# the bench's Ray (the load generator's policy ends with it too).
set -u
app=${BANDITROUTER_APP:-banditrouter}
others() { pgrep -f "ray::|ray/|banditrouter bench|haproxy" | grep -vx "$1"; }
until pgrep -f "ServeReplica:${app}:embedder" >/dev/null; do sleep 1; done
emb=$(pgrep -f "ServeReplica:${app}:embedder" | head -1)
sleep 5
for p in $(others "$emb"); do chrt -a -b -p 0 "$p" >/dev/null 2>&1; done
# again once the embedder is busy (the routed phase), for processes that started since
while true; do
  a=$(awk '{print $14+$15}' "/proc/$emb/stat"); sleep 2; b=$(awk '{print $14+$15}' "/proc/$emb/stat")
  [ $((b - a)) -gt 150 ] && break
done
n=0
for p in $(others "$emb"); do chrt -a -b -p 0 "$p" >/dev/null 2>&1 && n=$((n + 1)); done
echo "moved $n processes to SCHED_BATCH"
