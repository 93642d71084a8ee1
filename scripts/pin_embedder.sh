#!/usr/bin/env bash
# The pinning trial of issue 13 (README, "The embedder alone on a core"): while a bench runs, pin the embedder
# replica to CPU 0 and every other user process (Ray's, HAProxy, the other replicas, the load generator) to
# CPU 1, again every 2 s, until this script is stopped; then give every process both CPUs back. Linux, taskset.
#
#   scripts/pin_embedder.sh & pin=$!
#   .venv/bin/banditrouter bench --config configs/local.yaml --requests 600 --unloaded 100 --out /tmp/pinned.json
#   kill $pin
#
# The raw half of the bench runs before the embedder replica exists, so it is not pinned.
set -u
app=${BANDITROUTER_APP:-banditrouter}
user_pids() { ps --ppid 2 -p 2 -N -o pid=; }  # every process but the kernel's threads
unpin() {
  all="0-$(( $(nproc --all) - 1 ))"
  for p in $(user_pids); do taskset -a -p -c "$all" "$p" >/dev/null 2>&1; done
  exit 0
}
trap unpin TERM INT
while true; do
  emb=$(pgrep -f "ServeReplica:${app}:embedder" | head -1)
  if [ -n "$emb" ]; then
    for p in $(user_pids); do
      [ "$p" = "$$" ] && continue
      if [ "$p" = "$emb" ]; then cpus=0; else cpus=1; fi
      taskset -a -p -c "$cpus" "$p" >/dev/null 2>&1
    done
  fi
  sleep 2 &
  wait $!
done
