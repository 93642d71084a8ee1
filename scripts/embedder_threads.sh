#!/usr/bin/env bash
# Per-thread CPU of the embedder replica while a bench runs (README, "The embedder alone on a core"): every 2 s,
# each thread's CPU ticks (utime + stime, /proc/<pid>/task/<tid>/stat) and context switches (voluntary,
# involuntary), one line per thread: "<unix time> <tid> <ticks> <voluntary> <involuntary>". Ends with the replica.
#
#   scripts/embedder_threads.sh > /tmp/threads.log &
#   .venv/bin/banditrouter bench --config configs/local.yaml --requests 600 --unloaded 0 --out /tmp/rb.json
#   .venv/bin/python scripts/embedder_threads.py /tmp/threads.log   # cores and involuntary switches per interval
#
# It forks a few small processes per thread every 2 s: it costs the machine some CPU of its own.
set -u
app=${BANDITROUTER_APP:-banditrouter}
until pgrep -f "ServeReplica:${app}:embedder" >/dev/null; do sleep 0.5; done
emb=$(pgrep -f "ServeReplica:${app}:embedder" | head -1)
while [ -d "/proc/$emb" ]; do
  ts=$(date +%s.%N)
  for t in /proc/"$emb"/task/*; do
    echo "$ts $(basename "$t") $(awk '{print $14+$15}' "$t"/stat 2>/dev/null) $(grep ctxt "$t"/status 2>/dev/null | awk '{print $2}' | tr '\n' ' ')"
  done
  sleep 2
done
