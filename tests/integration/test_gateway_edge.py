"""The gateway's HTTP edge on a real local Ray (127.0.0.1): the issue's client probes (defects 1-5, 7, 9-12)
against the served app, with API keys on, online learning on, replay models and two OpenAI-compatible
upstreams: `broken` (nothing listens on its port) and `partial` (a local server that answers without usage,
and whose streams fail after their first chunk).

Serve's proxy must run the gateway's proxy callback (deployments/gateway/errors.py) for over-long client
request ids to be replaced in the header as well as in the body: it is read from the environment of the
process that starts Ray, so it is set here before the session's Ray starts.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.conftest import free_port
from tests.integration.conftest import POOL

PORT = 8031
BASE = f"http://127.0.0.1:{PORT}"
APP = "gateway-edge"
JSON = {"content-type": "application/json"}
OK = {"model": "router", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


class _Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream: answers without `usage`; a stream sends one chunk, then an error event."""

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        if req.get("stream"):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "partial",
                "choices": [{"index": 0, "delta": {"content": "Hello "}, "finish_reason": None}],
            }
            failure = {"error": {"message": "upstream exploded at /srv/internal pid=4242", "type": "server_error"}}
            payload = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(failure)}\n\n".encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
        else:
            payload = json.dumps(
                {
                    "id": "x1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "partial",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "four, I think"}, "finish_reason": "stop"}
                    ],
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gateway(ray_local, data_dir, tmp_path_factory):
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from deployments.gateway.auth import create_key
    from deployments.gateway.budgets import kill_ledgers
    from learner.actors import kill_actors

    tmp = tmp_path_factory.mktemp("edge")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    keys = {scope: create_key(tmp / "keys.yaml", f"{scope}-key", [scope])[0] for scope in ("route", "admin")}
    ckpt = save_checkpoint(make_policy("linucb", POOL, 384, tau=0.01), tmp / "linucb.pt")
    priced = {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt), "explore": True},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"model_timeout_s": 20, "ray_actor_options": {"num_cpus": 0.1}},
            "learning": {"enabled": True, "state_dir": str(tmp / "state"), "batch_size": 4, "max_wait_s": 0.2},
            "gateway": {
                "auth": {"mode": "keys", "keys_file": str(tmp / "keys.yaml")},
                "limits": {"max_body_bytes": 65536, "max_messages": 8},
                "state_dir": str(tmp / "gateway"),
            },
            "models": [
                *({"name": m, "replay": {"split": "test"}} for m in POOL),
                {
                    "name": "broken",
                    "backend": "openai",
                    "openai": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_retries": 0},
                    **priced,
                },
                {
                    "name": "partial",
                    "backend": "openai",
                    "openai": {"base_url": f"http://127.0.0.1:{upstream.server_port}/v1", "max_retries": 0},
                    **priced,
                },
            ],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield {"route": {"authorization": f"Bearer {keys['route']}"}, "admin": {"authorization": f"Bearer {keys['admin']}"}}
    serve.delete(APP)
    serve.shutdown()
    kill_actors()
    kill_ledgers()
    upstream.shutdown()


def post(path: str, data: bytes | dict, headers: dict, timeout: float = 60) -> requests.Response:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return requests.post(f"{BASE}{path}", data=raw, headers=headers, timeout=timeout)


def error_of(r: requests.Response, status: int) -> dict:
    """The documented error shape, its request id also the (one) x-request-id header."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "request_id"} and err["message"]
    assert r.headers["x-request-id"] == err["request_id"], r.headers
    return err


def test_deep_json_and_nested_message_extras_are_422(gateway):
    """Defect 1: depth 10,000 in an extra field, and depth 900 inside a message (PicklingError on main)."""
    h = {**JSON, **gateway["route"]}
    deep = b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    err = error_of(post("/v1/chat/completions", deep, h), 422)
    assert err["code"] == "json_too_deep", err
    nested = b'{"model": "router", "messages": [{"role": "user", "content": "hi", "x": ' + b"[" * 900 + b"]" * 900 + b"}]}"
    err = error_of(post("/v1/chat/completions", nested, h), 422)
    assert err["code"] == "json_too_deep", err
    assert post("/v1/chat/completions", OK, h).status_code == 200


def test_huge_integers_are_422_and_a_huge_score_is_a_counted_refusal(gateway):
    """Defect 2: a 5,000-digit max_tokens, a 401-digit feedback score (counted at the buffer)."""
    h = {**JSON, **gateway["route"]}
    raw = b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"
    assert "max_tokens" in error_of(post("/v1/chat/completions", raw, h), 422)["message"]
    decision = post("/v1/chat/completions", OK, h).json()["routing"]["decision_id"]
    before = requests.get(f"{BASE}/v1/learner/stats", headers=gateway["admin"], timeout=30).json()["buffer"]["refused"]
    score = b'{"decision_id": "' + decision.encode() + b'", "score": ' + b"1" * 401 + b"}"
    assert error_of(post("/v1/feedback", score, h), 422)["code"] == "not_finite"
    after = requests.get(f"{BASE}/v1/learner/stats", headers=gateway["admin"], timeout=30).json()["buffer"]["refused"]
    assert after.get("not_finite", 0) == before.get("not_finite", 0) + 1


def test_lone_surrogate_is_422_and_huge_preferences_route(gateway):
    """Defects 3 and 4."""
    h = {**JSON, **gateway["route"]}
    raw = b'{"model": "router", "messages": [{"role": "user", "content": "\\ud800 hi"}]}'
    assert "messages.0.content" in error_of(post("/v1/chat/completions", raw, h), 422)["message"]
    r = post("/v1/chat/completions", {**OK, "routing": {"preference": {"quality": 1e308, "cost": 1e308}}}, h)
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["model"] in POOL


def test_state_changing_routes_take_json_only(gateway):
    """Defect 5: a cross-origin text/plain POST (or one with no body) cannot reset the policy or score."""
    evil = {"Origin": "http://evil.example", "content-type": "text/plain", **gateway["admin"]}
    for path in ("/v1/learner/reset", "/v1/learner/flush", "/v1/feedback", "/v1/chat/completions"):
        assert error_of(post(path, b"{}", evil), 415)["code"] == "unsupported_media_type", path
        r = requests.post(f"{BASE}{path}", headers=gateway["admin"], timeout=30)  # no body, no content-type
        assert error_of(r, 415)["code"] == "unsupported_media_type", path
    assert post("/v1/learner/reset", {}, {**JSON, **gateway["admin"]}).json()["version"] >= 0


def test_502_body_carries_no_internals(gateway):
    """Defect 9: a fixed message and the model's name; no URL, port, traceback, path, PID, actor id, ANSI."""
    r = post("/v1/chat/completions", {**OK, "model": "broken"}, {**JSON, **gateway["route"]})
    err = error_of(r, 502)
    assert "broken" in err["message"] and len(r.content) < 400, r.text
    for leak in ("127.0.0.1", "http", "Traceback", "File ", ".py", "pid", "Actor", "\x1b[", "Error"):
        assert leak not in r.text, (leak, r.text)


def test_streams_fail_as_status_codes_before_the_first_byte_and_with_an_error_event_midway(gateway):
    """Defect 7 (ingress side): a model that cannot answer is a 502 status, not a 200 that stops; a stream
    that fails after its first chunk ends with an error event in the error shape, then [DONE]."""
    h = {**JSON, **gateway["route"]}
    r = post("/v1/chat/completions", {**OK, "model": "broken", "stream": True}, h)
    assert error_of(r, 502)
    r = post("/v1/chat/completions", {**OK, "model": "partial", "stream": True}, {**h, "x-request-id": "stream-mid-1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    err = json.loads(events[-2])["error"]
    assert err["request_id"] == "stream-mid-1" and err["type"] and "/srv" not in err["message"] and "4242" not in err["message"]
    assert any("Hello" in e for e in events[:-2])


def test_estimated_usage_is_flagged(gateway):
    r = post("/v1/chat/completions", {**OK, "model": "partial"}, {**JSON, **gateway["route"]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["estimated"] is True and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_events_are_admin_only_without_embeddings_and_stats_without_paths(gateway):
    """Defect 10."""
    post("/v1/chat/completions", OK, {**JSON, **gateway["route"]})
    assert error_of(requests.get(f"{BASE}/v1/routing/events", timeout=30), 401)["code"] == "invalid_api_key"
    assert (
        error_of(requests.get(f"{BASE}/v1/routing/events", headers=gateway["route"], timeout=30), 403)["code"]
        == "insufficient_scope"
    )
    events = requests.get(f"{BASE}/v1/routing/events", params={"n": 50}, headers=gateway["admin"], timeout=30).json()["events"]
    assert events and all("context" not in e and "turn_context" not in e for e in events)
    stats = requests.get(f"{BASE}/v1/learner/stats", headers=gateway["admin"], timeout=30)
    assert stats.status_code == 200 and "/" not in json.dumps(
        stats.json()["buffer"]["path"] + stats.json()["learner"]["checkpoint"]
    )
    assert error_of(requests.get(f"{BASE}/v1/learner/stats", headers=gateway["route"], timeout=30), 403)


def test_health_says_ok_and_nothing_else_unless_admin(gateway):
    assert requests.get(f"{BASE}/health", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{BASE}/health", headers=gateway["route"], timeout=30).json() == {"status": "ok"}
    full = requests.get(f"{BASE}/health", headers=gateway["admin"], timeout=30).json()
    assert full["status"] == "ok" and full["policy"] == "linucb" and "broken" in full["models"]


@pytest.mark.parametrize(
    "method, path, params, status, code",
    [
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
        ("DELETE", "/v1/models", None, 405, "method_not_allowed"),
        ("GET", "/v1/routing/events", {"n": "many"}, 422, None),
        ("GET", "/v1/routing/events", {"n": 0}, 422, None),
    ],
)
def test_framework_errors_have_the_documented_shape(gateway, method, path, params, status, code):
    """Defect 11."""
    r = requests.request(method, f"{BASE}{path}", params=params, headers={**gateway["admin"], "x-request-id": "fw-1"}, timeout=30)
    err = error_of(r, status)
    assert err["code"] == code and err["request_id"] == "fw-1"


def test_long_or_odd_client_request_ids_are_replaced(gateway):
    """Defect 11: never echoed beyond gateway.limits.max_request_id_chars (128) or with odd characters."""
    for bad in ("r" * 300, "bad id with spaces", "<x>"):
        r = requests.get(f"{BASE}/v1/nothing", headers={"x-request-id": bad}, timeout=30)
        err = error_of(r, 404)
        assert err["request_id"] != bad and bad not in r.headers["x-request-id"]
    r = post("/v1/chat/completions", OK, {**JSON, **gateway["route"], "x-request-id": "k" * 128})
    assert r.status_code == 200 and r.headers["x-request-id"] == "k" * 128


def test_passthrough_fields_are_refused_by_name_where_a_reachable_model_cannot_honour_them(gateway):
    """Defect 12: replay models cannot take tools / response_format / n > 1; an OpenAI upstream gets them."""
    h = {**JSON, **gateway["route"]}
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    for extra, field in (
        ({"tools": tools}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
    ):
        err = error_of(post("/v1/chat/completions", {**OK, **extra}, h), 400)
        assert err["code"] == "unsupported_parameter" and err["message"].startswith(f"{field}:"), err
    assert post("/v1/chat/completions", {**OK, "n": 1}, h).status_code == 200
    r = post("/v1/chat/completions", {**OK, "model": "partial", "response_format": {"type": "json_object"}}, h)
    assert r.status_code == 200, r.text


def test_size_limits(gateway):
    h = {**JSON, **gateway["route"]}
    big = {**OK, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert error_of(post("/v1/chat/completions", big, h), 413)["code"] == "body_too_large"
    many = {**OK, "messages": [{"role": "user", "content": "hi"}] * 9}
    assert "messages" in error_of(post("/v1/chat/completions", many, h), 422)["message"]
    assert "user" in error_of(post("/v1/chat/completions", {**OK, "user": "u" * 300}, h), 422)["message"]
    long_header = {**h, "x-user-id": "u" * 300}  # the header form of `user` has the same limit
    assert "x-user-id" in error_of(post("/v1/chat/completions", OK, long_header), 422)["message"]
