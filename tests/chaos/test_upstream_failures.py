"""Upstream failure semantics on a real local Ray, against the fake OpenAI-compatible upstream: a 4xx is
not retried; a 5xx or a dropped connection is retried, then the request falls back to the policy's next
model (logged as served, with the fallback flag); a backend that hangs is a 504 and a `timeout` outcome; a
model whose every replica is down is answered by the fallback within the timeout; a stream that fails
midway ends with an error event; an upstream that omits usage still costs something.

The pool is ranked (`cheapest` policy, no exploration): every routed request goes to `primary` first, and
`backup` is the policy's next best.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.conftest import (
    MAX_RETRIES,
    MODEL_TIMEOUT_S,
    POOL_APP,
    assert_error_shape,
    chat_body,
    decision_record_check,
    decisions_by_request,
    kill_replica,
    load,
    percentiles,
    post,
    read_events,
    replicas,
    wait_for,
)

APP = POOL_APP


@pytest.fixture(scope="module")
def app(pool_app):
    return pool_app


def _events(cfg) -> list[dict]:
    return read_events(cfg.router.events_path)


def test_routed_requests_go_to_primary_when_all_is_well(app, fresh_upstream, figures):
    """The premise of the scenarios below: with every upstream answering, the ranked policy serves primary,
    one upstream call per request, no fallback."""
    text = "chaos-baseline: name a colour"
    r = post("/v1/chat/completions", chat_body(text), headers={"x-request-id": "baseline-1"})
    assert r.status_code == 200, r.text
    routing = r.json()["routing"]
    assert routing["model"] == "primary" and not routing.get("fallback"), routing
    assert fresh_upstream.calls_for(text) == {"primary": 1}
    figures(upstream_calls=fresh_upstream.calls_for(text), model=routing["model"])


def test_upstream_4xx_is_not_retried(app, fresh_upstream, figures):
    """An upstream 400 is the request's problem, not the replica's: exactly one upstream call, an error JSON
    with the request id, no upstream URL in it."""
    fresh_upstream.set("primary", "400")
    seen = []
    for k in range(4):
        text = f"chaos-4xx {k}: hello"
        r = post("/v1/chat/completions", chat_body(text), headers={"x-request-id": f"4xx-{k}"})
        assert r.status_code >= 400, r.text
        err = assert_error_shape(r)
        assert err["request_id"] == f"4xx-{k}"
        calls = fresh_upstream.calls_for(text)
        assert calls == {"primary": 1}, ("a 4xx was retried or sent elsewhere", calls)
        seen.append(r.status_code)
    figures(requests=len(seen), statuses=sorted(set(seen)), upstream_calls_per_request=1)


@pytest.mark.parametrize("mode", ["500", "close"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_5xx_is_retried_then_falls_back(app, fresh_upstream, figures, mode, stream):
    """Upstream 5xx (or a dropped connection): 1 + max_retries calls to primary, then the policy's next model
    answers, 200, with `fallback: true` and primary among `failed_models`; the decision log records the
    model actually served with the fallback flag, once per request."""
    fresh_upstream.set("primary", mode)
    results = load(4, 2, f"fallback-{mode}-{'s' if stream else 'j'}", stream_every=1 if stream else 0, timeout_s=60)
    for res in results:
        assert res.ok, (res.status, res.error, res.body, res.stream_error)
        routing = (res.body or {}).get("routing") or {}
        assert routing.get("model") == "backup" and routing.get("fallback") is True, routing
        assert "primary" in (routing.get("failed_models") or []), routing
        calls = fresh_upstream.calls_for(res.text)
        assert calls == {"primary": 1 + MAX_RETRIES, "backup": 1}, calls
    records = decision_record_check(app, results)
    by_req = decisions_by_request(app)
    for res in results:
        served = [e for e in by_req[res.request_id] if e["outcome"] == "ok"]
        assert served[0]["model"] == "backup" and served[0]["fallback"] is True, served[0]
        assert 0 < served[0]["propensity"] <= 1, served[0]
    figures(
        **records,
        requests=len(results),
        ok=sum(r.ok for r in results),
        upstream_calls_primary=1 + MAX_RETRIES,
        served_by="backup",
        **percentiles([r.latency_s for r in results]),
    )


def test_backend_hang_is_504_and_a_logged_timeout(app, fresh_upstream, figures):
    """An upstream that stops answering: 504 after router.model_timeout_s (not the upstream's own 30 s
    timeout), the error JSON with the request id, and the decision logged with outcome `timeout` (cost
    incurred, score 0) so the policy learns from it."""
    fresh_upstream.set("primary", "hang", hang_s=120)
    results = load(3, 3, "hang", timeout_s=60)
    wait_for(lambda: all(decisions_by_request(app).get(r.request_id) for r in results), 10)
    events = _events(app)
    latencies = [r.latency_s for r in results]
    by_req = decisions_by_request(app)
    costs = [d["cost_usd"] for r in results for d in by_req.get(r.request_id, [])]
    figures(
        requests=len(results), status_504=sum(r.status == 504 for r in results), timeout_costs_usd=costs, **percentiles(latencies)
    )
    for res in results:
        assert res.status == 504, (res.status, res.error, res.body)
        err = assert_error_shape(res, 504)
        assert err["code"] == "model_timeout", err
        assert res.latency_s <= MODEL_TIMEOUT_S + 2.0, res.latency_s
    for res in results:
        decisions = by_req.get(res.request_id, [])
        assert len(decisions) == 1 and decisions[0]["outcome"] == "timeout", decisions
        d = decisions[0]
        outcome = [e for e in events if e.get("kind") == "timeout" and e.get("decision_id") == d["decision_id"]]
        assert len(outcome) == 1 and outcome[0]["value"] == 0.0, outcome
        assert d["cost_usd"] is not None and d["cost_usd"] > 0, ("a timeout incurs cost", d["cost_usd"])


def test_all_replicas_of_an_arm_down_answered_by_the_fallback(app, fresh_upstream, figures):
    """Every replica of primary is killed (and its upstream drops connections, so a restarted replica
    cannot answer either): every request is answered 200 by the fallback, each within the timeout."""
    fresh_upstream.set("primary", "close")
    victims = replicas(APP, "model:primary")
    assert len(victims) == 2, victims
    for name in victims:
        kill_replica(name)
    results = load(12, 4, "arm-down", stream_every=3, timeout_s=60)
    stats = {"requests": len(results), "ok": sum(r.ok for r in results), **percentiles([r.latency_s for r in results])}
    for res in results:
        assert res.ok, (res.status, res.error, res.body, stats)
        routing = (res.body or {}).get("routing") or {}
        assert routing.get("model") != "primary" and routing.get("fallback") is True, routing
        assert res.latency_s <= MODEL_TIMEOUT_S + 1.0, (res.latency_s, stats)
    fresh_upstream.reset()
    t_back = time.monotonic()
    assert wait_for(lambda: len(replicas(APP, "model:primary")) == 2, 60), "Serve did not restart primary's replicas"

    def primary_serves():
        r = post("/v1/chat/completions", chat_body(f"arm-down recovery probe {time.monotonic()}"))
        return r.status_code == 200 and r.json()["routing"]["model"] == "primary"

    recovered = wait_for(primary_serves, 60, every_s=1.0)
    figures(
        killed_replicas=len(victims),
        **stats,
        max_s=round(max(r.latency_s for r in results), 3),
        primary_back_after_s=round(time.monotonic() - t_back, 1),
    )
    assert recovered, "primary never served again once its upstream was back"


def test_stream_failing_midway_ends_with_an_error_event_and_is_logged(app, fresh_upstream, figures):
    """The upstream drops the connection after two chunks: the 200 is out, so the stream must end with an
    error event (not just stop), and the decision is logged with outcome error."""
    fresh_upstream.set("primary", "break")
    results = load(3, 3, "midway", stream_every=1, timeout_s=60)
    for res in results:
        assert res.status == 200, (res.status, res.error, res.body)
        assert res.stream_error is not None, ("no error event at the end of a broken stream", res.stream_done, res.body)
        err = res.stream_error["error"]
        assert err.get("request_id") == res.request_id and "http://" not in err.get("message", ""), err
    wait_for(lambda: all(decisions_by_request(app).get(r.request_id) for r in results), 10)
    by_req = decisions_by_request(app)
    for res in results:
        decisions = by_req.get(res.request_id, [])
        assert [d["outcome"] for d in decisions] == ["error"], decisions
    figures(streams=len(results), error_events=sum(r.stream_error is not None for r in results))


def test_upstream_without_usage_is_not_free(app, fresh_upstream, figures):
    """An upstream that omits `usage`: tokens are estimated, the cost is not 0, and the response says the
    usage is an estimate."""
    fresh_upstream.set("primary", "omit-usage")
    r = post("/v1/chat/completions", chat_body("chaos-usage: describe the sea in a sentence"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["total_tokens"] > 0 and body["routing"]["cost_usd"] > 0, body
    assert any("estimat" in k for k in body["usage"]), ("usage does not say it is an estimate", body["usage"])
    figures(cost_usd=body["routing"]["cost_usd"], usage=body["usage"])
