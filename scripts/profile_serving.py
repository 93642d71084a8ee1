"""Where the CPU goes while the app serves: per-process CPU from /proc (and optionally py-spy shares) during
the loaded phase of one `banditrouter bench` run; prints JSON.

It starts `banditrouter bench` (no unloaded phase), waits for Serve's "is ready" line, lets the warm-up pass,
then reads every process's CPU seconds from /proc/<pid>/stat at the start and end of a window and groups them
by what the process is (the embedder replica, the ingress replica with its fused router, the model replicas,
Serve's proxy and controller, the load generator, Ray's own daemons). With `--py-spy` it also records the
ingress and embedder replicas over the same window (50 Hz, `py-spy record --format raw`) and reports the
share of samples inside a few named functions (Serve's request path, our routing code, Ray's metrics).

    .venv/bin/python scripts/profile_serving.py --config configs/local.yaml --prompt-chars 200 --py-spy

Linux only (/proc). py-spy is not a dependency: `pip install py-spy`. The profiler itself takes some CPU;
the window's total shows it under "other".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

GROUPS = (
    ("embedder", "ServeReplica:banditrouter:embedder"),
    ("ingress", "ServeReplica:banditrouter:ingress"),
    ("router", "ServeReplica:banditrouter:router"),
    ("models", "ServeReplica:banditrouter:model:"),
    ("proxy", "ProxyActor"),
    ("controller", "ServeController"),
    ("load_generator", ("banditrouter bench", "banditrouter.cli bench")),
    ("profiler", ("py-spy", "profile_serving.py")),
    ("ray_daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")),
)
FUNCTIONS = {
    "sentence_transformers_encode": "encode (sentence_transformers",
    "serve_user_code_loop": "_run_user_code_event_loop",
    "serve_router_loop": "_run_router_event_loop",
    "fastapi_middleware": "starlette/middleware",
    "ray_actor_call": "_remote (ray/actor.py",
    "ray_metrics_record": "_record (ray/util/metrics.py",
    "router_route": "route (deployments/router.py",
    "router_emit": "_emit (deployments/router.py",
}


def _group(cmdline: str) -> str:
    for name, pats in GROUPS:
        for pat in (pats,) if isinstance(pats, str) else pats:
            if pat in cmdline:
                return name
    return "other"


def _snapshot() -> dict[int, tuple[str, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def _pid_of(pattern: str) -> int | None:
    for pid, (cmd, _) in _snapshot().items():
        if pattern in cmd and pid != os.getpid():
            return pid
    return None


def _spy_shares(raw: Path) -> dict:
    """Share of samples whose stack holds each named function, and the top leaf frames."""
    total, inside, leaves = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        total += int(n)
        leaves[stack.split(";")[-1][:100]] += int(n)
        for key, pat in FUNCTIONS.items():
            if pat in stack:
                inside[key] += int(n)
    return {
        "samples": total,
        "shares": {k: round(inside[k] / total, 3) if total else None for k in FUNCTIONS},
        "top_leaves": [[f, round(c / total, 3)] for f, c in leaves.most_common(8)] if total else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--prompt-chars", type=int, default=200, help="0: RouterBench prompts as they are")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup-s", type=float, default=15.0, help="after 'is ready': the warm-up requests, then load")
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--py-spy", action="store_true", help="also sample the ingress and embedder replicas")
    args = ap.parse_args()
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if args.py_spy and not py_spy:
        sys.exit("--py-spy: py-spy is neither on PATH nor beside this Python (pip install py-spy)")
    tmp = Path(tempfile.mkdtemp(prefix="profile_serving_"))
    bench_json = tmp / "bench.json"
    cmd = [sys.executable, "-m", "banditrouter.cli", "bench", "--config", args.config, "--requests", str(args.requests)]
    cmd += ["--concurrency", str(args.concurrency), "--unloaded", "0", "--out", str(bench_json)]
    if args.prompt_chars:
        cmd += ["--prompt-chars", str(args.prompt_chars)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    ready = threading.Event()
    log = tmp / "bench.log"

    def pump():
        with log.open("w") as fh:
            for line in proc.stdout:
                fh.write(line)
                if "is ready" in line:
                    ready.set()

    threading.Thread(target=pump, daemon=True).start()
    while not ready.wait(1.0):
        if proc.poll() is not None:
            sys.exit(f"bench ended before serving (exit {proc.returncode}); its output: {log}")
    time.sleep(args.warmup_s)
    spies = []
    if args.py_spy:
        for name in ("ingress", "embedder"):
            pid = _pid_of(f"ServeReplica:banditrouter:{name}")
            if pid is not None:
                out = tmp / f"{name}.txt"
                spy = [py_spy, "record", "-p", str(pid), "-d", str(int(args.window_s)), "-r", "50", "-f", "raw"]
                spy += ["-o", str(out), "--nonblocking"]
                spies.append((name, out, subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    a, t0 = _snapshot(), time.monotonic()
    time.sleep(args.window_s)
    b, window = _snapshot(), time.monotonic() - t0
    for _, _, p in spies:
        p.wait()
    if proc.wait() != 0:
        sys.exit(f"bench failed (exit {proc.returncode}); its output: {log}")
    cores: Counter = Counter()
    for pid, (cmdline, cpu) in b.items():
        if pid in a:
            cores[_group(cmdline)] += (cpu - a[pid][1]) / window
    bench = json.loads(bench_json.read_text())
    busy = sum(cores.values())
    out = {
        "config": args.config,
        "prompt_max_chars": bench["prompt_max_chars"],
        "window_s": round(window, 1),
        "routed_rps": round(bench["routed_rps"], 2),
        "ratio": round(bench["ratio"], 3),
        "cpus": os.cpu_count(),
        "cores_busy": round(busy, 2),
        "cpu_ms_per_routed_request": round(1e3 * busy / bench["routed_rps"], 1),
        "cores": {k: round(v, 3) for k, v in cores.most_common()},
        "py_spy": {name: _spy_shares(out) for name, out, _ in spies if out.exists()},
        "bench_json": str(bench_json),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
