"""The gateway's edge without Ray: body checks and schemas (deployments/gateway/parsing.py), and the error
shape / request id / body size middleware (deployments/gateway/errors.py) driven as a plain ASGI app.

The inputs are the issue's probes (defects 1-5, 11, 12): on main each of them escaped as a 500 or was
accepted; here each must be a 4xx with a message that names what is wrong.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import Depends, FastAPI, Query, Request

from banditrouter.config import LimitsConfig, ModelConfig
from deployments.gateway import errors, parsing
from deployments.gateway.errors import ApiError

LIMITS = LimitsConfig()
OK = {"model": "router", "messages": [{"role": "user", "content": "hello"}]}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def refused(raw: bytes, limits=LIMITS) -> ApiError:
    with pytest.raises(ApiError) as e:
        parsing.parse_chat(parsing.loads_object(raw, limits), limits)
    return e.value


# ---------------------------------------------------------------------------------------------------------
# defect 1: nesting
# ---------------------------------------------------------------------------------------------------------
def test_deep_nesting_in_an_extra_field_is_422_not_a_recursion_error():
    raw = b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    e = refused(raw)
    assert (e.status, e.code) == (422, "json_too_deep") and "32 levels" in e.message


def test_nested_extra_fields_in_a_message_are_refused_and_unknown_message_fields_never_forwarded():
    deep = "[" * 900 + "]" * 900
    raw = b'{"model": "router", "messages": [{"role": "user", "content": "hi", "extra": ' + deep.encode() + b"}]}"
    assert refused(raw).code == "json_too_deep"
    # shallow extras are accepted but dropped: only role/content/name/tool_calls/tool_call_id go on to Ray
    req = parsing.parse_chat(
        {"model": "router", "messages": [{"role": "user", "content": "hi", "extra": {"a": [1]}, "refusal": None}]}, LIMITS
    )
    assert req.messages[0].forwarded() == {"role": "user", "content": "hi"}


def test_depth_scan_skips_brackets_inside_strings_and_allows_the_limit_itself():
    assert not parsing.json_depth_exceeds(json.dumps({"a": "[" * 1000 + '\\"{' * 50}), 4)
    at_limit = "[" * 32 + "]" * 32
    assert not parsing.json_depth_exceeds(at_limit, 32) and parsing.json_depth_exceeds("[" + at_limit + "]", 32)
    parsing.loads_object(body({**OK, "x": json.loads(at_limit[1:-1])}), LIMITS)  # the object + 31 arrays = 32: fine
    with pytest.raises(ApiError):
        parsing.loads_object(body({**OK, "x": json.loads(at_limit)}), LIMITS)  # the object + 32 arrays = 33 > 32


# ---------------------------------------------------------------------------------------------------------
# defect 2: huge integers
# ---------------------------------------------------------------------------------------------------------
def test_integer_over_4300_digits_is_422_not_a_value_error():
    raw = b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"
    e = refused(raw)
    assert e.status == 422 and "max_tokens" in e.message


def test_401_digit_feedback_score_reaches_the_buffer_as_a_counted_refusal(tmp_path):
    from learner.buffer import EventBuffer, FeedbackRefused

    raw = b'{"decision_id": "d1", "score": ' + b"1" * 401 + b"}"
    fb = parsing.parse_feedback(parsing.loads_object(raw, LIMITS))
    buf = EventBuffer(tmp_path / "e.sqlite")
    with pytest.raises(FeedbackRefused) as e:
        buf.add_feedback(fb.decision_id, fb.score, "ev-1")
    assert e.value.status == 422 and buf.stats()["refused"].get("not_finite") == 1
    buf.close()


# ---------------------------------------------------------------------------------------------------------
# defect 3: lone surrogates
# ---------------------------------------------------------------------------------------------------------
def test_lone_surrogate_in_content_is_422_naming_the_field():
    e = refused(b'{"model": "router", "messages": [{"role": "user", "content": "\\ud800 hi"}]}')
    assert (e.status, e.code) == (422, "invalid_text") and e.message.startswith("messages.0.content")
    # a proper pair is one character, and fine
    req = parsing.parse_chat(
        parsing.loads_object(b'{"model": "r", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}', LIMITS), LIMITS
    )
    assert req.messages[0].content == "\U0001f600"


# ---------------------------------------------------------------------------------------------------------
# defect 4: preference overflow
# ---------------------------------------------------------------------------------------------------------
def test_huge_preference_weights_normalise_without_overflow():
    req = parsing.parse_chat({**OK, "routing": {"preference": {"quality": 1e308, "cost": 1e308}}}, LIMITS)
    assert req.preference((0.7, 0.3)) == (0.5, 0.5)
    req = parsing.parse_chat({**OK, "routing": {"preference": {"quality": 1e308, "cost": 5e-324}}}, LIMITS)
    q, c = req.preference((0.7, 0.3))
    assert q == 1.0 and 0 <= c < 1e-300
    assert "both be zero" in refused(body({**OK, "routing": {"preference": {"quality": 0, "cost": 0}}})).message
    assert (
        "quality"
        in refused(
            b'{"model": "r", "messages": [{"role": "user", "content": "x"}], '
            b'"routing": {"preference": {"quality": Infinity, "cost": 1}}}'
        ).message
    )


# ---------------------------------------------------------------------------------------------------------
# size limits
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, needle",
    [
        ({"messages": [{"role": "user", "content": "hi"}] * 5}, "5 messages; the limit is 4"),
        ({"messages": [{"role": "user", "content": "x" * 1001}]}, "1001 characters"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 1001}]}]}, "1001 characters"),
        ({"max_tokens": 101}, "max_tokens: Value error, must be at most 100"),
        ({"user": "u" * 17}, "user: Value error, is 17 characters"),
    ],
)
def test_config_limits_are_422(change, needle):
    limits = LimitsConfig(max_messages=4, max_message_chars=1000, max_tokens=100, max_user_chars=16)
    e = refused(body({**OK, **change}), limits)
    assert e.status == 422 and needle in e.message, e.message


def test_body_over_the_limit_is_413_and_bad_bytes_400():
    limits = LimitsConfig(max_body_bytes=1024)
    assert refused(body({**OK, "pad": "x" * 2000}), limits).status == 413
    assert refused(b'{"model": "router", "messages": [{"role": "user", "content": "\xff"}]}').status == 400
    assert refused(b"{not json").status == 400 and refused(b"[1]").message == "request body must be a JSON object"


# ---------------------------------------------------------------------------------------------------------
# defect 12: passthrough fields
# ---------------------------------------------------------------------------------------------------------
def test_passthrough_fields_are_kept_and_refused_by_name_where_a_backend_cannot_honour_them():
    replay = ModelConfig(name="r1")
    upstream = ModelConfig(
        name="up", backend="openai", openai={"base_url": "http://127.0.0.1:9/v1"}, input_price_per_mtok=1, output_price_per_mtok=1
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = parsing.parse_chat(
        {**OK, "tools": tools, "tool_choice": "auto", "n": 2, "response_format": {"type": "json_object"}}, LIMITS
    )
    pt = req.passthrough()
    assert pt == {"n": 2, "tools": tools, "tool_choice": "auto", "response_format": {"type": "json_object"}}
    parsing.check_passthrough(pt, [upstream])
    with pytest.raises(ApiError) as e:
        parsing.check_passthrough(pt, [upstream, replay])
    assert e.value.status == 400 and e.value.message.startswith("n: model 'r1'") and e.value.code == "unsupported_parameter"
    with pytest.raises(ApiError) as e:
        parsing.check_passthrough({"response_format": {"type": "json_object"}}, [replay])
    assert e.value.message.startswith("response_format:")
    assert parsing.parse_chat({**OK, "n": 1}, LIMITS).passthrough() is None  # n = 1 is every backend's default
    parsing.check_passthrough(None, [replay])


# ---------------------------------------------------------------------------------------------------------
# errors.py: the one shape for every answer, request ids, body size, the 500 of last resort
# ---------------------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def response(self, route: str, status: int) -> None:
        self.seen.append((route, status))


def make_app(limits=LIMITS):
    app = FastAPI()
    metrics = Metrics()

    def bind(a):
        a.state.limits, a.state.metrics, a.state.gateway_ready = limits, metrics, True

    errors.install(app, bind)
    proxied = behind_serve_proxy(app)

    def needs_key(request: Request):
        if request.headers.get("authorization") != "Bearer ok":
            raise ApiError(401, "missing API key", "authentication_error", "invalid_api_key")

    @app.post("/echo")
    async def echo(request: Request, _k: None = Depends(needs_key), _j: None = Depends(parsing.require_json)):
        return {"n": len(await request.body())}

    @app.get("/items")
    async def items(n: int = Query(1, ge=1, le=10)):
        return {"n": n}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret /srv/path pid=1234 http://upstream.internal:9000")

    @app.get("/busy")
    async def busy():
        raise ApiError(503, "busy", "overloaded", retry_after_s=0.2)

    return proxied, metrics


def behind_serve_proxy(app):
    """The app as Serve 2.60's HTTP proxy serves it: Ray's own RequestIdMiddleware (it takes the client's
    x-request-id or makes one, and appends it to every answer), wrapped by the middlewares of the proxy
    callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`), exactly as `_apply_middlewares` composes them."""
    from ray.serve._private.http_util import _apply_middlewares

    return _apply_middlewares(app, errors.proxy_middlewares())


def call(app, method: str, path: str, headers: dict | None = None, chunks: list[bytes] | None = None):
    """One request through the ASGI app: (status, headers dict (lists), JSON body or raw bytes)."""
    raw_headers = [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    parts = list(chunks or [b""])
    sent: list[dict] = []

    async def receive():
        if parts:
            b = parts.pop(0)
            return {"type": "http.request", "body": b, "more_body": bool(parts)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "headers": raw_headers,
    }
    if "?" in path:
        scope["path"], q = path.split("?", 1)
        scope["query_string"] = q.encode()
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    hdrs: dict[str, list[str]] = {}
    for k, v in start["headers"]:
        hdrs.setdefault(k.decode().lower(), []).append(v.decode("latin-1"))
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return start["status"], hdrs, payload


def shaped(status, hdrs, payload, code_status):
    assert status == code_status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "code", "request_id"} and err["message"]
    assert hdrs["x-request-id"] == [err["request_id"]]
    return err


@pytest.mark.parametrize(
    "method, path, status, code",
    [("GET", "/nope", 404, "not_found"), ("DELETE", "/items", 405, "method_not_allowed"), ("GET", "/items?n=abc", 422, None)],
)
def test_framework_errors_have_the_error_shape_and_a_request_id(method, path, status, code):
    app, metrics = make_app()
    err = shaped(*call(app, method, path), status)
    assert err["code"] == code and errors.clean_request_id(err["request_id"], 128)  # Serve's proxy made it
    assert metrics.seen == [("unmatched" if status == 404 else "/items", status)]


def test_client_request_id_is_kept_when_sane_and_replaced_when_long_or_odd():
    app, _ = make_app()
    err = shaped(*call(app, "GET", "/nope", {"x-request-id": "abc-123"}), 404)
    assert err["request_id"] == "abc-123"
    for bad in ("x" * 129, "a b", "<script>", "ü"):
        status, hdrs, payload = call(app, "GET", "/nope", {"x-request-id": bad})
        err = shaped(status, hdrs, payload, 404)
        assert err["request_id"].startswith("req-")  # a fresh id from the proxy callback, not the client's


def test_dependency_errors_json_type_and_body_size():
    app, _ = make_app(LimitsConfig(max_body_bytes=1024))
    assert shaped(*call(app, "POST", "/echo", {"content-type": "application/json"}), 401)["code"] == "invalid_api_key"
    key = {"authorization": "Bearer ok"}
    assert shaped(*call(app, "POST", "/echo", {**key, "content-type": "text/plain"}), 415)["code"] == "unsupported_media_type"
    assert shaped(*call(app, "POST", "/echo", key), 415)["code"] == "unsupported_media_type"
    js = {**key, "content-type": "application/json; charset=utf-8"}
    assert call(app, "POST", "/echo", js, [b"{}"])[2] == {"n": 2}
    # declared too large: refused before reading; chunked without a length: refused once the bytes pass the limit
    assert shaped(*call(app, "POST", "/echo", {**js, "content-length": "5000"}, [b"{}"]), 413)["code"] == "body_too_large"
    assert shaped(*call(app, "POST", "/echo", js, [b"x" * 600, b"x" * 600]), 413)["code"] == "body_too_large"
    assert call(app, "POST", "/echo", js, [b"x" * 500, b"x" * 500])[2] == {"n": 1000}


def test_unhandled_exception_is_a_500_without_internals_and_retry_after_is_whole_seconds():
    app, metrics = make_app()
    status, hdrs, payload = call(app, "GET", "/boom", {"x-request-id": "boom-1"})
    err = shaped(status, hdrs, payload, 500)
    assert err["code"] == "internal_error" and err["request_id"] == "boom-1"
    assert not any(s in json.dumps(payload) for s in ("secret", "/srv", "pid", "http://", "Traceback", "RuntimeError"))
    status, hdrs, payload = call(app, "GET", "/busy")
    assert shaped(status, hdrs, payload, 503) and hdrs["retry-after"] == ["1"]
    assert ("/boom", 500) in metrics.seen and ("/busy", 503) in metrics.seen


def test_proxy_middleware_replaces_a_bad_id_before_serve_reads_it_and_leaves_one_header():
    """Stands in for Serve's proxy: an inner app that, like Ray's RequestIdMiddleware, takes the request's
    x-request-id and appends it to the answer after the replica's own."""
    seen = []

    async def serve_like(scope, receive, send):
        rid = dict(scope["headers"]).get(b"x-request-id", b"").decode()
        seen.append(rid)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", rid.encode())] * 2})
        await send({"type": "http.response.body", "body": b"{}"})

    app = errors.ProxyRequestIdMiddleware(serve_like, max_chars=16)
    status, hdrs, _ = call(app, "GET", "/", {"x-request-id": "y" * 17})
    assert seen[-1].startswith("req-") and hdrs["x-request-id"] == [seen[-1]]
    status, hdrs, _ = call(app, "GET", "/", {"x-request-id": "short-id"})
    assert seen[-1] == "short-id" and hdrs["x-request-id"] == ["short-id"]
    assert [type(m.cls) for m in errors.proxy_middlewares()] and errors.proxy_middlewares()[
        0
    ].cls is errors.ProxyRequestIdMiddleware
