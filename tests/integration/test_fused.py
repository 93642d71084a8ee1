"""`router.fused: true`: the router runs inside the ingress replica (one Serve hop fewer) and keeps its duties
as a deployment: routing and streaming, its decision records, the weight sync with the learner (two fused
replicas both install a new version) and the decision shipper. The health check and shutdown hooks that start
and close them are unit-tested in tests/unit/test_bench.py."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import wait_for
from tests.integration.conftest import POOL, serve_online_linucb

PORT = 8019
BASE = f"http://127.0.0.1:{PORT}"
APP = "fused-test"


@pytest.fixture(scope="module", params=[False, True], ids=["handles-on-router-thread", "handles-on-loop"])
def fused(request, ray_local, tmp_path_factory, prompts):
    # both settings of router.handles_on_loop: the default (Serve's router thread) and the replica's loop
    tmp = tmp_path_factory.mktemp("fused")
    yield from serve_online_linucb(tmp, prompts, PORT, APP, fused=True, handles_on_loop=request.param)


def _route(text: str, **extra) -> requests.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": text}], **extra}
    return requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=60)


def test_fused_app_has_no_router_deployment(fused):
    from ray import serve

    status = serve.status().applications[APP].deployments
    assert "ingress" in status and "embedder" in status
    assert "router" not in status, "the router runs inside the ingress replica"


def test_fused_router_routes_streams_and_records(fused, prompts):
    r = _route(prompts.prompts[0])
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["model"] in POOL and routing["policy"] == "linucb" and routing["decision_id"]

    with requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "router", "stream": True, "messages": [{"role": "user", "content": prompts.prompts[1]}]},
        stream=True,
        timeout=60,
    ) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [ln.decode() for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
    assert chunks[0]["routing"]["model"] in POOL
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)

    health = requests.get(f"{BASE}/health", timeout=30).json()  # auth: none on loopback: the full view
    assert health["policy"] == "linucb" and set(health["models"]) == set(POOL)
    # router.handles_on_loop: the handles route on the replica's loop; by default on Serve's router thread. A
    # replica that has routed nothing yet says null: ask until one that has answers
    where = wait_for(lambda: requests.get(f"{BASE}/health", timeout=30).json()["serve_handles"])
    assert where == ("replica loop" if fused.router.handles_on_loop else "router thread")

    # router.coalesce_embeds (on by default): a replica that has routed counts its embedder calls and prompts; one
    # that has not says 0 calls, so ask until a replica that has answers
    def embedder_calls():
        c = requests.get(f"{BASE}/health", timeout=30).json()["embedder_calls"]
        return c if c["calls"] else None

    calls = wait_for(embedder_calls)
    assert calls and calls["calls"] >= 1 and calls["items"] >= calls["calls"]

    # each request lands on one of the two fused replicas and each replica keeps its own decisions: both
    # requests may have gone to one replica, so ask until a replica that holds some answers (no embeddings)
    def events():
        return requests.get(f"{BASE}/v1/routing/events", params={"n": 50}, timeout=30).json()["events"]

    held = wait_for(events)
    assert held and all(e["decision_id"] and "context" not in e for e in held)


def test_feedback_reaches_both_fused_replicas(fused, prompts):
    def stats():
        return requests.get(f"{BASE}/v1/learner/stats", timeout=30).json()

    v0 = stats()["learner"]["version"]
    for i in range(8):
        d = _route(prompts.prompts[10 + i]).json()["routing"]["decision_id"]
        assert (
            requests.post(
                f"{BASE}/v1/feedback", json={"decision_id": d, "score": float(prompts.scores[10 + i].max())}, timeout=30
            ).status_code
            == 200
        )
    v1 = wait_for(lambda: stats()["learner"]["version"] > v0 and stats()["learner"]["version"])
    assert v1, "the learner consumed the fused routers' decisions and the feedback"

    def replicas_at_v1():
        log = requests.get(f"{BASE}/v1/learner/installs", timeout=30).json()["installs"]
        return len({i["replica"] for i in log if i["version"] >= v1}) >= 2

    assert wait_for(replicas_at_v1), "both fused replicas long-poll the learner and install the new version"
    assert wait_for(lambda: _route(prompts.prompts[30]).json()["routing"]["policy_version"] >= v1, 10)
