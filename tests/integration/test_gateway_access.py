"""Who may do what (issue 11, must-show 1), on a real local Ray: the app with `gateway.auth.mode: keys`, a
route key and an admin key made by `banditrouter keys create`, online learning on. Every endpoint is called
with no key, a wrong key, the route key and the admin key; each status is checked against the spec, each
error is the gateway's JSON shape with the response's request id, and the table is written to
reports/access_table.md (and printed) for the README. Then the same app with learning off: the learner
endpoints are 404 for an admin, still 401/403 for the others."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.integration.conftest import POOL

PORT = 8023
BASE = f"http://127.0.0.1:{PORT}"
APP = "access-test"
ROOT = Path(__file__).resolve().parents[2]
CALLERS = ("no key", "wrong key", "route key", "admin key")


def _cfg(tmp: Path, ckpt: Path, learning: bool):
    from banditrouter.config import load_config

    return load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt), "explore": True},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"ray_actor_options": {"num_cpus": 0.1}},
            "learning": {"enabled": learning, "state_dir": str(tmp / "state"), "batch_size": 4, "max_wait_s": 0.2},
            "gateway": {"auth": {"mode": "keys", "keys_file": str(tmp / "keys.yaml")}, "state_dir": str(tmp / "gateway")},
            "models": [{"name": m, "replay": {"split": "test"}} for m in POOL],
        }
    )


def _cli_key(path: Path, key_id: str, scopes: str) -> str:
    """A key made the way an operator makes one: `banditrouter keys create` (its stdout is the key)."""
    from typer.testing import CliRunner

    from banditrouter.cli import app

    out = CliRunner().invoke(app, ["keys", "create", "--id", key_id, "--scopes", scopes, "--file", str(path)])
    assert out.exit_code == 0, out.output
    return out.stdout.strip()


@pytest.fixture(scope="module")
def gateway(ray_local, tmp_path_factory, prompts):
    from ray import serve

    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from learner.actors import kill_actors

    tmp = tmp_path_factory.mktemp("access")
    ckpt = save_checkpoint(make_policy("linucb", POOL, 384, tau=float(np.nanquantile(prompts.costs, 0.95))), tmp / "linucb.pt")
    keys = {"route key": _cli_key(tmp / "keys.yaml", "team-a", "route"), "admin key": _cli_key(tmp / "keys.yaml", "ops", "admin")}
    assert not any(k in (tmp / "keys.yaml").read_text() for k in keys.values())  # hashes only at rest
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(_cfg(tmp, ckpt, learning=True)), name=APP, route_prefix="/")
    headers = {
        "no key": {},
        "wrong key": {"Authorization": "Bearer br-" + uuid.uuid4().hex},
        **{who: {"Authorization": f"Bearer {k}"} for who, k in keys.items()},
    }
    yield {"headers": headers, "tmp": tmp, "ckpt": ckpt}
    serve.delete(APP)
    serve.shutdown()
    kill_actors()


def _call(method: str, path: str, headers: dict, body: dict | None = None) -> requests.Response:
    h = {**headers, "x-request-id": f"acc-{uuid.uuid4().hex[:12]}"}
    return requests.request(method, f"{BASE}{path}", json=body if method == "POST" else None, headers=h, timeout=120)


def _error_shape_ok(r: requests.Response) -> str | None:
    """None when `r` is the gateway's error shape with the response's request id; else what is wrong."""
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not the error shape: {r.text[:200]!r}"
    if set(err) != {"message", "type", "code", "request_id"} or not err["request_id"]:
        return f"error fields {sorted(err)} / request_id {err.get('request_id')!r}"
    if r.headers.get("x-request-id") != err["request_id"]:
        return f"x-request-id {r.headers.get('x-request-id')!r} != body {err['request_id']!r}"
    return None


def _cell(r: requests.Response) -> str:
    """'200', or '403 insufficient_scope': the status and the error's code."""
    if r.status_code < 400:
        return str(r.status_code)
    try:
        err = r.json()["error"]
        return f"{r.status_code} {err['code'] or err['type']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} (not JSON)"


def _wait_logged(decision_ids: list[str], timeout_s: float = 60.0) -> None:
    """Until the buffer holds these decisions (routers deliver them after answering), so feedback on them is
    judged now, not held."""
    import ray

    from learner.actors import BUFFER_NAME, NAMESPACE

    buffer = ray.get_actor(BUFFER_NAME, namespace=NAMESPACE)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        logged = {e["decision_id"] for _, e in ray.get(buffer.read.remote(0, 100_000), timeout=60) if e["kind"] == "decision"}
        if set(decision_ids) <= logged:
            return
        time.sleep(0.2)
    raise AssertionError(f"decisions {decision_ids} never reached the buffer")


def _markdown(rows: list[tuple[str, dict[str, str]]], title: str) -> str:
    lines = [f"| {title} | " + " | ".join(CALLERS) + " |", "|---" * (len(CALLERS) + 1) + "|"]
    lines += [f"| `{name}` | " + " | ".join(cells[c] for c in CALLERS) + " |" for name, cells in rows]
    return "\n".join(lines)


def test_access_table_every_endpoint_by_caller(gateway, prompts):
    h = gateway["headers"]
    observed: list[tuple[str, dict[str, str]]] = []
    problems: list[str] = []
    errors: list[str] = []  # every error answer, for the failure message

    def row(name: str, method: str, path: str, body_for=None, check=None) -> dict[str, str]:
        cells = {}
        for who in CALLERS:
            r = _call(method, path, h[who], body_for(who) if body_for else None)
            cells[who] = _cell(r)
            if r.status_code >= 400:
                errors.append(f"{name} / {who}: {r.status_code} {r.text[:300]}")
                if bad := _error_shape_ok(r):
                    problems.append(f"{name} / {who}: {bad}")
            if check and r.status_code < 400:
                check(who, r)
        observed.append((name, cells))
        return cells

    # -- route-scope endpoints -----------------------------------------------------------------------------
    decisions = {}

    def keep_decision(who, r):
        decisions[who] = r.json()["routing"]["decision_id"]

    users = {"route key": "alice", "admin key": "root", "no key": "x", "wrong key": "x"}
    row(
        "POST /v1/chat/completions",
        "POST",
        "/v1/chat/completions",
        lambda who: {"model": "router", "messages": [{"role": "user", "content": prompts.prompts[0]}], "user": users[who]},
        keep_decision,
    )
    row("GET /v1/models", "GET", "/v1/models")
    assert set(decisions) == {"route key", "admin key"}, "\n".join([*errors, *problems])
    _wait_logged(list(decisions.values()))
    other = {"route key": decisions["admin key"], "admin key": decisions["route key"]}
    own = {**decisions, "no key": decisions["route key"], "wrong key": decisions["route key"]}
    row(
        "POST /v1/feedback (another key's decision)",
        "POST",
        "/v1/feedback",
        lambda who: {"decision_id": other.get(who, decisions["admin key"]), "score": 0.5, "user": users[who]},
    )
    row(
        "POST /v1/feedback (own decision, another user)",
        "POST",
        "/v1/feedback",
        lambda who: {"decision_id": own[who], "score": 0.5, "user": "mallory"},
    )
    row(
        "POST /v1/feedback (own decision)",
        "POST",
        "/v1/feedback",
        lambda who: {"decision_id": own[who], "score": 0.5, "user": users[who]},
        lambda who, r: r.json()["status"] == "recorded" or problems.append(f"feedback {who}: {r.json()}"),
    )

    # -- /health: ok for everyone, internals for admins only -----------------------------------------------
    def health_body(who, r):
        body = r.json()
        if who == "admin key":
            if not {"policy", "policy_version", "tau", "models", "learning"} <= set(body):
                problems.append(f"/health for admin lacks internals: {body}")
        elif body != {"status": "ok"}:
            problems.append(f"/health for {who} says more than ok: {body}")

    health = row("GET /health", "GET", "/health", check=health_body)
    for who in CALLERS:
        health[who] += " (full)" if who == "admin key" else " (status only)"

    # -- admin-scope endpoints -----------------------------------------------------------------------------
    def no_embeddings(who, r):
        events = r.json()["events"]
        if not events or any("context" in e or "turn_context" in e for e in events):
            problems.append(f"events for {who}: {len(events)} events, keys {sorted(events[0]) if events else []}")

    row("GET /v1/routing/events", "GET", "/v1/routing/events?n=10", check=no_embeddings)
    row("GET /v1/learner/stats", "GET", "/v1/learner/stats")
    row("GET /v1/learner/installs", "GET", "/v1/learner/installs")
    row("POST /v1/learner/flush", "POST", "/v1/learner/flush", lambda who: {})
    row("POST /v1/learner/reset", "POST", "/v1/learner/reset", lambda who: {})

    # -- the rest ------------------------------------------------------------------------------------------
    def bearer_declared(who, r):
        schemes = r.json().get("components", {}).get("securitySchemes", {})
        if not any(s.get("type") == "http" and s.get("scheme") == "bearer" for s in schemes.values()):
            problems.append(f"openapi.json declares no bearer scheme: {schemes}")

    row("GET /openapi.json", "GET", "/openapi.json", check=bearer_declared)
    row("GET /v1/no-such-path", "GET", "/v1/no-such-path")

    ok, no_key = "200", ("401 invalid_api_key", "401 invalid_api_key")
    route_only = (*no_key, "200", "200")
    admin_only = (*no_key, "403 insufficient_scope", "200")
    expected = {
        "POST /v1/chat/completions": route_only,
        "GET /v1/models": route_only,
        "POST /v1/feedback (another key's decision)": (*no_key, "403 not_owner", "403 not_owner"),
        "POST /v1/feedback (own decision, another user)": (*no_key, "403 not_owner", "403 not_owner"),
        "POST /v1/feedback (own decision)": route_only,
        "GET /health": ("200 (status only)", "200 (status only)", "200 (status only)", "200 (full)"),
        "GET /v1/routing/events": admin_only,
        "GET /v1/learner/stats": admin_only,
        "GET /v1/learner/installs": admin_only,
        "POST /v1/learner/flush": admin_only,
        "POST /v1/learner/reset": admin_only,
        "GET /openapi.json": (ok,) * 4,
        "GET /v1/no-such-path": ("404 not_found",) * 4,
    }
    table = _markdown(observed, "endpoint (learning on)")
    print("\n" + table)
    out = ROOT / "reports" / "access_table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        "<!-- generated by tests/integration/test_gateway_access.py; do not edit -->\n" + table + "\n",
    )
    got = {name: tuple(cells[c] for c in CALLERS) for name, cells in observed}
    assert got.keys() == expected.keys()
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, f"rows not as specified (got, expected):\n{wrong}\n{table}"
    assert not problems, "\n".join(problems)


def test_learning_off_learner_endpoints_are_404_for_admins_only(gateway, prompts):
    """Redeploys the app with learning off: the learner endpoints and feedback answer 404 learning_disabled to
    an admin (route key for feedback), still 401/403 to the others; the table is appended to the report."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(_cfg(gateway["tmp"], gateway["ckpt"], learning=False)), name=APP, route_prefix="/")
    h = gateway["headers"]
    observed, problems = [], []
    for name, method, path in (
        ("POST /v1/feedback", "POST", "/v1/feedback"),
        ("GET /v1/learner/stats", "GET", "/v1/learner/stats"),
        ("GET /v1/learner/installs", "GET", "/v1/learner/installs"),
        ("POST /v1/learner/flush", "POST", "/v1/learner/flush"),
        ("POST /v1/learner/reset", "POST", "/v1/learner/reset"),
        ("GET /v1/routing/events", "GET", "/v1/routing/events"),
    ):
        cells = {}
        for who in CALLERS:
            body = {"decision_id": "d-none", "score": 0.5} if path == "/v1/feedback" else {}
            r = _call(method, path, h[who], body)
            cells[who] = _cell(r)
            if r.status_code >= 400 and (bad := _error_shape_ok(r)):
                problems.append(f"{name} / {who}: {bad}")
        observed.append((name, cells))
    no_key = ("401 invalid_api_key", "401 invalid_api_key")
    off = "404 learning_disabled"
    expected = {
        "POST /v1/feedback": (*no_key, off, off),
        "GET /v1/learner/stats": (*no_key, "403 insufficient_scope", off),
        "GET /v1/learner/installs": (*no_key, "403 insufficient_scope", off),
        "POST /v1/learner/flush": (*no_key, "403 insufficient_scope", off),
        "POST /v1/learner/reset": (*no_key, "403 insufficient_scope", off),
        "GET /v1/routing/events": (*no_key, "403 insufficient_scope", "200"),  # the router's own log
    }
    table = _markdown(observed, "endpoint (learning off)")
    print("\n" + table)
    out = ROOT / "reports" / "access_table.md"
    if out.exists():
        out.write_text(out.read_text() + "\n" + table + "\n")
    got = {name: tuple(cells[c] for c in CALLERS) for name, cells in observed}
    assert got == expected, f"rows not as specified:\n{got}\n{table}"
    assert not problems, "\n".join(problems)
