"""ACQB live on a real local Ray (issue 10 §4): the router's waiting pool is bounded (503 with Retry-After
beyond it), decision events carry the queue wait and length, and the learner trains ACQB from retrials with
no explicit feedback (its version advances); plus a tiny open-loop `simulate --rate --retrials` smoke run."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import numpy as np
import pytest
import requests

from tests.conftest import wait_for
from tests.integration.conftest import POOL

pytestmark = pytest.mark.slow  # ~75 s here: Serve, the buffer and learner actors, 1 s replay calls

PORT = 8017
BASE = f"http://127.0.0.1:{PORT}"
APP = "acqb-live-test"
LATENCY_S = 1.0


@pytest.fixture(scope="module")
def live(ray_local, tmp_path_factory, prompts):
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from learner.actors import kill_actors

    tmp = tmp_path_factory.mktemp("acqb")
    ckpt = save_checkpoint(make_policy("acqb", POOL, 384, tau=float(np.nanquantile(prompts.costs, 0.95))), tmp / "acqb.pt")
    replay = {"split": "test", "simulate_latency": True, "base_latency_s": LATENCY_S, "tokens_per_s": 1e9}
    cfg = load_config(
        {
            "policy": {"name": "acqb", "checkpoint": str(ckpt), "explore": True},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"max_in_flight_per_model": 1, "queue_capacity": 2, "ray_actor_options": {"num_cpus": 0.1}},
            "learning": {
                "enabled": True,
                "state_dir": str(tmp / "state"),
                "batch_size": 1,
                "max_wait_s": 0.1,
                "retrial_similarity": 0.97,
                "retrial_window_s": 4.0,
            },
            "models": [{"name": m, "replay": replay} for m in POOL],
        }
    )
    assert cfg.learning.train_on_implicit is True  # the default for a queue-aware policy
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield cfg
    serve.delete(APP)
    serve.shutdown()
    kill_actors()


def route(text: str, user: str | None = None, timeout: float = 60) -> requests.Response:
    body = {
        "model": "router",
        "messages": [{"role": "user", "content": text}],
        "routing": {"preference": {"quality": 1, "cost": 0}},
    }
    if user:
        body["user"] = user
    return requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=timeout)


def stats() -> dict:
    return requests.get(f"{BASE}/v1/learner/stats", timeout=30).json()


def test_the_pool_is_bounded_503_with_retry_after_and_decisions_carry_the_queue(live, prompts):
    """3 models x 1 slot + a pool of 2: of 9 simultaneous requests (1 s each) at most 5 are admitted at once,
    the rest get 503 with a Retry-After header; the admitted ones waited in the pool and say so."""
    route(prompts.prompts[0])  # warm: the first request waits for the learner's weights
    with cf.ThreadPoolExecutor(9) as ex:
        resps = list(ex.map(lambda i: route(prompts.prompts[1 + i]), range(9)))
    codes = sorted(r.status_code for r in resps)
    assert set(codes) <= {200, 503} and codes.count(200) >= 5 and codes.count(503) >= 1, codes
    for r in resps:
        if r.status_code == 503:
            err = r.json()["error"]
            assert err["type"] == "overloaded" and "pool is full" in err["message"] and err["request_id"]
            assert int(r.headers["Retry-After"]) >= 1
    ok = [r.json()["routing"] for r in resps if r.status_code == 200]
    assert all(o["queue_length"] is not None and o["queue_wait_s"] is not None for o in ok)
    assert max(o["queue_wait_s"] for o in ok) >= 0.5 * LATENCY_S  # someone waited in the pool for a slot
    assert max(o["queue_length"] for o in ok) >= 1
    ids = {o["decision_id"] for o in ok}
    events = requests.get(f"{BASE}/v1/routing/events", params={"n": 200}, timeout=30).json()["events"]
    mine = [e for e in events if e.get("decision_id") in ids and e["kind"] == "decision"]
    assert len(mine) == len(ids)
    assert all(isinstance(e["queue_wait_s"], float) and isinstance(e["queue_length"], int) for e in mine)
    assert max(e["queue_wait_s"] for e in mine) >= 0.5 * LATENCY_S
    health = requests.get(f"{BASE}/health", timeout=30).json()
    assert health["status"] == "ok"


def test_retrials_train_acqb_without_explicit_feedback(live, prompts):
    """A user re-sends the same question (a regenerate) within the window: the buffer labels the first
    decision a retrial, the learner consumes it as a sample with score 0 and publishes a new version. No
    explicit score is ever posted."""
    before = stats()
    v0 = before["learner"]["version"]
    for i in range(3):
        user, text = f"retrier-{i}", prompts.prompts[20 + i]
        assert route(text, user=user).status_code == 200
        time.sleep(0.3)
        assert route(text, user=user).status_code == 200  # same conversation, no assistant turn: a regenerate

    def learned():
        st = stats()
        return st if st["learner"]["counts"].get("retrial", 0) >= 3 and st["learner"]["version"] > v0 else None

    st = wait_for(learned, 30)
    assert st, stats()
    assert st["learner"]["counts"].get("explicit", 0) == before["learner"]["counts"].get("explicit", 0) == 0
    assert st["buffer"]["events"].get("retrial", 0) >= 3
    assert st["learner"]["policy"] == "acqb"
    # the routers serve the new version
    assert wait_for(lambda: requests.get(f"{BASE}/health", timeout=30).json()["policy_version"] > v0, 10)


def test_open_loop_simulation_smoke(live, tmp_path, data_dir):
    """`simulate --rate R --retrials` in miniature: Poisson arrivals, Bernoulli users who re-send the same
    conversation as the same user, no explicit feedback, online.json with the retrial and queue figures."""
    from banditrouter.simulate import RetrialUsers, run_open_loop

    res = run_open_loop(
        BASE, "routerbench", "test", 24, 4.0, tmp_path, retrials=True, seed=3, w_cost=0.0,
        users=RetrialUsers(max_retries=2, delay_s=(0.2, 0.5), patience_s=20), data_dir=data_dir, progress=False,
    )  # fmt: skip
    assert res["feedback"] is False and res["mode"] == "open_loop"
    assert res["buffer"]["events"].get("explicit", 0) == 0 and res["buffer"]["events"].get("retrial", 0) >= 1
    assert res["windows"][0]["requests"] == [0, 24] and 0 <= res["retrial_rate_first_500"] <= 1
    assert sum(res["status_counts"].values()) == res["attempts"] >= 24
    attempts = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    by_k: dict[int, list[dict]] = {}
    for a in attempts:
        by_k.setdefault(a["k"], []).append(a)
    assert len(by_k) == 24
    for convo in by_k.values():
        convo.sort(key=lambda a: a["attempt"])
        # a user stops at the first satisfying answer; only unsatisfied ones (or failures) re-send
        assert all(not a["satisfied"] for a in convo[:-1])
        assert len(convo) <= 3
    resent = [c for c in by_k.values() if len(c) > 1]
    assert resent, "with 24 users some first answers must fail to satisfy"
    assert res["retrial_rate"] == pytest.approx(len(resent) / 24)
    assert (tmp_path / "online.png").exists() and res["queue"] and res["queue_length_max"] is not None
