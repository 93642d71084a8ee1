"""Hard budgets on a real local Ray (127.0.0.1): the ledger actor under 8 concurrent clients, the must-show
budget test over HTTP (8 concurrent clients on one key with a $X budget: total spend <= X + one request's
maximum cost, then 429 budget_exceeded with Retry-After), and the spend surviving a restart of the ledger
actor and of the whole app (same state_dir: the key stays refused).

Run: flock /tmp/ray.lock timeout 600 .venv/bin/python -m pytest -q -s tests/integration/test_gateway_budget.py
(-s prints the measured figures)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import requests

from tests.integration.conftest import POOL

PORT = 8017
BASE = f"http://127.0.0.1:{PORT}"
APP = "budget-test"
BUDGET_USD = 0.25
"""X: with the random policy over POOL a request costs ~$0.0034 on average, so ~70 requests spend it (seconds)."""


def _wait(pred, timeout_s: float = 60.0, every: float = 0.2):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            value = pred()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(every)
    return pred()


def test_ledger_actor_keeps_the_invariant_under_8_clients_and_survives_restarts(ray_local, tmp_path):
    import ray

    from banditrouter.config import load_config
    from deployments.gateway.auth import Budget, Principal
    from deployments.gateway.budgets import Gate, get_or_create_ledger, kill_ledgers
    from deployments.gateway.errors import ApiError

    cfg = load_config({"gateway": {"state_dir": str(tmp_path / "gw")}, "models": [{"name": m} for m in POOL[:2]]})
    budget, max_cost = 0.05, 0.004
    principal = Principal("actor-key", frozenset({"route"}), Budget(budget, "day"), None)
    gate = Gate(cfg)

    async def client(c: int, rng: np.random.Generator) -> ApiError:
        while True:
            try:
                ticket = await gate.admit(principal, max_cost)
            except ApiError as e:
                if e.retry_after_s == 1.0:  # in-flight reservations hold the rest: they settle shortly
                    await asyncio.sleep(0.01)
                    continue
                return e
            await asyncio.sleep(float(rng.uniform(0, 0.01)))
            await ticket.settle(float(rng.uniform(0.5, 1.0)) * max_cost)

    async def run():
        return await asyncio.gather(*(client(c, np.random.default_rng(c)) for c in range(8)))

    refusals = asyncio.run(run())
    assert all(e.status == 429 and e.code == "budget_exceeded" and e.retry_after_s > 1 for e in refusals)
    ledger = get_or_create_ledger(cfg)
    spent = ray.get(ledger.usage.remote("actor-key", "day"))["spent"]
    print(f"\nledger actor, 8 clients: budget ${budget}, max cost ${max_cost}, spent ${spent:.6f}")
    assert budget - 2 * max_cost <= spent <= budget + 1e-12

    # kill the actor: Ray restarts it (max_restarts=-1) and it reads the same SQLite file
    ray.kill(ledger, no_restart=False)
    again = _wait(lambda: ray.get(ledger.usage.remote("actor-key", "day"), timeout=5))
    assert again["spent"] == pytest.approx(spent)
    # kill it for good: the next Gate creates a fresh actor by name, same file, same spend
    assert kill_ledgers() == 1
    gate2 = Gate(cfg)
    with pytest.raises(ApiError) as ei:
        asyncio.run(gate2.admit(principal, max_cost))
    assert ei.value.code == "budget_exceeded"
    assert ray.get(get_or_create_ledger(cfg).usage.remote("actor-key", "day"))["spent"] == pytest.approx(spent)
    kill_ledgers()


# ---------------------------------------------------------------------------------------------------------
# must-show 2: over HTTP, through the ingress
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget_app(ray_local, tmp_path_factory, prompts):
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.app import build_app
    from deployments.gateway.auth import create_key
    from deployments.gateway.budgets import kill_ledgers

    tmp = tmp_path_factory.mktemp("budget")
    ckpt = save_checkpoint(make_policy("random", POOL, 384, tau=float(np.nanquantile(prompts.costs, 0.95))), tmp / "random.pt")
    keys = tmp / "keys.yaml"
    spender, _ = create_key(keys, "spender", ["route"], budget_usd=BUDGET_USD, period="day")
    other, _ = create_key(keys, "other", ["route"], budget_usd=1.0, period="day")
    cfg = load_config(
        {
            "policy": {"name": "random", "checkpoint": str(ckpt)},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "router": {"ray_actor_options": {"num_cpus": 0.1}},
            "gateway": {"auth": {"mode": "keys", "keys_file": str(keys)}, "state_dir": str(tmp / "gw")},
            "models": [{"name": m, "replay": {"split": "test"}} for m in POOL],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})

    def start():
        serve.run(build_app(cfg), name=APP, route_prefix="/")

    start()
    yield {"cfg": cfg, "spender": spender, "other": other, "restart": start}
    serve.delete(APP)
    serve.shutdown()
    kill_ledgers()


def chat(key: str, text: str) -> requests.Response:
    return requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "router", "messages": [{"role": "user", "content": text}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_8_concurrent_clients_cannot_overspend_a_key_and_the_spend_survives_a_restart(budget_app, prompts):
    import ray

    from deployments.gateway.budgets import get_or_create_ledger, kill_ledgers
    from deployments.gateway.cost import CostModel, input_token_bound

    cfg, key = budget_app["cfg"], budget_app["spender"]
    cost_model = CostModel.from_config(cfg)
    texts = list(prompts.prompts)
    max_request = max(cost_model.max_cost("router", input_token_bound([{"role": "user", "content": t}]), None) for t in texts)
    answered, refused, other_status = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(c, 8 * 150, 8):  # bounded: without a working budget no client would ever stop
            r = chat(key, texts[i % len(texts)])
            if r.status_code == 200:
                with lock:
                    answered.append(r.json()["routing"]["cost_usd"])
                continue
            body = r.json()
            if r.status_code == 429 and body["error"]["code"] == "budget_exceeded" and int(r.headers["Retry-After"]) > 1:
                with lock:
                    refused.append((r.headers["Retry-After"], body))
                return
            if r.status_code == 429 and body["error"]["code"] == "budget_exceeded":  # in-flight reservations: retry
                time.sleep(1.0)
                continue
            with lock:
                other_status.append((r.status_code, body))
            return

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.monotonic() - t0
    assert not other_status, other_status[:3]
    assert len(refused) == 8  # every client ended on a 429 budget_exceeded with a Retry-After to the period's end

    ledger = get_or_create_ledger(cfg)
    usage = _wait(lambda: (u := ray.get(ledger.usage.remote("spender", "day"))) and u["reserved"] == 0 and u)
    spent = usage["spent"]
    figures = {
        "budget_usd": BUDGET_USD,
        "max_request_cost_usd": max_request,
        "spent_usd": spent,
        "answered": len(answered),
        "sum_of_answered_costs_usd": float(np.sum(answered)),
        "seconds_to_exhaust": round(elapsed, 2),
        "retry_after_s": int(refused[0][0]),
    }
    print("\nbudget test:", json.dumps(figures))
    assert spent <= BUDGET_USD + max_request  # the bound
    assert spent <= BUDGET_USD + 1e-9  # what reserving the maximum gives: never over at all
    assert spent == pytest.approx(float(np.sum(answered)), abs=1e-9)  # every answered request was charged, once
    assert spent >= BUDGET_USD - max_request  # it stopped at the budget, not earlier
    for retry_after, body in refused:
        assert 1 < int(retry_after) <= 86400
        assert body["error"]["request_id"] and "spent" in body["error"]["message"]

    # restart 1: kill the ledger actor; Ray restarts it from SQLite and the key stays refused
    ray.kill(ledger, no_restart=False)
    r = _wait(lambda: (x := chat(key, texts[0])).status_code == 429 and x)
    assert r.json()["error"]["code"] == "budget_exceeded" and int(r.headers["Retry-After"]) > 1

    # restart 2: the whole app goes (ingress, router, ledger actor), then starts again on the same state_dir
    from ray import serve

    serve.delete(APP)
    kill_ledgers()
    budget_app["restart"]()
    r = chat(key, texts[0])
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded" and int(r.headers["Retry-After"]) > 1
    assert ray.get(get_or_create_ledger(cfg).usage.remote("spender", "day"))["spent"] == pytest.approx(spent)
    ok = chat(budget_app["other"], texts[0])  # another key with budget left is served
    assert ok.status_code == 200, ok.text
