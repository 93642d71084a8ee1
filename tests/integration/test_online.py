"""The online-learning loop on a real local Ray: feedback validation over HTTP, the buffer and learner
actors, weight push to two router replicas, and the failure cases (learner killed mid-run, buffer killed
or hung mid-run, a router replica killed mid-run, corrupt weights pushed); and the learner actor under 64
concurrent long-pollers."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests

from tests.conftest import wait_for
from tests.integration.conftest import POOL, serve_online_linucb

PORT = 8015
BASE = f"http://127.0.0.1:{PORT}"
APP = "online-test"


@pytest.fixture(scope="module")
def online(ray_local, tmp_path_factory, prompts):
    yield from serve_online_linucb(tmp_path_factory.mktemp("online"), prompts, PORT, APP)


def route(text: str, user: str | None = None, timeout: float = 60) -> requests.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": text}]}
    if user:
        body["user"] = user
    return requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=timeout)


def feedback(decision_id, score, raw: bytes | None = None, user: str | None = None) -> requests.Response:
    """Feedback must come from the decision's own user when it had one (gateway ownership rule)."""
    if raw is not None:
        return requests.post(f"{BASE}/v1/feedback", data=raw, headers={"content-type": "application/json"}, timeout=30)
    body = {"decision_id": decision_id, "score": score, **({"user": user} if user else {})}
    return requests.post(f"{BASE}/v1/feedback", json=body, timeout=30)


def stats() -> dict:
    return requests.get(f"{BASE}/v1/learner/stats", timeout=30).json()


def _wait_gone(names, timeout_s: float = 30.0) -> None:
    import ray

    from learner.actors import NAMESPACE

    def gone():
        for name in names:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
                return False
            except ValueError:
                pass
        return True

    assert wait_for(gone, timeout_s), f"actors {names} still registered"


def test_64_pollers_get_each_version_within_2s_while_the_learner_updates(ray_local, tmp_path, data_dir):
    """The learner actor's event loop serves every router's long-poll while the learner thread holds its lock
    through each update, pickle, commit and save. 64 pollers wait for weights while events stream in, a
    LinUCB policy over the whole RouterBench pool (11 arms) on the real 384-d context updates (its state is
    26 MB), and an operator reads `stats` 5 times a second (as `simulate` and dashboards do) and flushes
    once. For every
    version and every poller, the time from the feedback that caused the version to that poller holding it
    (or a newer one) has p95 <= 2 s, and the loop answers a probe promptly throughout. Runs before the
    module's app exists (its own actors, removed at the end)."""
    import ray

    from banditrouter.config import load_config
    from banditrouter.data import load_dataset
    from banditrouter.policies import make_policy, save_checkpoint
    from learner.actors import BUFFER_NAME, LEARNER_NAME, get_or_create_buffer, get_or_create_learner, kill_actors

    bench = load_dataset("routerbench", "test")
    pool, costs = list(bench.models), bench.costs
    tau = float(np.nanquantile(costs, 0.95))
    ckpt = save_checkpoint(make_policy("linucb", pool, 384, tau=tau), tmp_path / "linucb.pt")
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt), "explore": True},
            "learning": {"enabled": True, "state_dir": str(tmp_path / "state"), "batch_size": 8, "max_wait_s": 0.2},
            "models": [{"name": m} for m in pool],
        }
    )
    buffer, learner = get_or_create_buffer(cfg), get_or_create_learner(cfg)
    v0 = ray.get(learner.stats.remote(), timeout=120)["version"]
    rng = np.random.default_rng(0)
    n_pollers, feed_s = 64, 8.0

    async def poller(i: int, stop: asyncio.Event, got: dict) -> None:
        known = -1
        while not stop.is_set():
            out = await learner.wait_for_weights.remote(known, 1.0)
            if out is None:
                continue
            version, state = out
            if isinstance(state, ray.ObjectRef):
                state = await state
            assert state["params"]["A"].shape == (len(pool), 387, 387)
            now = time.time()
            await learner.report_install.remote(f"poller-{i}", version, now)
            got.setdefault(i, []).append((now, version))
            known = version

    async def operator(stop: asyncio.Event, probes: list) -> None:
        flush_at = time.monotonic() + feed_s / 2
        while not stop.is_set():
            if time.monotonic() > flush_at:  # and a checkpoint export mid-run (`POST /v1/learner/flush`)
                flush_at = math.inf
                await learner.flush.remote()
            await learner.stats.remote()
            t0 = time.monotonic()
            await learner.wait_for_weights.remote(-2, 0.0)  # answers at once: measures how busy the loop is
            probes.append(time.monotonic() - t0)
            await asyncio.sleep(0.2)

    def decision(k: int) -> dict:
        x, arm = rng.normal(size=384), int(rng.integers(len(pool)))
        return {
            "event_id": f"ev-{k}",
            "kind": "decision",
            "decision_id": f"poll-d{k}",
            "model": pool[arm],
            "arm": arm,
            "propensity": 1 / len(pool),
            "preference": [0.7, 0.3],
            "context": (x / np.linalg.norm(x)).tolist(),
            "cost_usd": float(np.nan_to_num(costs[k % len(costs), arm])),
            "policy_version": 0,
            "time": time.time(),
        }

    async def feed() -> int:
        k, end = 0, time.monotonic() + feed_s
        while time.monotonic() < end:
            batch = [decision(k + j) for j in range(4)]
            k += len(batch)
            await buffer.append_decisions.remote(batch)
            for e in batch:
                out = await buffer.add_feedback.remote(e["decision_id"], float(rng.uniform()))
                assert out["code"] == 200, out
            await asyncio.sleep(0.05)
        return k

    async def main():
        stop, got, probes = asyncio.Event(), {}, []
        tasks = [asyncio.create_task(poller(i, stop, got)) for i in range(n_pollers)]
        tasks.append(asyncio.create_task(operator(stop, probes)))
        fed = await feed()
        last, since = None, time.monotonic()  # let the last update land and reach the pollers
        while time.monotonic() - since < 1.5:
            v = (await learner.stats.remote())["version"]
            last, since = (v, time.monotonic()) if v != last else (last, since)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        return fed, got, probes

    try:
        fed, got, probes = asyncio.run(main())
        st = ray.get(learner.stats.remote(), timeout=60)
        log = ray.get(learner.installs_log.remote(), timeout=60)
    finally:
        kill_actors()
        _wait_gone([LEARNER_NAME, BUFFER_NAME])
    caused = {i["version"]: i["time"] - i["staleness_s"] for i in log if i["staleness_s"] is not None}
    delays = []  # per (version, poller): feedback that caused the version -> the poller holds it or a newer one
    for version, t_feedback in caused.items():
        for receipts in got.values():
            t = next((t for t, v in receipts if v >= version), math.inf)
            delays.append(t - t_feedback)
    versions = st["version"] - v0
    p50, p95, worst = np.percentile(delays, [50, 95, 100])
    summary = (
        f"fed {fed}, {versions} versions, {len(delays)} (version, poller) pairs; staleness p50 {p50:.3f} p95 {p95:.3f} "
        f"max {worst:.3f} s; loop probe max {max(probes):.3f} s; report_install staleness p95 {st['staleness_p95_s']:.3f} s"
    )
    print(summary)
    assert versions >= 10 and len(caused) >= 0.9 * versions, summary
    assert len(got) == n_pollers, summary
    assert p95 <= 2.0, summary
    assert max(probes) <= 1.0, summary


def test_feedback_is_validated_idempotent_and_counted(online, prompts):
    d = route(prompts.prompts[0]).json()["routing"]["decision_id"]
    before = stats()["buffer"]["refused"]
    assert feedback(d, 0.75).status_code == 200
    again = feedback(d, 0.75)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert feedback(d, 0.25).status_code == 409
    held = feedback("no-such-decision-yet", 0.5)  # its decision may still be on its way from a router
    assert held.status_code == 202 and held.json()["status"] == "held"
    assert feedback(d, 1.5).status_code == 422
    assert feedback(d, -1).status_code == 422
    r = feedback(None, None, raw=b'{"decision_id": "%s", "score": NaN}' % d.encode())
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"] and r.json()["error"]["request_id"]
    assert feedback(None, None, raw=b"{oops").status_code == 400
    after = stats()["buffer"]["refused"]
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew == {"replay": 1, "conflict": 1, "out_of_range": 2, "not_finite": 1}
    assert route(prompts.prompts[1]).status_code == 200  # still serving


def test_feedback_reaches_every_router_replica_quickly(online, prompts):
    v0 = stats()["learner"]["version"]
    t0 = time.time()
    for i in range(8):
        d = route(prompts.prompts[10 + i]).json()["routing"]["decision_id"]
        assert feedback(d, float(prompts.scores[10 + i].max())).status_code == 200
    v1 = wait_for(lambda: stats()["learner"]["version"] > v0 and stats()["learner"]["version"])
    assert v1
    installs = wait_for(
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


def _load(prompts, n: int, start: int, out: list, user_prefix="u", answered: list | None = None) -> None:
    """n requests, each followed by its feedback; `out` gets 200 per request whose answer and feedback were
    both accepted (feedback 200 recorded or 202 held), else what went wrong; `answered` the decision ids."""
    for k in range(n):
        i = (start + k) % len(prompts.prompts)
        try:
            user = f"{user_prefix}{k % 5}"
            r = route(prompts.prompts[i], user=user)
            if r.status_code != 200:
                out.append(r.status_code)
                continue
            rt = r.json()["routing"]
            if answered is not None:
                answered.append(rt["decision_id"])
            j = POOL.index(rt["model"])
            fb = feedback(rt["decision_id"], float(prompts.scores[i, j]), user=user)
            out.append(200 if fb.status_code in (200, 202) else f"feedback {fb.status_code}")
        except requests.RequestException as e:
            out.append(type(e).__name__)


def _log(buffer) -> list[dict]:
    import ray

    return [e for _, e in ray.get(buffer.read.remote(0, 1_000_000), timeout=60)]


def _all_logged_once(buffer, decision_ids, with_feedback: bool, timeout_s: float = 60.0) -> tuple[Counter, Counter]:
    """Wait (bounded) until every decision id, and its explicit feedback when asked, is in the log; return
    how many times each was logged (decisions, explicit scores)."""

    def counts():
        rows = _log(buffer)
        return (
            Counter(e["decision_id"] for e in rows if e["kind"] == "decision"),
            Counter(e["decision_id"] for e in rows if e["kind"] == "explicit"),
        )

    def done():
        dec, exp = counts()
        return set(decision_ids) <= set(dec) and (not with_feedback or set(decision_ids) <= set(exp))

    wait_for(done, timeout_s)
    return counts()


def test_buffer_killed_mid_run_every_request_answered_and_logged_once(online, prompts):
    """The buffer actor dies under load and Ray restarts it: every request is answered 200 (routers do not
    wait for the buffer), and afterwards every answered decision and its feedback are in the log exactly
    once (decisions were spilled and re-delivered; feedback that came first was held)."""
    import ray

    from learner.actors import BUFFER_NAME, LEARNER_NAME, NAMESPACE

    results: list = []
    answered: list = []
    threads = [threading.Thread(target=_load, args=(prompts, 25, 120 + 25 * t, results, "b", answered)) for t in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    ray.kill(ray.get_actor(BUFFER_NAME, namespace=NAMESPACE), no_restart=False)  # max_restarts=-1: Ray restarts it
    for t in threads:
        t.join()
    assert results.count(200) == 75, results
    buffer = ray.get_actor(BUFFER_NAME, namespace=NAMESPACE)
    decisions, explicit = _all_logged_once(buffer, answered, with_feedback=True)
    assert set(answered) <= set(decisions), "a decision was lost"
    assert set(answered) <= set(explicit), "a feedback was lost"
    assert all(decisions[d] == 1 for d in answered) and all(explicit[d] == 1 for d in answered), "logged twice"
    rows = _log(buffer)
    assert len({e["event_id"] for e in rows}) == len(rows)
    # and the learner consumed every event exactly once (set equality on ids)
    learner = ray.get_actor(LEARNER_NAME, namespace=NAMESPACE)
    ray.get(learner.flush.remote(), timeout=120)
    consumed = ray.get(learner.consumed_ids.remote(), timeout=60)
    assert len(consumed) == len(set(consumed)), "an event was consumed twice"
    assert set(consumed) == set(ray.get(buffer.event_ids.remote(), timeout=60)), "an event was not consumed"


def test_hung_buffer_does_not_stall_responses(online, prompts):
    """The buffer process stops answering (SIGSTOP) for 8 s: requests are still answered at their usual
    speed (before: each waited for the buffer, so every response stalled until it came back), and once the
    buffer is back every decision reaches the log, once; feedback sent then is recorded."""
    import ray

    from learner.actors import BUFFER_NAME, NAMESPACE

    buffer = ray.get_actor(BUFFER_NAME, namespace=NAMESPACE)
    pid = ray.get(buffer.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    answered, latencies, failed = [], [], []
    os.kill(pid, signal.SIGSTOP)
    try:
        stop_at = time.monotonic() + 8
        for k in range(40):
            if time.monotonic() > stop_at - 1:
                break
            t0 = time.monotonic()
            try:
                r = route(prompts.prompts[(150 + k) % len(prompts.prompts)], timeout=5)
            except requests.RequestException as e:  # before: stuck until the buffer came back
                failed.append(type(e).__name__)
                break
            latencies.append(time.monotonic() - t0)
            if r.status_code == 200:
                answered.append((r.json()["routing"]["decision_id"], 150 + k, r.json()["routing"]["model"]))
            else:
                failed.append(r.status_code)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not failed and len(answered) >= 5, (failed, len(answered))
    assert max(latencies) < 3.0, latencies
    decisions, _ = _all_logged_once(buffer, [d for d, _, _ in answered], with_feedback=False)
    assert all(decisions[d] == 1 for d, _, _ in answered), "a decision was lost or logged twice"
    for d, i, model in answered:
        assert feedback(d, float(prompts.scores[i % len(prompts.prompts), POOL.index(model)])).status_code == 200


def test_learner_killed_mid_update_restarts_and_counts_every_event_once(online, prompts):
    """The learner is killed inside an update (its step applied in memory, not committed) while requests
    and feedback keep coming: every request is answered, Ray restarts it from its last commit, and the set
    of consumed event ids equals the set the buffer holds, each once."""
    import ray

    from learner.actors import LEARNER_NAME, NAMESPACE

    def stall_updates(self) -> None:  # nested: cloudpickle ships it by value to the actor
        """Runs inside the learner actor: the next policy update applies its step, then hangs (with the lock
        held, nothing committed) so the test can kill the learner in the middle of an update."""
        import threading as th
        import time as tm

        real, self._in_update = self.core.policy.update, th.Event()

        def update(batch):
            out = real(batch)
            self._in_update.set()
            tm.sleep(120)
            return out

        self.core.policy.update = update

    learner = ray.get_actor(LEARNER_NAME, namespace=NAMESPACE)
    ray.get(learner.__ray_call__.remote(stall_updates), timeout=60)
    results: list = []
    threads = [threading.Thread(target=_load, args=(prompts, 25, 40 + 25 * t, results)) for t in range(3)]
    for t in threads:
        t.start()
    assert wait_for(lambda: ray.get(learner.__ray_call__.remote(lambda self: self._in_update.is_set()), timeout=30), 60)
    ray.kill(learner, no_restart=False)  # mid-update; max_restarts=-1: Ray restarts it
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
    # Only requests caught by the death may fail: those in flight on the killed replica, or handed to it before
    # Serve's handles drop it. They answer 502 replica_unavailable (in flight: not retried, the router may already
    # have called a model that billed) or 503 unavailable with Retry-After (nothing dispatched). With 4 sequential
    # clients that is at most 4 (a fresh-clone CI run saw 3 x 502, above the earlier bar of 1% = 2.4); every other
    # request must succeed.
    assert len(failed) <= len(threads) and set(failed) <= {502, 503}, failed


def test_retrial_is_detected(online, prompts):
    before = stats()["buffer"]["events"].get("retrial", 0)
    text = prompts.prompts[5]
    assert route(text, user="retrier").status_code == 200
    assert route(text, user="retrier").status_code == 200
    assert wait_for(lambda: stats()["buffer"]["events"].get("retrial", 0) == before + 1, 5)


def test_cold_start_reset_pushes_an_untrained_policy(online, prompts):
    """`POST /v1/learner/reset` (what `simulate --cold-start` calls): the learner swaps in an untrained policy
    of the same shape under a newer version, and the routers serve that version."""
    import ray

    from learner.actors import LEARNER_NAME, NAMESPACE

    learner = ray.get_actor(LEARNER_NAME, namespace=NAMESPACE)
    v0, trained = ray.get(learner.wait_for_weights.remote(-1))
    trained = ray.get(trained)  # each version is published once, as an object reference
    assert np.abs(trained["params"]["b"]).sum() > 0  # earlier tests' feedback trained it
    r = requests.post(f"{BASE}/v1/learner/reset", json={}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] > v0
    v1, fresh = ray.get(learner.wait_for_weights.remote(-1))
    fresh = ray.get(fresh)
    assert v1 == r.json()["version"]
    assert not np.abs(fresh["params"]["b"]).any() and np.allclose(fresh["params"]["A"], np.eye(387)[None])
    assert wait_for(lambda: route(prompts.prompts[40]).json()["routing"]["policy_version"] >= v1, 10)
