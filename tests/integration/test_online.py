"""The online-learning loop on a real local Ray: feedback validation over HTTP, the buffer and learner
actors, weight push to two router replicas, and the failure cases (learner killed mid-run, a router
replica killed mid-run, corrupt weights pushed)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

PORT = 8015
BASE = f"http://127.0.0.1:{PORT}"
APP = "online-test"
POOL = ["claude-instant-v1", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"]


@pytest.fixture(scope="module")
def prompts(data_dir):
    from banditrouter.data import load_dataset

    log = load_dataset("routerbench", "test").with_models(POOL)
    short = [i for i, p in enumerate(log.prompts) if len(p) < 400][:200]
    return log.subset(np.asarray(short))


@pytest.fixture(scope="module")
def online(ray_local, tmp_path_factory, prompts):
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from learner.actors import kill_actors

    tmp = tmp_path_factory.mktemp("online")
    ckpt = save_checkpoint(make_policy("linucb", POOL, 384, tau=float(np.nanquantile(prompts.costs, 0.95))), tmp / "linucb.pt")
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt), "explore": True},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}},
            "learning": {"enabled": True, "state_dir": str(tmp / "state"), "batch_size": 4, "max_wait_s": 0.2},
            "models": [{"name": m, "replay": {"split": "test"}} for m in POOL],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield cfg
    serve.delete(APP)
    serve.shutdown()  # the next module starts Serve on its own port
    kill_actors()


def route(text: str, user: str | None = None, timeout: float = 60) -> requests.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": text}]}
    if user:
        body["user"] = user
    return requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=timeout)


def feedback(decision_id, score, raw: bytes | None = None) -> requests.Response:
    if raw is not None:
        return requests.post(f"{BASE}/v1/feedback", data=raw, headers={"content-type": "application/json"}, timeout=30)
    return requests.post(f"{BASE}/v1/feedback", json={"decision_id": decision_id, "score": score}, timeout=30)


def stats() -> dict:
    return requests.get(f"{BASE}/v1/learner/stats", timeout=30).json()


def wait_until(pred, timeout_s: float = 30.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    return pred()


def test_feedback_is_validated_idempotent_and_counted(online, prompts):
    d = route(prompts.prompts[0]).json()["routing"]["decision_id"]
    before = stats()["buffer"]["refused"]
    assert feedback(d, 0.75).status_code == 200
    again = feedback(d, 0.75)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert feedback(d, 0.25).status_code == 409
    assert feedback("no-such-decision", 0.5).status_code == 404
    assert feedback(d, 1.5).status_code == 422
    assert feedback(d, -1).status_code == 422
    r = feedback(None, None, raw=b'{"decision_id": "%s", "score": NaN}' % d.encode())
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"] and r.json()["error"]["request_id"]
    assert feedback(None, None, raw=b"{oops").status_code == 400
    after = stats()["buffer"]["refused"]
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew == {"replay": 1, "conflict": 1, "unknown_decision": 1, "out_of_range": 2, "not_finite": 1}
    assert route(prompts.prompts[1]).status_code == 200  # still serving


def test_feedback_reaches_every_router_replica_quickly(online, prompts):
    v0 = stats()["learner"]["version"]
    t0 = time.time()
    for i in range(8):
        d = route(prompts.prompts[10 + i]).json()["routing"]["decision_id"]
        assert feedback(d, float(prompts.scores[10 + i].max())).status_code == 200
    v1 = wait_until(lambda: stats()["learner"]["version"] > v0 and stats()["learner"]["version"])
    assert v1
    installs = wait_until(
        lambda: (
            len(
                {
                    i["replica"]
                    for i in requests.get(f"{BASE}/v1/learner/installs", timeout=30).json()["installs"]
                    if i["version"] >= v1
                }
            )
            >= 2
        )
    )
    log = requests.get(f"{BASE}/v1/learner/installs", timeout=30).json()["installs"]
    assert installs, ("both router replicas install the new version", v1, log[-6:])
    recent = [i for i in requests.get(f"{BASE}/v1/learner/installs", timeout=30).json()["installs"] if i["time"] >= t0]
    assert recent and max(i["staleness_s"] for i in recent if i["staleness_s"] is not None) < 2.0
    # new decisions record the version they used
    assert route(prompts.prompts[30]).json()["routing"]["policy_version"] >= v1


def test_router_refuses_corrupt_weights_and_keeps_serving(online, prompts):
    from ray import serve

    router = serve.get_deployment_handle("router", app_name=APP)
    state = router.info.remote().result()
    assert state["policy"] == "linucb"
    for blob in ({"params": {"A_inv": np.full((3, 387, 387), np.nan)}}, {"junk": True}, b"\x00\x01"):
        out = router.load_weights.remote(999_999, blob).result()
        assert out["installed"] is False and out["error"]
    r = route(prompts.prompts[2])
    assert r.status_code == 200 and r.json()["routing"]["policy_version"] < 999_999


def _load(prompts, n: int, start: int, out: list, user_prefix="u") -> None:
    for k in range(n):
        i = (start + k) % len(prompts.prompts)
        try:
            r = route(prompts.prompts[i], user=f"{user_prefix}{k % 5}")
            if r.status_code != 200:
                out.append(r.status_code)
                continue
            rt = r.json()["routing"]
            j = POOL.index(rt["model"])
            fb = feedback(rt["decision_id"], float(prompts.scores[i, j]))
            out.append(200 if fb.status_code == 200 else f"feedback {fb.status_code}")
        except requests.RequestException as e:
            out.append(type(e).__name__)


def test_learner_killed_mid_run_restarts_and_counts_every_event_once(online, prompts):
    import ray

    from learner.actors import LEARNER_NAME, NAMESPACE

    results: list = []
    threads = [threading.Thread(target=_load, args=(prompts, 25, 40 + 25 * t, results)) for t in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    ray.kill(ray.get_actor(LEARNER_NAME, namespace=NAMESPACE), no_restart=False)  # Ray restarts it
    for t in threads:
        t.join()
    assert results.count(200) == 75, results
    learner = ray.get_actor(LEARNER_NAME, namespace=NAMESPACE)
    st = ray.get(learner.flush.remote())
    assert st["counts"].get("restored", 0) >= 1
    consumed = ray.get(learner.consumed_ids.remote())
    from learner.actors import BUFFER_NAME

    emitted = ray.get(ray.get_actor(BUFFER_NAME, namespace=NAMESPACE).event_ids.remote())
    assert len(consumed) == len(set(consumed)), "an event was counted twice"
    assert set(consumed) == set(emitted), "an event was lost"
    params = ray.get(learner.stats.remote())
    assert params["version"] > 0


def test_router_replica_killed_mid_run(online, prompts):
    import ray

    results: list = []
    threads = [threading.Thread(target=_load, args=(prompts, 60, 100 + 60 * t, results, "k")) for t in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    named = ray.util.list_named_actors(all_namespaces=True)
    replicas = [a for a in named if a["namespace"] == "serve" and f"{APP}#router#" in a["name"]]
    assert len(replicas) == 2, named
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    for t in threads:
        t.join()
    failed = [r for r in results if r != 200]
    assert len(failed) <= 0.01 * len(results) + 1e-9, failed  # <= 1% of 240


def test_retrial_is_detected(online, prompts):
    before = stats()["buffer"]["events"].get("retrial", 0)
    text = prompts.prompts[5]
    assert route(text, user="retrier").status_code == 200
    assert route(text, user="retrier").status_code == 200
    assert wait_until(lambda: stats()["buffer"]["events"].get("retrial", 0) == before + 1, 5)


def test_cold_start_reset_pushes_an_untrained_policy(online, prompts):
    """`POST /v1/learner/reset` (what `simulate --cold-start` calls): the learner swaps in an untrained policy
    of the same shape under a newer version, and the routers serve that version."""
    import ray

    from learner.actors import LEARNER_NAME, NAMESPACE

    learner = ray.get_actor(LEARNER_NAME, namespace=NAMESPACE)
    v0, trained = ray.get(learner.wait_for_weights.remote(-1))
    assert np.abs(trained["params"]["b"]).sum() > 0  # earlier tests' feedback trained it
    r = requests.post(f"{BASE}/v1/learner/reset", timeout=60)
    assert r.status_code == 200 and r.json()["version"] > v0
    v1, fresh = ray.get(learner.wait_for_weights.remote(-1))
    assert v1 == r.json()["version"]
    assert not np.abs(fresh["params"]["b"]).any() and np.allclose(fresh["params"]["A"], np.eye(387)[None])
    assert wait_until(lambda: route(prompts.prompts[40]).json()["routing"]["policy_version"] >= v1, 10)
