#!/usr/bin/env bash
# The SCHED_BATCH trial of issue 13 (README, "The embedder alone on a core"): while a bench runs, once the app's
# embedder is busy, move every thread of every other process of the app (Ray's daemons and workers, Serve's
# controller, the other replicas, HAProxy, the load generator) to SCHED_BATCH (`chrt -a -b`), so
# their wake-ups stop preempting the embedder's encode. No privilege is needed for one's own processes.
#
#   scripts/batch_others.sh &
#   .venv/bin/banditrouter bench --config configs/local.yaml --requests 600 --unloaded 0 --out /tmp/batched.json
#
# The raw half of the bench runs before the app exists, so it is not affected. Nothing is set back: the
# processes it moved keep SCHED_BATCH until they end (a bench's Ray ends with the bench). Run it only where the
# bench's Ray is the only Ray on the machine: it moves every Ray and HAProxy process it can. Only the first
# embedder replica is spared. It gives up after 10 minutes without an app, or when the embedder goes.
set -u
app=${BANDITROUTER_APP:-banditrouter}
others() { pgrep -f "ray::|ray/|banditrouter bench|haproxy" | grep -vx "$1"; }
for _ in $(seq 600); do pgrep -f "ServeReplica:${app}:embedder" >/dev/null && break; sleep 1; done
pgrep -f "ServeReplica:${app}:embedder" >/dev/null || { echo "no embedder replica of app ${app}" >&2; exit 1; }
emb=$(pgrep -f "ServeReplica:${app}:embedder" | head -1)
sleep 5
for p in $(others "$emb"); do chrt -a -b -p 0 "$p" >/dev/null 2>&1; done
# again once the embedder is busy (the routed phase), for processes that started since
while true; do
  [ -r "/proc/$emb/stat" ] || { echo "embedder $emb gone" >&2; exit 1; }
  a=$(awk '{print $14+$15}' "/proc/$emb/stat" 2>/dev/null); sleep 2; b=$(awk '{print $14+$15}' "/proc/$emb/stat" 2>/dev/null)
  [ $((b - a)) -gt 150 ] && break
done
n=0
for p in $(others "$emb"); do chrt -a -b -p 0 "$p" >/dev/null 2>&1 && n=$((n + 1)); done
echo "moved $n processes to SCHED_BATCH"
