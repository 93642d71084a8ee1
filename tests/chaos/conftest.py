"""Shared set-up of the chaos suite: one real local Ray and one Serve HTTP proxy on 127.0.0.1 for the
session, a fake OpenAI-compatible upstream (its own process, failure modes switchable per model), app
builders over it, a concurrent HTTP load generator, replica lookup/kill helpers, and a figures recorder
(every scenario records what it measured; `pytest_terminal_summary` prints them, and
`CHAOS_FIGURES=path.json` writes them for `scripts/chaos_report.py`).

Run (Ray is shared with other suites on this machine, so under the lock):

    flock /tmp/ray.lock timeout 600 .venv/bin/python -m pytest tests/chaos -q
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import free_port, wait_for

PORT = 8021
BASE = f"http://127.0.0.1:{PORT}"
HERE = Path(__file__).resolve().parent

_FIGURES: list[dict] = []
_OUTCOMES: dict[str, dict] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: failure-injection scenarios against a real local Ray (tests/chaos)")
    # Ray Serve 2.60's own config models trip pydantic's deprecation warning once per field: noise here
    config.addinivalue_line("filterwarnings", "ignore:Using extra keyword arguments on `Field`")


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.chaos)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.failed):
        _OUTCOMES[item.name] = {"outcome": report.outcome, "file": Path(str(item.fspath)).name}
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            _OUTCOMES[item.name]["why"] = str(getattr(crash, "message", report.longrepr))[:400]


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES and not _OUTCOMES:
        return
    recorded = {f["test"] for f in _FIGURES}
    rows = [{**f, **_OUTCOMES.get(f["test"], {})} for f in _FIGURES]
    rows += [{"test": name, **o} for name, o in _OUTCOMES.items() if name not in recorded]
    _FIGURES[:] = rows
    terminalreporter.section("chaos figures")
    for f in _FIGURES:
        terminalreporter.write_line(json.dumps(f, sort_keys=True))
    out = os.environ.get("CHAOS_FIGURES")
    if out:
        Path(out).write_text(json.dumps(_FIGURES, indent=1, sort_keys=True))


@pytest.fixture
def figures(request):
    """`figures(**measured)`: recorded under the test's name, printed at the end of the run."""
    started = time.monotonic()

    def record(**measured):
        _FIGURES.append({"test": request.node.name, "wall_s": round(time.monotonic() - started, 1), **measured})

    return record


# ---------------------------------------------------------------------------------------------------------
# Ray + Serve (one of each for the session)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def serve_http(ray_local):
    """Serve's HTTP proxy on 127.0.0.1:PORT; each module deploys its own app on it and deletes it after."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield BASE
    serve.shutdown()


def deploy(cfg, name: str, route_prefix: str = "/") -> None:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(cfg), name=name, route_prefix=route_prefix)


def undeploy(name: str) -> None:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(name)
    except RayServeException:  # Serve was already stopped after the last chaos test (pytest_runtest_teardown)
        pass


def pytest_runtest_teardown(item, nextitem):
    """After the last chaos test, stop Serve (the session's chaos apps go with it) and the named detached
    actors: the session's Ray is shared with tests/integration (tests/conftest.py), whose modules start Serve
    on their own ports and their own buffer, learner and ledger by name."""
    here = Path(__file__).parent
    if nextitem is None or Path(str(nextitem.path)).parent != here:
        import ray

        if ray.is_initialized():
            from ray import serve

            from deployments.gateway.budgets import kill_ledgers
            from learner.actors import kill_actors

            serve.shutdown()
            kill_actors()  # the edge app's detached buffer and learner: later modules create their own by name
            kill_ledgers()


# ---------------------------------------------------------------------------------------------------------
# the fake upstream (tests/chaos/fake_upstream.py, its own process)
# ---------------------------------------------------------------------------------------------------------
class FakeUpstream:
    def __init__(self, port: int, proc: subprocess.Popen):
        self.port, self.proc = port, proc
        self.url = f"http://127.0.0.1:{port}/v1"
        self._control = f"http://127.0.0.1:{port}/_control"

    def set(self, model: str, mode: str = "ok", **kw) -> None:
        r = requests.post(f"{self._control}/mode", json={model: {"mode": mode, **kw}}, timeout=10)
        r.raise_for_status()

    def reset(self) -> None:
        requests.post(f"{self._control}/reset", timeout=10).raise_for_status()

    def calls(self) -> dict:
        return requests.get(f"{self._control}/calls", timeout=10).json()

    def calls_for(self, text: str) -> dict[str, int]:
        """Upstream calls per model that carried this (unique) user text."""
        by_text = self.calls()["by_text"]
        return {m: c[text] for m, c in by_text.items() if c.get(text)}


@pytest.fixture(scope="session")
def upstream():
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fake_upstream.py"), "--port", "0"], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    up = FakeUpstream(int(line.split()[1]), proc)
    yield up
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def fresh_upstream(upstream):
    """The upstream with every model back to ok and every count at zero, before and after the test."""
    upstream.reset()
    yield upstream
    upstream.reset()


def openai_model(name: str, base_url: str, *, replicas: int = 1, max_retries: int = 0, timeout_s: float = 30.0, **extra) -> dict:
    """A pool model served by the fake upstream (or any OpenAI-compatible base_url), priced. The client's own
    retries are off by default: the router's `router.max_retries` (on another replica) is what is tested."""
    return {
        "name": name,
        "backend": "openai",
        "openai": {"base_url": base_url, "max_retries": max_retries, "timeout_s": timeout_s},
        "input_price_per_mtok": 1.0,
        "output_price_per_mtok": 2.0,
        "num_replicas": replicas,
        "ray_actor_options": {"num_cpus": 0.05},
        **extra,
    }


def ranked_checkpoint(path: Path, pool: list[str]) -> Path:
    """A `cheapest` policy whose observed mean costs rank the pool in the order given: without exploration it
    always picks pool[0] first, and pool[1] is the next best (the fallback a policy should choose)."""
    from banditrouter.policies import make_policy, save_checkpoint

    policy = make_policy("cheapest", pool, 384, tau=0.01)
    policy.counts = np.ones(len(pool))
    policy.cost_sums = np.arange(1, len(pool) + 1, dtype=np.float64) * 1e-4
    policy.score_sums = np.full(len(pool), 0.8)
    return save_checkpoint(policy, path)


def random_checkpoint(path: Path, pool: list[str]) -> Path:
    from banditrouter.policies import make_policy, save_checkpoint

    return save_checkpoint(make_policy("random", pool, 384, tau=0.01), path)


def app_config(
    models: list[dict], checkpoint: Path, state_dir: Path, policy: str = "cheapest", *, explore: bool = False, **sections
):
    """A validated AppConfig: small CPU reservations (the suite shares two cores), the given pool and
    policy, every state file under `state_dir`; `sections` merge into the top-level sections (router={...},
    learning={...}, gateway={...})."""
    from banditrouter.config import load_config

    raw: dict = {
        "policy": {"name": policy, "checkpoint": str(checkpoint), "explore": explore},
        "embedder": {"ray_actor_options": {"num_cpus": 0.5}, "num_threads": 1},
        "router": {"ray_actor_options": {"num_cpus": 0.1}},
        "learning": {"state_dir": str(state_dir / "learning")},
        "gateway": {"state_dir": str(state_dir / "gateway")},
        "models": models,
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(raw)


# ---------------------------------------------------------------------------------------------------------
# the pool app: failures, load, overload and the rolling update run on it
# ---------------------------------------------------------------------------------------------------------
POOL_APP = "chaos-pool"
POOL = ["primary", "backup", "spare"]
"""Ranked by the `cheapest` policy: every routed request goes to primary first; backup is its next best."""
MAX_RETRIES = 2
MODEL_TIMEOUT_S = 3.0
MAX_IN_FLIGHT = 4
QUEUE_CAPACITY = 8


def pool_config(upstream: FakeUpstream, tmp: Path, extra_models: tuple[str, ...] = (), **router):
    models = [
        openai_model("primary", upstream.url, replicas=2),
        openai_model("backup", upstream.url),
        openai_model("spare", upstream.url),
        *(openai_model(name, upstream.url) for name in extra_models),
    ]
    return app_config(
        models,
        ranked_checkpoint(tmp / "ranked.pt", POOL),
        tmp,
        router={
            "model_timeout_s": MODEL_TIMEOUT_S,
            "max_retries": MAX_RETRIES,
            "replica_wait_s": 1.0,
            "max_in_flight_per_model": MAX_IN_FLIGHT,
            "queue_capacity": QUEUE_CAPACITY,
            "events_path": str(tmp / "events.jsonl"),
            **router,
        },
    )


@pytest.fixture(scope="session")
def pool_app(serve_http, upstream, tmp_path_factory):
    """One app for the session's pool scenarios (deployed once: an app start costs ~40 s on two cores)."""
    cfg = pool_config(upstream, tmp_path_factory.mktemp("pool"))
    upstream.reset()
    deploy(cfg, POOL_APP)
    yield cfg
    undeploy(POOL_APP)


# ---------------------------------------------------------------------------------------------------------
# the edge app: API keys, online learning, one model whose upstream is unreachable (malformed input, the
# fuzz run, and the unreachable-upstream-plus-slow-buffer scenario run on it)
# ---------------------------------------------------------------------------------------------------------
EDGE_APP = "chaos-edge"
EDGE_PREFIX = "/edge"
EDGE_TIMEOUT_S = 5.0


def unreachable_url() -> str:
    """An OpenAI base URL on 127.0.0.1 where nothing listens (a port bound, then released): connection refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


@dataclass
class EdgeApp:
    cfg: object
    base: str
    admin_key: str
    route_key: str

    def headers(self, key: str | None = "admin") -> dict:
        secret = {"admin": self.admin_key, "route": self.route_key}.get(key, key)
        return {"authorization": f"Bearer {secret}"} if secret else {}


@pytest.fixture(scope="session")
def edge_app(serve_http, upstream, tmp_path_factory):
    """Keys (an admin key and a route-only key, made with the key store `banditrouter keys create` writes),
    learning on (buffer + learner actors), a random exploring policy over `gone` (its upstream refuses
    connections) and `backup` (the fake upstream)."""
    from deployments.gateway.auth import create_key
    from learner.actors import kill_actors

    tmp = tmp_path_factory.mktemp("edge")
    keys = tmp / "keys.yaml"
    admin, _ = create_key(keys, "chaos-admin", ["route", "admin"])
    route, _ = create_key(keys, "chaos-route", ["route"])
    models = [openai_model("gone", unreachable_url(), replicas=2), openai_model("backup", upstream.url, replicas=2)]
    cfg = app_config(
        models,
        random_checkpoint(tmp / "random.pt", ["gone", "backup"]),
        tmp,
        policy="random",
        explore=True,
        router={
            "model_timeout_s": EDGE_TIMEOUT_S,
            "max_retries": 1,
            "replica_wait_s": 1.0,
            "events_path": str(tmp / "events.jsonl"),
        },
        learning={"enabled": True, "batch_size": 8, "max_wait_s": 0.5, "delivery_timeout_s": 0.5, "delivery_queue_size": 64},
        gateway={"auth": {"mode": "keys", "keys_file": str(keys)}},
    )
    deploy(cfg, EDGE_APP, route_prefix=EDGE_PREFIX)
    yield EdgeApp(cfg, f"{BASE}{EDGE_PREFIX}", admin, route)
    undeploy(EDGE_APP)
    kill_actors()


# ---------------------------------------------------------------------------------------------------------
# replicas
# ---------------------------------------------------------------------------------------------------------
def replicas(app: str, deployment: str) -> list[str]:
    """Names of the live Serve replica actors of one deployment of one app."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)  # a killed (no-restart) actor leaves this list
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and f"{app}#{deployment}#" in a["name"])


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def replica_pid(name: str) -> int:
    import ray

    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def router_info(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("router", app_name=app).info.remote().result(timeout_s=30)


# ---------------------------------------------------------------------------------------------------------
# events (router.events_path: every router replica appends one JSON line per event)
# ---------------------------------------------------------------------------------------------------------
def read_events(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def decisions_by_request(cfg) -> dict[str, list[dict]]:
    """The app's decision records (router.events_path) grouped by request id."""
    out: dict[str, list[dict]] = {}
    for e in read_events(cfg.router.events_path):
        if e.get("kind") == "decision":
            out.setdefault(e.get("request_id"), []).append(e)
    return out


def decision_record_check(cfg, results: list[Result], timeout_s: float = 10.0) -> dict:
    """Every answered request has exactly one served decision record (outcome ok), the one whose
    decision_id the response carried, for the model that answered. Waits (bounded) for the records, which a
    router writes right after answering. Returns counts for the figures."""

    def missing():
        by_req = decisions_by_request(cfg)
        return [r.request_id for r in results if r.ok and not any(e["outcome"] == "ok" for e in by_req.get(r.request_id, []))]

    wait_for(lambda: not missing(), timeout_s)
    by_req = decisions_by_request(cfg)
    answered = [r for r in results if r.ok]
    problems = []
    for r in answered:
        served = [e for e in by_req.get(r.request_id, []) if e["outcome"] == "ok"]
        routing = (r.body or {}).get("routing") or {}
        if len(served) != 1:
            problems.append((r.request_id, f"{len(served)} served decision records"))
        elif served[0]["decision_id"] != routing.get("decision_id") or served[0]["model"] != routing.get("model"):
            problems.append((r.request_id, "record differs from the response", served[0]["decision_id"], routing))
    assert not problems, problems[:10]
    failed = sum(1 for r in results for e in by_req.get(r.request_id, []) if e["outcome"] != "ok")
    return {"answered": len(answered), "served_records": len(answered), "failed_call_records": failed}


# ---------------------------------------------------------------------------------------------------------
# HTTP load
# ---------------------------------------------------------------------------------------------------------
def chat_body(text: str, model: str = "router", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra}


def post(path: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60, base: str = BASE) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{base}{path}", data=data, headers={"content-type": "application/json", **(headers or {})}, timeout=timeout
    )


@dataclass
class Result:
    request_id: str
    text: str
    status: int | None = None
    """HTTP status (None: no response: a connection error or a client-side timeout, in `error`)."""
    latency_s: float = 0.0
    body: dict | None = None
    headers: dict = field(default_factory=dict)
    error: str | None = None
    stream_done: bool | None = None
    """For a stream: whether it ended with `data: [DONE]`; `stream_error` holds an error event if one came."""
    stream_error: dict | None = None

    @property
    def ok(self) -> bool:
        """Answered: a 200 and, for a stream, ended by [DONE] without an error event (a stream that fails
        midway sends its error event, then [DONE]: the client did not get its answer)."""
        return self.status == 200 and (self.stream_done is None or (self.stream_done and self.stream_error is None))


async def _one(
    session, k: int, prefix: str, stream: bool, headers: dict, timeout_s: float, body_extra: dict, base: str
) -> Result:
    import aiohttp

    rid = f"{prefix}-{k}"
    text = f"{prefix} request {k}: say something short"
    res = Result(rid, text)
    body = chat_body(text, stream=stream, **body_extra)
    t0 = time.monotonic()
    try:
        async with session.post(
            f"{base}/v1/chat/completions",
            json=body,
            headers={"x-request-id": rid, **headers},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as r:
            res.status, res.headers = r.status, dict(r.headers)
            if stream and r.status == 200:
                res.stream_done = False
                async for raw in r.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if line == "data: [DONE]":
                        res.stream_done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            res.stream_error = chunk
                        elif res.body is None or chunk.get("routing"):
                            res.body = chunk
            else:
                raw = await r.read()
                try:
                    res.body = json.loads(raw)
                except ValueError:
                    res.body = {"_raw": raw[:500].decode("utf-8", "replace")}
    except Exception as e:  # connection reset, client timeout: what a client would see
        res.error = f"{type(e).__name__}: {e}"
    res.latency_s = time.monotonic() - t0
    return res


async def _load(n, concurrency, prefix, stream_every, headers, timeout_s, body_extra, duration_s, stop, base) -> list[Result]:
    import aiohttp

    results: list[Result] = []
    counter = iter(range(n))
    stop_at = time.monotonic() + duration_s if duration_s else float("inf")
    conn = aiohttp.TCPConnector(limit=0, force_close=True)

    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            for k in counter:  # shared: each request index is taken once
                if time.monotonic() > stop_at or (stop is not None and stop.is_set()):
                    return
                stream = bool(stream_every) and k % stream_every == 0
                results.append(await _one(session, k, prefix, stream, headers, timeout_s, body_extra, base))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def load(
    n: int,
    concurrency: int,
    prefix: str,
    *,
    stream_every: int = 0,
    headers: dict | None = None,
    timeout_s: float = 60.0,
    body_extra: dict | None = None,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    base: str = BASE,
) -> list[Result]:
    """Up to n chat requests (unique texts and request ids `prefix-k`) from `concurrency` closed-loop
    clients, stopping early after `duration_s` or once `stop` is set; every `stream_every`-th one streams (0: none)."""
    args = (n, concurrency, prefix, stream_every, headers or {}, timeout_s, body_extra or {}, duration_s, stop, base)
    return asyncio.run(_load(*args))


class Background:
    """`load(...)` in a thread, so the test can break things while it runs: `.start()`, then `.join()` ->
    results (`.stop()` ends it early: no new requests; those in flight finish)."""

    def __init__(self, *args, **kwargs):
        self.results: list[Result] | None = None
        self._stop = threading.Event()
        kwargs.setdefault("stop", self._stop)
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.exc: BaseException | None = None

    def stop(self) -> Background:
        self._stop.set()
        return self

    def _run(self, *args, **kwargs):
        try:
            self.results = load(*args, **kwargs)
        except BaseException as e:  # surfaced by join()
            self.exc = e

    def start(self) -> Background:
        self.thread.start()
        return self

    def join(self, timeout_s: float = 300) -> list[Result]:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError("load did not finish")
        if self.exc is not None:
            raise self.exc
        return self.results


def percentiles(values, qs=(50, 99)) -> dict[str, float]:
    if not len(values):
        return {f"p{q}_s": float("nan") for q in qs}
    return {f"p{q}_s": round(float(np.percentile(values, q)), 3) for q in qs}


def summarize(results: list[Result]) -> dict:
    """Counts and latencies of a load run: requests, 2xx, non-2xx by status (or error class), p50/p99."""
    bad: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = str(r.status) if r.status is not None else (r.error or "?").split(":")[0]
            if r.status == 200 and r.stream_error is not None:
                key = "200-stream-error-event"
            elif r.status == 200 and r.stream_done is False:
                key = "200-stream-cut"
            bad[key] = bad.get(key, 0) + 1
    ok = [r.latency_s for r in results if r.ok]
    samples = []
    for r in results:
        if not r.ok:
            err = (r.body or {}).get("error") if isinstance(r.body, dict) else None
            msg = f"{r.status}: {err.get('message') if isinstance(err, dict) else (r.error or r.stream_error or r.body)}"
            if msg not in samples:
                samples.append(msg[:300])
    out = {"requests": len(results), "ok": len(ok), "non_2xx": sum(bad.values()), "non_2xx_by": bad, **percentiles(ok)}
    if samples:
        out["error_samples"] = samples[:3]
    return out


def assert_error_shape(r: requests.Response | Result, status: int | None = None) -> dict:
    """The gateway's one error shape, with the request id in the body and the header."""
    if isinstance(r, Result):
        code, headers, body = r.status, {k.lower(): v for k, v in r.headers.items()}, r.body
    else:
        code, headers = r.status_code, {k.lower(): v for k, v in r.headers.items()}
        try:
            body = r.json()
        except ValueError:
            raise AssertionError(f"{code}: not JSON: {r.text[:300]!r}") from None
    if status is not None:
        assert code == status, (code, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert err.get("request_id") and err["request_id"] == headers.get("x-request-id"), (err, headers)
    assert {"message", "type", "code"} <= set(err), err
    for leak in ("Traceback", 'File "', "RayTaskError", "http://", "https://", "127.0.0.1"):
        assert leak not in err["message"], err["message"]
    return err
