"""API keys without Ray: the hashed key store and its CLI, the FastAPI security dependencies, config
validation of `gateway.auth`, and feedback ownership in the buffer (issue 11, "Who may do what")."""

from __future__ import annotations

import os
import stat

import pytest
from factories import decision
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from banditrouter.config import AuthConfig, ConfigError, load_config
from deployments.gateway.auth import (
    ANONYMOUS,
    KeyStore,
    KeyStoreError,
    Principal,
    create_key,
    hash_key,
    optional_principal,
    read_key_file,
    require_admin,
    require_route,
    revoke_key,
)
from deployments.gateway.errors import ApiError, error_response
from learner.buffer import EventBuffer, FeedbackRefused

MODELS = [{"name": "a"}, {"name": "b"}]


# ---------------------------------------------------------------------------------------------------------
# the key store
# ---------------------------------------------------------------------------------------------------------
def test_created_key_is_shown_once_and_stored_only_as_its_sha256(tmp_path):
    path = tmp_path / "keys.yaml"
    secret, entry = create_key(path, "team-a", ["route"], budget_usd=5, period="day", rate_limit_per_min=60)
    assert secret.startswith("br-") and len(secret) == 3 + 43  # 32 random bytes, url-safe base64
    text = path.read_text()
    assert secret not in text and secret[3:] not in text  # never at rest
    assert hash_key(secret) in text and entry.hash == hash_key(secret)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (back,) = read_key_file(path)
    assert back.principal() == Principal("team-a", frozenset({"route"}), back.principal().budget, 60)
    assert (back.budget.usd, back.budget.period) == (5.0, "day")
    other, _ = create_key(path, "ops", ["admin"])
    assert other != secret and [e.id for e in read_key_file(path)] == ["team-a", "ops"]  # appended
    with pytest.raises(KeyStoreError, match="already exists"):
        create_key(path, "ops", ["route"])
    with pytest.raises(KeyStoreError, match="scopes"):
        create_key(path, "x", ["superuser"])
    assert [e.id for e in read_key_file(path)] == ["team-a", "ops"]  # a refused create writes nothing


def test_store_authenticates_by_hash_and_refuses_unknown_keys(tmp_path):
    path = tmp_path / "keys.yaml"
    route, _ = create_key(path, "team-a", ["route"], rate_limit_per_min=10)
    admin, _ = create_key(path, "ops", ["admin"])
    store = KeyStore.from_config(AuthConfig(mode="keys", keys_file=path))
    assert store.authenticate(route).key_id == "team-a" and store.authenticate(route).rate_limit_per_min == 10
    assert store.authenticate(admin).key_id == "ops"
    for wrong in ("", "br-nope", route[:-1], route + "x", hash_key(route), "x" * 100_000):
        assert store.authenticate(wrong) is None, wrong
    assert store.ids() == ["ops", "team-a"]


def test_admin_implies_route():
    admin = Principal("ops", frozenset({"admin"}))
    route = Principal("team-a", frozenset({"route"}))
    assert admin.has("route") and admin.has("admin")
    assert route.has("route") and not route.has("admin")
    assert ANONYMOUS.has("admin") and ANONYMOUS.key_id is None


def test_keys_come_from_the_file_and_the_env_var_merged(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    ka, _ = create_key(a, "file-key", ["route"])
    kb, _ = create_key(b, "env-key", ["admin"])
    env = {"BR_KEYS": b.read_text()}
    store = KeyStore.from_config(AuthConfig(mode="keys", keys_file=a, keys_env="BR_KEYS"), environ=env)
    assert store.authenticate(ka).key_id == "file-key" and store.authenticate(kb).key_id == "env-key"
    only_env = KeyStore.from_config(AuthConfig(mode="keys", keys_env="BR_KEYS"), environ=env)
    assert only_env.authenticate(kb).key_id == "env-key" and only_env.authenticate(ka) is None
    # JSON is YAML: a store passed as JSON text works too
    import json

    import yaml

    as_json = {"BR_KEYS": json.dumps(yaml.safe_load(b.read_text()))}
    assert KeyStore.from_config(AuthConfig(mode="keys", keys_env="BR_KEYS"), environ=as_json).authenticate(kb)
    with pytest.raises(KeyStoreError, match="unique"):  # the same key in both sources
        KeyStore.from_config(AuthConfig(mode="keys", keys_file=b, keys_env="BR_KEYS"), environ=env)


def test_relative_keys_file_resolves_against_base_dir(tmp_path):
    key, _ = create_key(tmp_path / "keys.yaml", "k", ["route"])
    store = KeyStore.from_config(AuthConfig(mode="keys", keys_file="keys.yaml"), base_dir=tmp_path)
    assert store.authenticate(key).key_id == "k"


@pytest.mark.parametrize(
    "auth, env, match",
    [
        ({"keys_env": "BR_KEYS"}, {}, "BR_KEYS is not set"),
        ({"keys_file": "missing.yaml"}, {}, "does not exist.*banditrouter keys create"),
        ({"keys_env": "BR_KEYS"}, {"BR_KEYS": ""}, "hold no key"),
        ({"keys_env": "BR_KEYS"}, {"BR_KEYS": "keys: [{id: x, hash: md5, scopes: [route]}]"}, r"(?s)\$BR_KEYS.*keys\.0\.hash"),
        ({"keys_env": "BR_KEYS"}, {"BR_KEYS": "{{{"}, "not valid YAML"),
        ({"keys_env": "BR_KEYS"}, {"BR_KEYS": "- just a list"}, "mapping"),
    ],
)
def test_unusable_key_stores_are_refused_with_a_clear_message(tmp_path, auth, env, match):
    with pytest.raises(KeyStoreError, match=match):
        KeyStore.from_config(AuthConfig(mode="keys", **auth), base_dir=tmp_path, environ=env)


def test_a_malformed_hash_is_not_echoed_in_the_error(tmp_path):
    env = {"K": "keys: [{id: x, hash: 'sha256:SECRETISH', scopes: [route]}]"}
    with pytest.raises(KeyStoreError) as e:
        KeyStore.from_config(AuthConfig(mode="keys", keys_env="K"), environ=env)
    assert "SECRETISH" not in str(e.value)


def test_revoked_and_new_keys_take_effect_without_a_restart(tmp_path):
    path = tmp_path / "keys.yaml"
    old, _ = create_key(path, "old", ["route"])
    now = [0.0]
    store = KeyStore("keys", keys_file=path, reload_every_s=2.0, clock=lambda: now[0])
    assert store.authenticate(old).key_id == "old"
    new, _ = create_key(path, "new", ["route"])
    revoke_key(path, "old")
    assert store.authenticate(new) is None  # checked at most every 2 s
    now[0] = 2.5
    assert store.authenticate(new).key_id == "new" and store.authenticate(old) is None
    path.write_text("keys: [{id: broken")  # a half-written edit keeps the keys the gateway has
    now[0] = 5.0
    assert store.authenticate(new).key_id == "new"


def test_mode_none_is_everyone_with_every_scope():
    store = KeyStore.from_config(AuthConfig())
    assert store.authenticate("") is ANONYMOUS and store.authenticate("anything") is ANONYMOUS


# ---------------------------------------------------------------------------------------------------------
# FastAPI security dependencies
# ---------------------------------------------------------------------------------------------------------
def _app(store: KeyStore) -> FastAPI:
    app = FastAPI()
    app.state.keystore = store

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response("req-test", e)

    @app.get("/route")
    async def route(p: Principal = Depends(require_route)):
        return {"key_id": p.key_id}

    @app.get("/admin")
    async def admin(p: Principal = Depends(require_admin)):
        return {"key_id": p.key_id}

    @app.get("/health")
    async def health(p: Principal | None = Depends(optional_principal)):
        return {"admin": bool(p and p.has("admin"))}

    return app


def test_dependencies_answer_401_403_and_pass_by_scope(tmp_path):
    path = tmp_path / "keys.yaml"
    route, _ = create_key(path, "team-a", ["route"])
    admin, _ = create_key(path, "ops", ["admin"])
    client = TestClient(_app(KeyStore.from_config(AuthConfig(mode="keys", keys_file=path))))
    h = {k: {"Authorization": f"Bearer {v}"} for k, v in {"route": route, "admin": admin, "wrong": "br-wrong"}.items()}
    h["none"], h["basic"] = {}, {"Authorization": f"Basic {route}"}
    table = {(who, ep): client.get(f"/{ep}", headers=h[who]) for who in h for ep in ("route", "admin", "health")}
    status = {k: r.status_code for k, r in table.items()}
    assert status == {
        ("route", "route"): 200,
        ("route", "admin"): 403,
        ("route", "health"): 200,
        ("admin", "route"): 200,  # admin implies route
        ("admin", "admin"): 200,
        ("admin", "health"): 200,
        ("wrong", "route"): 401,
        ("wrong", "admin"): 401,
        ("wrong", "health"): 200,
        ("none", "route"): 401,
        ("none", "admin"): 401,
        ("none", "health"): 200,
        ("basic", "route"): 401,  # only Bearer
        ("basic", "admin"): 401,
        ("basic", "health"): 200,
    }
    for (who, ep), r in table.items():
        if r.status_code >= 400:
            err = r.json()["error"]
            want = "insufficient_scope" if r.status_code == 403 else "invalid_api_key"
            assert err["code"] == want and err["request_id"] == "req-test", (who, ep, err)
    assert table[("route", "route")].json() == {"key_id": "team-a"}
    assert [table[(w, "health")].json()["admin"] for w in ("admin", "route", "wrong", "none")] == [True, False, False, False]


def test_dependencies_survive_the_pickling_serve_does(tmp_path):
    """Serve cloudpickles the ingress app; a dependency pickled by value lost the globals FastAPI reads string
    annotations with, so `request` became a required query parameter and every call answered 422."""
    from ray import cloudpickle

    path = tmp_path / "keys.yaml"
    route, _ = create_key(path, "team-a", ["route"])
    app = FastAPI()
    app.state.keystore = KeyStore.from_config(AuthConfig(mode="keys", keys_file=path))
    dep_route, dep_admin, dep_any = (
        cloudpickle.loads(cloudpickle.dumps(d)) for d in (require_route, require_admin, optional_principal)
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response("req-test", e)

    @app.get("/r")
    async def r(p: Principal = Depends(dep_route)):
        return {"key_id": p.key_id}

    @app.get("/a")
    async def a(p: Principal = Depends(dep_admin)):
        return {"key_id": p.key_id}

    @app.get("/h")
    async def h(p: Principal | None = Depends(dep_any)):
        return {"key_id": p and p.key_id}

    client = TestClient(app)
    auth = {"Authorization": f"Bearer {route}"}
    assert [client.get(u, headers=auth).status_code for u in ("/r", "/a", "/h")] == [200, 403, 200]
    assert client.get("/h", headers=auth).json() == {"key_id": "team-a"}
    assert all(
        p.get("in") != "query" for op in ("/r", "/a", "/h") for p in app.openapi()["paths"][op]["get"].get("parameters", [])
    )


def test_openapi_declares_bearer_auth(tmp_path):
    schema = TestClient(_app(KeyStore("none"))).get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "br-<key>",
        "description": "An API key from `banditrouter keys create`, sent as `Authorization: Bearer <key>`.",
    }
    assert schema["paths"]["/admin"]["get"]["security"] == [{"ApiKey": []}]


def test_mode_none_lets_every_caller_in_as_admin():
    client = TestClient(_app(KeyStore("none")))
    assert client.get("/admin").status_code == 200 and client.get("/admin").json() == {"key_id": None}
    assert client.get("/health").json() == {"admin": True}


# ---------------------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", ""])
def test_no_auth_off_loopback_is_refused_with_how_to_add_a_key(host):
    with pytest.raises(ConfigError) as e:
        load_config({"server": {"host": host}, "models": MODELS})
    msg = str(e.value)
    assert "banditrouter keys create --id" in msg and "mode: keys" in msg and "keys_file:" in msg


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_no_auth_on_loopback_is_the_default(host):
    assert load_config({"server": {"host": host}, "models": MODELS}).gateway.auth.mode == "none"


def test_keys_off_loopback_validate(tmp_path):
    cfg = load_config(
        {"server": {"host": "0.0.0.0"}, "gateway": {"auth": {"mode": "keys", "keys_env": "BANDITROUTER_KEYS"}}, "models": MODELS}
    )
    assert cfg.gateway.auth.keys_env == "BANDITROUTER_KEYS"


@pytest.mark.parametrize("auth", [{"mode": "keys"}, {"mode": "keys", "keys_env": ""}, {"mode": "keys", "keys_env": "A B"}])
def test_keys_mode_needs_a_store(auth):
    with pytest.raises(ConfigError, match="keys_file|keys_env"):
        load_config({"gateway": {"auth": auth}, "models": MODELS})


def test_relative_keys_file_resolves_against_the_config_folder(tmp_path):
    import yaml

    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "app.yaml").write_text(
        yaml.safe_dump({"gateway": {"auth": {"mode": "keys", "keys_file": "keys.yaml"}}, "models": MODELS})
    )
    cfg = load_config(folder / "app.yaml")
    assert cfg.gateway.auth.keys_file == (folder / "keys.yaml").resolve()


# ---------------------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------------------
def test_cli_create_prints_the_key_once_and_list_never_shows_it(tmp_path):
    from banditrouter.cli import app

    runner = CliRunner()
    path = tmp_path / "keys.yaml"
    args = ["keys", "create", "--id", "team-a", "--scopes", "route", "--budget-usd", "5", "--period", "day"]
    out = runner.invoke(app, [*args, "--rate-limit", "60", "--file", str(path)])
    assert out.exit_code == 0, out.output
    secret = out.stdout.strip()
    assert secret.startswith("br-") and "\n" not in secret
    assert KeyStore.from_config(AuthConfig(mode="keys", keys_file=path)).authenticate(secret).key_id == "team-a"
    both = runner.invoke(app, ["keys", "create", "--id", "ops", "--scopes", "route,admin", "--file", str(path)])
    assert both.exit_code == 0 and read_key_file(path)[1].scopes == ["route", "admin"]
    listed = runner.invoke(app, ["keys", "list", "--file", str(path)])
    assert listed.exit_code == 0 and "team-a" in listed.stdout and "5 per day" in listed.stdout
    assert secret not in listed.output and "sha256" not in listed.output
    bad = runner.invoke(
        app, ["keys", "create", "--id", "x", "--scopes", "route", "--period", "year", "--budget-usd", "1", "--file", str(path)]
    )
    assert bad.exit_code == 2 and "period" in bad.output
    gone = runner.invoke(app, ["keys", "revoke", "--id", "team-a", "--file", str(path)])
    assert gone.exit_code == 0 and [e.id for e in read_key_file(path)] == ["ops"]


# ---------------------------------------------------------------------------------------------------------
# feedback ownership (learner/buffer.py)
# ---------------------------------------------------------------------------------------------------------
def _owned(i, rng, key_id, user=None) -> dict:
    return {**decision(i, rng, user=user), "key_id": key_id}


def test_only_the_deciding_key_may_score_a_decision(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite")
    buf.append_decisions([_owned(0, rng, "team-a")])
    for other in ("team-b", None):
        with pytest.raises(FeedbackRefused) as e:
            buf.add_feedback("d0", 0.9, key_id=other)
        assert (e.value.status, e.value.reason) == (403, "not_owner") and "team-a" not in str(e.value)
    assert buf.add_feedback("d0", 0.9, key_id="team-a")["status"] == "recorded"
    with pytest.raises(FeedbackRefused) as e:  # not even the same score again from another key
        buf.add_feedback("d0", 0.9, key_id="team-b")
    assert e.value.reason == "not_owner"
    assert buf.stats()["refused"] == {"not_owner": 3}
    assert [(e["kind"], e.get("value")) for _, e in buf.log.read(0)] == [("decision", None), ("explicit", 0.9)]


def test_a_decision_with_a_user_takes_feedback_only_for_that_user(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite")
    buf.append_decisions([_owned(0, rng, "team-a", user="alice"), _owned(1, rng, None, user="bob")])
    for key, user in (("team-a", None), ("team-a", "mallory")):
        with pytest.raises(FeedbackRefused) as e:
            buf.add_feedback("d0", 0.5, key_id=key, user=user)
        assert e.value.reason == "not_owner" and "alice" not in str(e.value)
    assert buf.add_feedback("d0", 0.5, key_id="team-a", user="alice")["status"] == "recorded"
    with pytest.raises(FeedbackRefused):  # auth off, the user still has to match
        buf.add_feedback("d1", 0.5, user="alice")
    assert buf.add_feedback("d1", 0.5, key_id="anyone", user="bob")["status"] == "recorded"  # no key on the decision
    assert buf.stats()["refused"] == {"not_owner": 3}


def test_held_feedback_from_another_key_is_refused_when_its_decision_arrives(tmp_path, rng):
    now = [1000.0]
    buf = EventBuffer(tmp_path / "e.sqlite", feedback_hold_s=30, clock=lambda: now[0])
    assert buf.add_feedback("d0", 0.1, event_id="fb-evil", key_id="team-b")["status"] == "held"
    assert buf.add_feedback("d1", 0.7, event_id="fb-own", key_id="team-a", user="alice")["status"] == "held"
    buf.append_decisions([_owned(0, rng, "team-a"), _owned(1, rng, "team-a", user="alice")])
    explicit = {e["decision_id"]: e["event_id"] for _, e in buf.log.read(0) if e["kind"] == "explicit"}
    assert explicit == {"d1": "fb-own"}  # the owner's held score recorded, the other key's refused
    assert buf.stats()["refused"] == {"not_owner": 1} and buf.stats()["held_feedback"] == 0
    assert buf.add_feedback("d0", 0.8, key_id="team-a")["status"] == "recorded"  # the owner can still score it


def test_held_feedback_keeps_its_sender_across_a_restart(tmp_path, rng):
    path = tmp_path / "e.sqlite"
    buf = EventBuffer(path, feedback_hold_s=30)
    buf.add_feedback("d0", 0.4, event_id="fb-evil", key_id="team-b")
    buf.close()
    EventBuffer(path, feedback_hold_s=30).close()  # restarted before the decision came
    again = EventBuffer(path, feedback_hold_s=30)
    again.append_decisions([_owned(0, rng, "team-a")])
    assert [e["kind"] for _, e in again.log.read(0)] == ["decision"] and again.stats()["refused"] == {"not_owner": 1}


def test_a_hold_file_from_before_ownership_is_migrated(tmp_path, rng):
    import sqlite3

    path = tmp_path / "e.sqlite"
    old = sqlite3.connect(tmp_path / "e.sqlite.held.sqlite")
    old.execute(
        "CREATE TABLE held (decision_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, score REAL NOT NULL, received REAL NOT NULL)"
    )
    old.execute("INSERT INTO held VALUES ('d0', 'fb-0', 0.6, ?)", (1e12,))
    old.commit()
    old.close()
    buf = EventBuffer(path, feedback_hold_s=30)
    buf.append_decisions([decision(0, rng)])  # a decision without a key: the old hold is recorded
    assert [e["event_id"] for _, e in buf.log.read(0) if e["kind"] == "explicit"] == ["fb-0"]
