"""The Serve app on a real local Ray (127.0.0.1), called with the official openai client.

The policy is BaRP trained on the RouterBench train split (as `banditrouter serve` pretrains it), so the
routing at the preference extremes can be compared with what the same policy decides offline.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

PORT = 8011
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from banditrouter.pipeline import run_train

    path = tmp_path_factory.mktemp("ckpt") / "barp.pt"
    return run_train("routerbench", "barp", path, progress=False), path


@pytest.fixture(scope="module")
def service(ray_local, trained):
    from ray import serve

    from banditrouter.config import load_config
    from deployments.app import build_app

    _, ckpt = trained
    cfg = load_config("configs/local.yaml")
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"checkpoint": ckpt})})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(cfg), name="banditrouter", route_prefix="/")
    yield cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="unused")


def ask(client, text, **kw):
    return client.chat.completions.with_raw_response.create(model="router", messages=[{"role": "user", "content": text}], **kw)


def test_routed_completion_carries_routing(client, service):
    raw = ask(client, "What is 17 * 3?", extra_body={"routing": {"preference": {"quality": 0.5, "cost": 0.5}}})
    r = raw.parse()
    routing = r.model_extra["routing"]
    assert {"decision_id", "model", "propensity", "policy", "policy_version", "cost_usd"} <= set(routing)
    assert r.model == routing["model"] in service.model_names
    assert raw.headers["x-decision-id"] == routing["decision_id"]
    assert routing["policy"] == "barp" and routing["propensity"] == 1.0 and routing["cost_usd"] > 0
    assert r.choices[0].message.content and r.usage.total_tokens > 0


def test_streaming(client):
    stream = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "Write a haiku."}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text
    assert chunks[0].model_extra["routing"]["model"] == chunks[0].model
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["routing"]["cost_usd"] > 0


def test_direct_call_to_a_pool_model(client):
    r = client.chat.completions.create(model="claude-v1", messages=[{"role": "user", "content": "Say hi"}])
    assert r.model == "claude-v1" and "routing" not in (r.model_extra or {})
    assert r.model_extra["backend"]["backend"] == "replay"


def test_models_and_health(client, service):
    assert [m.id for m in client.models.list()] == ["router", *service.model_names]
    h = requests.get(f"{BASE}/health", timeout=30).json()
    assert h["status"] == "ok" and h["policy"] == "barp"


def _chat(body: bytes | dict, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{BASE}/v1/chat/completions", data=data, headers={"content-type": "application/json", **(headers or {})}, timeout=60
    )


OK = {"model": "router", "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "router", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
        (b"[1, 2, 3]", 400, "JSON object"),
        ({"model": "router"}, 422, "messages"),
        ({"model": 7, "messages": OK["messages"]}, 422, "model"),
        ({"model": "router", "messages": "hello"}, 422, "messages"),
        ({"model": "router", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 422, "max_tokens"),
        ({**OK, "routing": {"preference": {"quality": -1, "cost": 1}}}, 422, "quality"),
        ({**OK, "routing": {"preference": {"quality": 0, "cost": 0}}}, 422, "both be zero"),
        ({**OK, "routing": {"preference": {"quality": "high", "cost": 0}}}, 422, "quality"),
        (
            b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], '
            b'"routing": {"preference": {"quality": NaN, "cost": 1}}}',
            422,
            "quality",
        ),
        ({"model": "gpt-7", "messages": OK["messages"]}, 404, "unknown model"),
    ],
)
def test_bad_input_gets_4xx_json_and_service_keeps_serving(service, body, status, needle):
    r = _chat(body, headers={"x-request-id": "bad-input-test"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["request_id"] == "bad-input-test"
    assert r.headers["x-request-id"] == "bad-input-test"
    ok = _chat(OK)
    assert ok.status_code == 200 and ok.json()["routing"]["model"] in service.model_names


def test_preference_extremes_route_as_offline_evaluation_predicts(client, trained):
    """cost=1 sends most requests to cheap models, quality=1 mostly to the strongest; the service decides as
    the same policy does offline on the same prompts."""
    from banditrouter.pipeline import load_split

    policy, _ = trained
    test = load_split("routerbench", "test", limit=40, seed=1, progress=False)
    mean_cost = dict(zip(test.log.models, np.nanmean(test.log.costs, axis=0), strict=True))
    cheap = {m for m, c in mean_cost.items() if c <= np.median(list(mean_cost.values()))}
    for pref, check in (({"quality": 0, "cost": 1}, "cheap"), ({"quality": 1, "cost": 0}, "strong")):
        served = [ask(client, p, extra_body={"routing": {"preference": pref}}).parse().model for p in test.log.prompts]
        offline = [policy.models[a] for a in policy.select(test.contexts, np.array([[pref["quality"], pref["cost"]]])).arms]
        agree = np.mean([a == b for a, b in zip(served, offline, strict=True)])
        assert agree >= 0.9, (pref, agree)
        if check == "cheap":
            assert np.mean([m in cheap for m in served]) >= 0.8, served
        else:
            assert np.mean([m == "gpt-4-1106-preview" for m in served]) >= 0.5, served


def test_generated_request_id_matches_header(service):
    r = _chat({"model": "nope", "messages": OK["messages"]})
    assert r.status_code == 404 and r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_decisions_are_recorded(client):
    r = ask(client, "Name a prime number.").parse()
    events = requests.get(f"{BASE}/v1/routing/events", params={"n": 50}, timeout=30).json()["events"]
    ev = next(e for e in events if e["decision_id"] == r.model_extra["routing"]["decision_id"])
    assert ev["model"] == r.model and ev["context_ref"] and ev["event_id"]
    assert "context" not in ev and "turn_context" not in ev  # raw embeddings never go to clients


class _Refusing(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that refuses every request (400: not retried, the replica stays healthy)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"error": {"message": "model overloaded", "type": "invalid_request_error"}}).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def failing(service, tmp_path_factory):
    """A second app, under /failing: a random router over a model that always fails (its upstream refuses)
    and one that takes 30 s (replay with simulated latency), with `router.model_timeout_s: 1`."""
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    pool = ["claude-v1", "refusing"]
    ckpt = save_checkpoint(make_policy("random", pool, 384, tau=0.01), tmp_path_factory.mktemp("failing") / "random.pt")
    cfg = load_config(
        {
            "policy": {"name": "random", "checkpoint": str(ckpt), "explore": True},
            "embedder": {"ray_actor_options": {"num_cpus": 0.1}},
            "router": {"model_timeout_s": 1.0, "ray_actor_options": {"num_cpus": 0.1}},
            "models": [
                {"name": "claude-v1", "replay": {"simulate_latency": True, "base_latency_s": 30}},
                {
                    "name": "refusing",
                    "backend": "openai",
                    "openai": {"base_url": f"http://127.0.0.1:{upstream.server_port}/v1", "max_retries": 0},
                    "input_price_per_mtok": 1.0,
                    "output_price_per_mtok": 1.0,
                },
            ],
        }
    )
    serve.run(build_app(cfg), name="failing", route_prefix="/failing")
    yield cfg
    serve.delete("failing")
    upstream.shutdown()


def test_refused_and_timed_out_model_calls_are_400_504_and_logged_as_outcomes(failing, service):
    """A routed call whose upstream refuses the request (4xx: never retried, no fallback) answers 400
    `upstream_refused`, one that runs past router.model_timeout_s 504 (same error JSON), and both are logged as
    decisions with that outcome (refusal: cost 0; timeout: its cost bound) plus an outcome event of that kind
    with value 0, so a learning policy sees that the arm fails. (5xx: retried, then a fallback model:
    tests/integration/test_failures.py.)"""
    seen: dict[int, requests.Response] = {}
    for k in range(20):  # the router picks uniformly between the two: both show up within a few requests
        r = requests.post(f"{BASE}/failing/v1/chat/completions", json=OK, headers={"x-request-id": f"failing-{k}"}, timeout=60)
        seen.setdefault(r.status_code, r)
        if {400, 504} <= set(seen):
            break
    assert set(seen) == {400, 504}, {k: v.text for k, v in seen.items()}
    for status, kind, code in ((400, "invalid_request_error", "upstream_refused"), (504, "timeout_error", "model_timeout")):
        err = seen[status].json()["error"]
        assert (err["type"], err["code"]) == (kind, code) and err["message"]
        assert err["request_id"] == seen[status].headers["x-request-id"]
        assert "127.0.0.1" not in err["message"]  # never the upstream's URL
    assert "did not answer within 1 s" in seen[504].json()["error"]["message"]
    events = requests.get(f"{BASE}/failing/v1/routing/events", params={"n": 200}, timeout=30).json()["events"]
    decisions = {e["decision_id"]: e for e in events if e["kind"] == "decision"}
    outcomes = {e["decision_id"]: e for e in events if e["kind"] in ("error", "timeout")}
    assert {e["outcome"] for e in decisions.values()} == {"error", "timeout"}
    for d, e in decisions.items():
        assert e["model"] == ("refusing" if e["outcome"] == "error" else "claude-v1")
        # a refusal billed nothing; a timeout may have been billed: it carries the request's cost bound there
        assert e["cost_usd"] == 0.0 if e["outcome"] == "error" else e["cost_usd"] > 0
        assert (outcomes[d]["kind"], outcomes[d]["value"]) == (e["outcome"], 0.0)
    assert _chat(OK).status_code == 200  # the main app is unaffected
