"""zcl budgets and per-request cost caps on a real local Ray (127.0.0.1), through the ingress (issue 12): a key
with `pacing: zcl` is served with paced routing (the routing dict says so, the models are the affordable ones),
`GET /v1/budget` answers its figures, its spend never exceeds the budget and it is refused (429) only once even
the cheapest model's bound no longer fits; `routing.max_cost_usd` restricts the models (400 below all of them);
a direct request by the zcl key is admitted like hard.

Run: flock /tmp/ray.lock timeout 600 .venv/bin/python -m pytest -q -s tests/integration/test_gateway_pacing.py"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from tests.integration.conftest import POOL

PORT = 8027
BASE = f"http://127.0.0.1:{PORT}"
APP = "pacing-test"
BUDGET_USD = 0.004
"""Above every replay bound but gpt-4's ($0.02): the zcl key can afford claude and gpt-3.5 only; ~10 answers spend it."""
PERIOD = "86400s"


@pytest.fixture(scope="module")
def pacing_app(ray_local, tmp_path_factory, prompts):
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from deployments.gateway.auth import create_key
    from deployments.gateway.budgets import kill_ledgers

    tmp = tmp_path_factory.mktemp("pacing")
    ckpt = save_checkpoint(make_policy("random", POOL, 384, tau=float(np.nanquantile(prompts.costs, 0.95))), tmp / "random.pt")
    keys = tmp / "keys.yaml"
    pacer, _ = create_key(keys, "pacer", ["route"], budget_usd=BUDGET_USD, period=PERIOD, pacing="zcl")
    free, _ = create_key(keys, "free", ["route"])
    cfg = load_config(
        {
            "policy": {"name": "random", "checkpoint": str(ckpt)},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"ray_actor_options": {"num_cpus": 0.1}},
            "gateway": {"auth": {"mode": "keys", "keys_file": str(keys)}, "state_dir": str(tmp / "gw")},
            "pacing": {"bins": 4, "L": 1.0, "U": 1000.0},
            "models": [{"name": m, "replay": {"split": "test"}} for m in POOL],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield {"cfg": cfg, "pacer": pacer, "free": free}
    serve.delete(APP)
    serve.shutdown()
    kill_ledgers()


def chat(key: str, text: str, model: str = "router", **routing) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    if routing:
        body["routing"] = routing
    return requests.post(f"{BASE}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def budget(key: str) -> dict:
    r = requests.get(f"{BASE}/v1/budget", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_zcl_key_is_paced_capped_and_never_overspends(pacing_app, prompts):
    from deployments.gateway.cost import CostModel

    cfg, key = pacing_app["cfg"], pacing_app["pacer"]
    bounds = {m: CostModel.from_config(cfg).max_cost(m, 0, None) for m in POOL}  # replay: the largest logged cost
    affordable = {m for m, b in bounds.items() if b <= BUDGET_USD}
    assert affordable == set(POOL[:2])
    texts = list(prompts.prompts)

    first = budget(key)
    assert (first["budget_usd"], first["period"], first["pacing"], first["spent_usd"]) == (BUDGET_USD, PERIOD, "zcl", 0.0)
    assert first["period_end"] - first["period_start"] == 86400 and first["bin"]["n_bins"] == 4 and first["z"] == 0.0

    # a cap below every model's bound: 400 naming the cheapest; a direct request above the whole budget: 429
    low = chat(key, texts[0], max_cost_usd=1e-6)
    assert low.status_code == 400 and low.json()["error"]["code"] == "max_cost_too_low", low.text
    direct = chat(key, texts[0], model=POOL[2])
    assert direct.status_code == 429 and "whole budget" in direct.json()["error"]["message"]
    # a cap that only the cheapest model meets
    cheapest = min(bounds, key=bounds.get)
    capped = chat(key, texts[0], max_cost_usd=bounds[cheapest])
    assert capped.status_code == 200, capped.text
    routing = capped.json()["routing"]
    assert routing["model"] == cheapest and routing["allowed"] == 1 and routing["paced"] is True
    costs = [routing["cost_usd"]]

    refused, served = None, [routing]
    for i in range(1, 200):  # bounded: without a working budget the loop would never stop
        r = chat(key, texts[i % len(texts)])
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 200, r.text
        routing = r.json()["routing"]
        served.append(routing)
        costs.append(routing["cost_usd"])
        assert routing["model"] in affordable and routing["paced"] is True and 0.0 <= routing["pacing_z"] <= 1.0
    assert refused is not None and refused.json()["error"]["code"] == "budget_exceeded"
    assert int(refused.headers["Retry-After"]) > 1

    after = budget(key)
    spent = after["spent_usd"]
    figures = {
        "budget_usd": BUDGET_USD,
        "bounds_usd": bounds,
        "answered": len(costs),
        "spent_usd": spent,
        "models": {m: sum(s["model"] == m for s in served) for m in POOL},
        "z_last": served[-1]["pacing_z"],
        "budget_endpoint": after,
    }
    print("\nzcl key:", json.dumps(figures))
    assert after["reserved_usd"] == 0.0
    assert spent == pytest.approx(sum(costs), abs=1e-12)  # every answered request charged once, at its cost
    assert spent <= BUDGET_USD + 1e-12  # never over
    assert spent + bounds[cheapest] > BUDGET_USD  # refused only once even the cheapest model no longer fits
    assert after["z"] > 0.0  # the bin's budget is being spent

    # a key without a budget: /v1/budget answers nulls; its cap still applies
    free = pacing_app["free"]
    assert budget(free)["budget_usd"] is None
    r = chat(free, texts[1], max_cost_usd=bounds[POOL[1]])
    assert r.status_code == 200 and r.json()["routing"]["model"] in affordable and r.json()["routing"]["allowed"] == 2
