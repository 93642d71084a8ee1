"""A rolling update under load, on a real local Ray: the pool app is redeployed with a changed config (one
more model, a longer model timeout: new ingress and router replicas, Serve replaces them one by one and
drains the old ones) while clients keep sending; nothing is dropped (a 504 past the model timeout under the
update's CPU load is counted apart, at most 1%).

The redeploy goes through `serve.run` of the changed app (the same declarative update of the app's
deployments that `serve deploy` of a config file asks the controller for). It runs last among the pool
scenarios: it leaves the pool app on the changed config.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.chaos.conftest import (
    BASE,
    MODEL_TIMEOUT_S,
    POOL_APP,
    Background,
    decision_record_check,
    deploy,
    pool_config,
    summarize,
)


def test_rolling_update_under_load_drops_nothing(pool_app, fresh_upstream, upstream, figures):
    for m in ("primary", "backup", "spare", "extra"):
        fresh_upstream.set(m, "ok", latency_s=0.2)
    before = [m["id"] for m in requests.get(f"{BASE}/v1/models", timeout=30).json()["data"]]
    assert "extra" not in before, before
    changed = pool_config(
        upstream, Path(pool_app.router.events_path).parent, extra_models=("extra",), model_timeout_s=MODEL_TIMEOUT_S + 1
    )
    run = Background(100_000, 6, "rolling", stream_every=4, timeout_s=60).start()
    time.sleep(3)
    t0 = time.monotonic()
    deploy(changed, POOL_APP)
    update_s = time.monotonic() - t0
    time.sleep(3)
    results = run.stop().join()
    after = [m["id"] for m in requests.get(f"{BASE}/v1/models", timeout=30).json()["data"]]
    stats = summarize(results)
    records = decision_record_check(changed, results)
    figures(**stats, **records, update_s=round(update_s, 1), max_s=round(max(r.latency_s for r in results), 3))
    assert "extra" in after, ("the changed config is not what serves", after)
    # Nothing dropped: no connection error, no 502/503, no stream cut. A 504 is a request that ran past the old
    # config's 3 s model timeout while the new replicas started on the same 2 cores (they import torch): the
    # update's CPU load, answered as configured, not a drop. Two fresh-clone CI runs saw one such 504 each (of 530
    # and of 511), with the fake upstream at 0.2 s; at most 1% is allowed.
    dropped = {k: v for k, v in stats["non_2xx_by"].items() if k != "504"}
    assert not dropped, stats
    assert stats["non_2xx_by"].get("504", 0) <= 0.01 * stats["requests"], stats
