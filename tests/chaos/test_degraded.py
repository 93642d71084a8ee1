"""An unreachable upstream plus a slow buffer, on a real local Ray (the edge app: API keys, online learning).

Half the routed requests first go to `gone`, whose upstream refuses connections; the router retries and
falls back to `backup`. Meanwhile the buffer actor (the learning path's durable log) stops answering
(SIGSTOP) for the whole run: decisions cannot be delivered and must queue (bounded) and spill. Pass
criteria: every request is answered 200 within router.model_timeout_s (p99 and max bounded), the router's
and the ingress's memory stay flat (RSS growth bounded), its delivery queue stays within
learning.delivery_queue_size, and once the buffer is back every answered decision reaches it, once.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from tests.chaos.conftest import (
    EDGE_APP,
    EDGE_TIMEOUT_S,
    load,
    replica_pid,
    replicas,
    router_info,
    rss_mb,
    summarize,
    wait_for,
)

RSS_GROWTH_MB = 64.0


def _buffer_log() -> list[dict]:
    import ray

    from learner.actors import BUFFER_NAME, NAMESPACE

    buffer = ray.get_actor(BUFFER_NAME, namespace=NAMESPACE)
    return [e for _, e in ray.get(buffer.read.remote(0, 1_000_000), timeout=60)]


def test_unreachable_upstream_and_a_slow_buffer_bounded_latency_and_memory(edge_app, fresh_upstream, figures):
    import ray

    from learner.actors import BUFFER_NAME, NAMESPACE

    fresh_upstream.set("backup", "ok", latency_s=0.05)
    headers = edge_app.headers("route")
    warm = load(6, 2, "degraded-warm", headers=headers, base=edge_app.base)  # replicas warm, memory at steady state
    assert all(r.ok for r in warm), summarize(warm)
    pids = {d: replica_pid(replicas(EDGE_APP, d)[0]) for d in ("router", "ingress")}
    rss0 = {d: rss_mb(p) for d, p in pids.items()}
    buffer = ray.get_actor(BUFFER_NAME, namespace=NAMESPACE)
    buffer_pid = ray.get(buffer.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    os.kill(buffer_pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        results = load(160, 6, "degraded", stream_every=4, headers=headers, base=edge_app.base, timeout_s=60)
        run_s = time.monotonic() - t0
        info = router_info(EDGE_APP)
        rss1 = {d: rss_mb(p) for d, p in pids.items()}
    finally:
        os.kill(buffer_pid, signal.SIGCONT)
    stats = summarize(results)
    fallbacks = [r for r in results if r.ok and ((r.body or {}).get("routing") or {}).get("fallback")]
    delivery = info.get("delivery") or {}
    growth = {d: round(rss1[d] - rss0[d], 1) for d in rss0}
    figures(
        **stats,
        run_s=round(run_s, 1),
        max_s=round(max(r.latency_s for r in results), 3),
        fallbacks=len(fallbacks),
        rss_mb_before={d: round(v) for d, v in rss0.items()},
        rss_growth_mb=growth,
        delivery={k: delivery.get(k) for k in ("queued", "spill_pending", "spilled", "delivered") if k in delivery},
    )
    assert stats["ok"] == len(results), stats
    assert len(fallbacks) >= 0.2 * len(results), ("the unreachable arm was not routed to and fallen back from", len(fallbacks))
    for r in fallbacks:
        routing = r.body["routing"]
        assert routing["model"] == "backup" and "gone" in (routing.get("failed_models") or []), routing
    assert max(r.latency_s for r in results) <= EDGE_TIMEOUT_S, stats
    assert all(g <= RSS_GROWTH_MB for g in growth.values()), growth
    assert delivery.get("queued", 0) <= edge_app.cfg.learning.delivery_queue_size, delivery

    answered = {r.body["routing"]["decision_id"] for r in results if r.ok}

    def delivered():
        counts = Counter(e["decision_id"] for e in _buffer_log() if e.get("kind") == "decision" and e.get("outcome") == "ok")
        return counts if answered <= set(counts) else None

    counts = wait_for(delivered, 60, every_s=1.0)
    assert counts is not None, "answered decisions did not reach the buffer after it came back"
    assert all(counts[d] == 1 for d in answered), "a decision was delivered twice"
