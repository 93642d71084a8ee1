"""Malformed input against the edge app on a real local Ray (API keys on: every request carries a valid
key, so what is tested is the body, not the auth): each is a 4xx with the gateway's error JSON and the
request id (body and header), never a 5xx, and the service keeps serving.

The cases are the ones the issue lists as probed on main (truncated JSON, bad UTF-8, JSON nested 10,000
deep, extra fields nested ~900 deep inside a message, integers over 4,300 digits, a 401-digit score, a lone
surrogate, NaN / negative / overflowing preferences, a body over the size limit, a form-encoded reset, an
unknown path, a wrong method, an over-long x-request-id).
"""

from __future__ import annotations

import json

import pytest
import requests

from tests.chaos.conftest import assert_error_shape, chat_body, post

MSG = [{"role": "user", "content": "hello"}]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CHAT_CASES = {
    "truncated_json": b'{"model": "router", "messages": [{"role": "user", "content": "hi"}',
    "bad_utf8": b'{"model": "router", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "not_an_object": b"[1, 2, 3]",
    "deep_nesting_10000": (
        '{"model": "router", "messages": [{"role": "user", "content": "hi"}], "x": ' + _nested(10_000) + "}"
    ).encode(),
    "deep_nesting_in_message_900": (
        '{"model": "router", "messages": [{"role": "user", "content": "hi", "x": ' + _nested(900) + "}]}"
    ).encode(),
    "huge_int_max_tokens": (
        '{"model": "router", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}"
    ).encode(),
    "lone_surrogate": b'{"model": "router", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
    "nan_preference": b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], '
    b'"routing": {"preference": {"quality": NaN, "cost": 1}}}',
    "negative_preference": json.dumps({**chat_body("hi"), "routing": {"preference": {"quality": -1, "cost": 1}}}).encode(),
    "infinite_preference": b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], '
    b'"routing": {"preference": {"quality": Infinity, "cost": 1}}}',
    "missing_messages": b'{"model": "router"}',
    "unknown_model": json.dumps(chat_body("hi", model="gpt-7")).encode(),
    "body_over_limit": json.dumps(chat_body("x" * 1_200_000)).encode(),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_malformed_chat_body_is_4xx_json_with_request_id(edge_app, case, figures):
    rid = f"malformed-{case}"
    r = post("/v1/chat/completions", CHAT_CASES[case], headers={"x-request-id": rid, **edge_app.headers()}, base=edge_app.base)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = assert_error_shape(r)
    assert err["request_id"] == rid
    figures(case=case, status=r.status_code, code=err["code"])


def test_overflowing_preferences_are_refused_or_served_never_a_500(edge_app, figures):
    """{"quality": 1e308, "cost": 1e308}: finite each, their sum is not. A 4xx, or an answer routed with
    the weights normalised without overflow: never a 5xx."""
    body = {**chat_body("hello there"), "routing": {"preference": {"quality": 1e308, "cost": 1e308}}}
    r = post("/v1/chat/completions", body, headers={"x-request-id": "overflow-pref", **edge_app.headers()}, base=edge_app.base)
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        assert_error_shape(r)
    figures(status=r.status_code)


FEEDBACK_CASES = {
    "score_5000_digits": b'{"decision_id": "d-1", "score": ' + b"1" * 5000 + b"}",
    "score_401_digits": b'{"decision_id": "d-1", "score": 1' + b"0" * 400 + b"}",
    "score_nan": b'{"decision_id": "d-1", "score": NaN}',
    "truncated": b'{"decision_id": "d-1", "sco',
}


@pytest.mark.parametrize("case", sorted(FEEDBACK_CASES))
def test_malformed_feedback_is_4xx_json_with_request_id(edge_app, case, figures):
    rid = f"malformed-fb-{case}"
    r = post("/v1/feedback", FEEDBACK_CASES[case], headers={"x-request-id": rid, **edge_app.headers()}, base=edge_app.base)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert assert_error_shape(r)["request_id"] == rid
    figures(case=case, status=r.status_code)


def test_framework_errors_and_csrf_shaped_requests_use_the_error_shape(edge_app, figures):
    """Unknown path (404), wrong method (405), bad query (422), a form-encoded cross-origin reset (refused:
    JSON only on state-changing routes), an x-request-id of 10,000 characters (replaced, not echoed)."""
    h = edge_app.headers()
    seen = {}
    r = requests.get(f"{edge_app.base}/v1/nope", headers=h, timeout=30)
    seen["unknown_path"] = r.status_code
    assert r.status_code == 404 and assert_error_shape(r)
    r = requests.get(f"{edge_app.base}/v1/chat/completions", headers=h, timeout=30)
    seen["wrong_method"] = r.status_code
    assert r.status_code == 405 and assert_error_shape(r)
    r = requests.get(f"{edge_app.base}/v1/routing/events", params={"n": "many"}, headers=h, timeout=30)
    seen["bad_query"] = r.status_code
    assert r.status_code == 422 and assert_error_shape(r)
    r = requests.post(
        f"{edge_app.base}/v1/learner/reset",
        data="x",
        headers={**h, "origin": "http://evil.example", "content-type": "text/plain"},
        timeout=30,
    )
    seen["form_reset"] = r.status_code
    assert 400 <= r.status_code < 500 and assert_error_shape(r)
    r = post("/v1/chat/completions", chat_body("hi"), headers={**h, "x-request-id": "r" * 10_000}, base=edge_app.base)
    seen["long_request_id"] = r.status_code
    assert r.status_code == 200 and len(r.headers["x-request-id"]) <= edge_app.cfg.gateway.limits.max_request_id_chars
    figures(**seen)


def test_still_serving_after_malformed_input(edge_app, figures):
    r = post("/v1/chat/completions", chat_body("still there?"), headers=edge_app.headers("route"), base=edge_app.base)
    assert r.status_code == 200, r.text[:300]
    figures(status=r.status_code, model=r.json()["model"])
