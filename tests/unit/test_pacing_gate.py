"""zcl budgets and per-request cost caps at the gateway, without Ray (issue 12): the ledger's paced admission
(affordable models, reservation of their largest bound, 429 only when the cheapest does not fit), the bin
start spend and z (durable across a reopen), the budget invariant under concurrency with random bounds, the
Gate's choice between hard and zcl, `routing.max_cost_usd`, `GET /v1/budget`'s answer, the key store's
`pacing`, and the ingress handing the router `allowed_models` and `pacing_z`."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest

from banditrouter.config import load_config
from banditrouter.pacing import bin_fraction_spent
from deployments.gateway.auth import ANONYMOUS, Budget, KeyEntry, KeyStoreError, Principal, create_key, read_key_file
from deployments.gateway.budgets import DEFAULT_PACING_BINS, Gate, Ledger, pacing_bins, within_cap
from deployments.gateway.errors import ApiError
from deployments.gateway.parsing import parse_chat

P0 = 1_800_000_000.0
"""A multiple of 480: a "480s" period starts here."""
BOUNDS = {"cheap": 0.1, "mid": 0.3, "big": 0.6}


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite", reservation_ttl_s=600.0)
    yield led
    led.close()


def paced(led, rid, now, bounds=BOUNDS, budget=1.0, period="480s", n_bins=4, rate=None, key="k", share=1.0):
    """share=1: the affordable set is every model that fits (the share rule has its own test)."""
    return led.admit_paced(rid, key, budget, period, rate, bounds, n_bins, now=now, reserve_share=share)


def spend(led, rid, now, usd, bounds=BOUNDS, **kw):
    out = paced(led, rid, now, bounds, **kw)
    assert out["ok"], out
    led.settle(rid, usd, now=now)
    return out


# ---------------------------------------------------------------------------------------------------------
# the ledger: affordable models, reservation, refusal
# ---------------------------------------------------------------------------------------------------------
def test_affordable_models_are_those_that_fit_and_the_reservation_is_their_largest_bound(ledger):
    out = paced(ledger, "r1", P0)
    assert out["ok"] and out["allowed"] == ["cheap", "mid", "big"] and out["max_cost"] == pytest.approx(0.6)
    assert out["reserved"] == pytest.approx(0.6) and out["spent"] == 0.0
    ledger.settle("r1", 0.5, now=P0 + 1)
    out = paced(ledger, "r2", P0 + 2)  # 0.5 settled: 0.5 + 0.6 > 1, 0.5 + 0.3 fits
    assert out["allowed"] == ["cheap", "mid"] and out["max_cost"] == pytest.approx(0.3)
    out = paced(ledger, "r3", P0 + 3)  # r2's 0.3 still reserved: 0.5 + 0.3 + 0.1 fits, mid no longer
    assert out["allowed"] == ["cheap"] and out["max_cost"] == pytest.approx(0.1)
    assert ledger.usage("k", "480s", now=P0 + 3)["reserved"] == pytest.approx(0.4)


def test_one_request_reserves_at_most_its_share_of_the_headroom_so_concurrent_ones_still_fit(ledger):
    # headroom 1.0, share 0.25: only "cheap" (0.1) passes; "mid" and "big" would tie up 30% / 60% of the budget
    out = paced(ledger, "r1", P0, share=0.25)
    assert out["allowed"] == ["cheap"] and out["max_cost"] == pytest.approx(0.1)
    # with share 1 (every model that fits), four requests in flight reserve 0.6 each... only one fits; with 0.25,
    # seven requests in flight are all admitted before anything settles
    for i in range(2, 9):
        assert paced(ledger, f"r{i}", P0, share=0.25)["ok"]
    # when no model passes the share, the cheapest that fits is allowed (a zcl key is refused only when it does not fit)
    small = {"cheap": 0.1, "big": 0.6}
    out = paced(ledger, "r9", P0, bounds=small, budget=10.0, key="k2", share=0.001)
    assert out["allowed"] == ["cheap"]
    with pytest.raises(ValueError, match="reserve_share"):
        paced(ledger, "r10", P0, share=0.0)


def test_zcl_refuses_only_when_even_the_cheapest_model_would_overspend(ledger):
    spend(ledger, "r1", P0, 0.85)
    assert paced(ledger, "r2", P0 + 1)["allowed"] == ["cheap"]  # 0.85 + 0.1 <= 1: still served
    ledger.settle("r2", 0.1, now=P0 + 2)
    out = paced(ledger, "r3", P0 + 3)  # 0.95 + 0.1 > 1
    assert not out["ok"] and out["code"] == "budget_exceeded" and "is spent" in out["message"]
    assert out["retry_after_s"] == pytest.approx(480 - 3)  # to the period's end, as for hard keys
    assert paced(ledger, "r4", P0 + 480)["allowed"] == ["cheap", "mid", "big"]  # the next period


def test_zcl_refusal_messages_follow_the_hard_rules(ledger):
    assert paced(ledger, "r1", P0, {"a": 0.7, "b": 0.9})["ok"]  # reserves 0.9
    held = paced(ledger, "r2", P0 + 1, {"a": 0.2, "b": 0.5})
    assert held["code"] == "budget_exceeded" and held["retry_after_s"] == 1.0 and "in flight" in held["message"]
    whole = paced(ledger, "r3", P0 + 2, {"a": 1.5, "b": 2.0})
    assert whole["retry_after_s"] is None and "$1.5" in whole["message"] and "lower max_tokens" in whole["message"]


def test_a_retried_paced_admission_answers_the_same_set_and_reserves_once(ledger):
    spend(ledger, "r0", P0, 0.5)
    first = paced(ledger, "r1", P0 + 1)
    again = paced(ledger, "r1", P0 + 2)
    assert again["ok"] and again["allowed"] == first["allowed"] == ["cheap", "mid"]
    assert again["max_cost"] == first["max_cost"] == pytest.approx(0.3)
    assert ledger.usage("k", "480s", now=P0 + 2)["reserved"] == pytest.approx(0.3)


def test_zcl_rate_limit_applies_before_the_budget(ledger):
    assert paced(ledger, "r1", P0, rate=1)["ok"]
    out = paced(ledger, "r2", P0 + 5, rate=1)
    assert out["code"] == "rate_limited" and out["retry_after_s"] == pytest.approx(55.0)


def test_paced_admission_refuses_bad_arguments(ledger):
    with pytest.raises(ValueError, match="ends"):
        paced(ledger, "r", P0, period="total")
    with pytest.raises(ValueError, match="period"):
        paced(ledger, "r", P0, period="3s")
    with pytest.raises(ValueError, match="non-empty"):
        paced(ledger, "r", P0, bounds={})
    with pytest.raises(ValueError, match="finite"):
        paced(ledger, "r", P0, bounds={"a": float("nan")})
    with pytest.raises(ValueError, match="n_bins"):
        paced(ledger, "r", P0, n_bins=0)
    with pytest.raises(ValueError, match="budget"):
        ledger.admit_paced("r", "k", None, "day", None, BOUNDS, 4, now=P0)


# ---------------------------------------------------------------------------------------------------------
# bins and z
# ---------------------------------------------------------------------------------------------------------
def test_z_is_the_fraction_of_the_bins_budget_spent_with_rollover(ledger):
    """Budget $1 over a 480 s period in 4 bins of 120 s: bin i's budget is (i + 1) / 4 - spend at its start."""
    first = spend(ledger, "r1", P0 + 5, 0.1)
    assert (first["bin"], first["spent_at_bin_start"], first["z"]) == (0, 0.0, 0.0)
    assert (first["bin_start"], first["bin_end"]) == (P0, P0 + 120)
    out = paced(ledger, "r2", P0 + 60)  # 0.1 spent of bin 0's 0.25
    assert out["z"] == pytest.approx(0.4) and out["spent_at_bin_start"] == 0.0
    ledger.settle("r2", 0.0, now=P0 + 61)
    out = spend(ledger, "r3", P0 + 130, 0.2)  # bin 1: starts at 0.1 spent, budget 0.5 - 0.1 = 0.4
    assert (out["bin"], out["spent_at_bin_start"], out["z"]) == (1, pytest.approx(0.1), 0.0)
    out = paced(ledger, "r4", P0 + 200)
    assert out["z"] == pytest.approx(0.2 / 0.4)
    assert out["z"] == pytest.approx(bin_fraction_spent(1.0, 4, 1, 0.1, 0.3))
    ledger.settle("r4", 0.0, now=P0 + 201)
    # an idle bin 2, then bin 3 (the last): everything left is its budget; its end is the period's
    out = paced(ledger, "r5", P0 + 400)
    assert (out["bin"], out["bin_end"], out["z"]) == (3, P0 + 480, 0.0)


def test_the_bin_start_spend_is_recorded_once_and_survives_a_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    spend(led, "r1", P0 + 1, 0.05)  # bin 0 first seen at spend 0
    spend(led, "r2", P0 + 2, 0.05)
    assert paced(led, "r3", P0 + 3)["spent_at_bin_start"] == 0.0  # not re-recorded at 0.1
    assert led.db.execute("SELECT COUNT(*) FROM bin_starts").fetchone() == (1,)
    led.close()
    led = Ledger(path)  # a restarted ledger actor: same z for the same state
    out = paced(led, "r4", P0 + 4)
    assert out["spent_at_bin_start"] == 0.0 and out["z"] == pytest.approx(0.1 / 0.25)
    # usage() reports the same figures as the next admission would see, for GET /v1/budget
    u = led.usage("k", "480s", now=P0 + 5, n_bins=4, budget_usd=1.0)
    assert u["z"] == pytest.approx(0.4) and u["bin"] == 0 and u["n_bins"] == 4
    led.close()


def test_the_bins_of_a_new_period_start_from_that_periods_spend(ledger):
    spend(ledger, "r1", P0 + 1, 0.2)
    out = paced(ledger, "r2", P0 + 481)  # next period: its own spend (0) at its own bin 0
    assert (out["period_start"], out["bin"], out["spent_at_bin_start"], out["z"]) == (P0 + 480, 0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------------------
# the budget invariant under concurrency, random bounds
# ---------------------------------------------------------------------------------------------------------
def test_zcl_spend_never_exceeds_the_budget_with_8_threads_and_random_bounds(tmp_path):
    """8 clients on one zcl key; each request has its own random bounds per model; the 'router' picks any
    allowed model and the call costs at most that model's bound. settled + reserved <= budget at every admission,
    the final spend <= budget, and clients stop only when even the cheapest model no longer fits."""
    led = Ledger(tmp_path / "ledger.sqlite")
    budget = 0.2
    observed, errors, cheapest_refused = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client(c: int) -> None:
        rng = random.Random(c)
        start.wait()
        try:
            for i in range(2000):
                bounds = {m: rng.uniform(0.0005, 0.01) * scale for m, scale in (("a", 1), ("b", 3), ("c", 10))}
                rid = f"c{c}-{i}"
                out = led.admit_paced(rid, "k", budget, "3600s", None, bounds, 8)
                if not out["ok"]:
                    if out["retry_after_s"] == 1.0:  # in-flight reservations: they settle soon
                        time.sleep(0.001)
                        continue
                    with lock:
                        cheapest_refused.append(min(bounds.values()))
                    return
                assert out["max_cost"] == max(bounds[m] for m in out["allowed"])
                assert 0.0 <= out["z"] <= 1.0
                with lock:
                    observed.append(out["spent"] + out["reserved"])
                model = rng.choice(out["allowed"])
                time.sleep(rng.random() * 0.001)
                led.settle(rid, rng.uniform(0.3, 1.0) * bounds[model])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    spent = led.usage("k", "3600s")["spent"]
    assert len(observed) > 20 and max(observed) <= budget + 1e-12
    assert spent <= budget + 1e-12
    assert len(cheapest_refused) == 8
    assert all(spent + b > budget - 1e-12 for b in cheapest_refused)  # refused only when the cheapest did not fit
    led.close()


# ---------------------------------------------------------------------------------------------------------
# the Gate: hard vs zcl, the cost cap
# ---------------------------------------------------------------------------------------------------------
class RecordingMetrics:
    def __init__(self):
        self.refusals = []

    def spend(self, key_id, usd):
        pass

    def refused(self, key_id, code):
        self.refusals.append((key_id, code))


def gate_for(tmp_path, bins=None, now=P0 + 10, share=1.0):
    """share=1: every model that fits is affordable (the share rule has its own ledger test)."""
    raw = {"gateway": {"state_dir": str(tmp_path / "gw")}, "models": [{"name": m} for m in BOUNDS]}
    raw["pacing"] = {"reserve_share": share, **({} if bins is None else {"bins": bins})}
    cfg = load_config(raw, base_dir=tmp_path)
    led = Ledger(tmp_path / "ledger.sqlite", clock=lambda: now)  # one bin throughout: z is not left to the wall clock
    return Gate(cfg, ledger=led, metrics=RecordingMetrics()), led


def key(pacing="hard", usd=1.0, period="day", rate=None, key_id="team"):
    return Principal(key_id, frozenset({"route"}), Budget(usd, period, pacing), rate)


def test_pacing_bins_come_from_the_config_or_default_to_48(tmp_path):
    assert pacing_bins(object()) == DEFAULT_PACING_BINS == 48
    assert pacing_bins(type("C", (), {"pacing": type("P", (), {"bins": 12})()})()) == 12


def test_gate_paces_a_zcl_keys_routed_request_and_admits_a_direct_one_like_hard(tmp_path):
    gate, led = gate_for(tmp_path, bins=24)
    zcl = key("zcl")
    t = asyncio.run(gate.admit_request(zcl, BOUNDS, routed=True))
    assert t.allowed_models == ("cheap", "mid", "big") and t.max_cost_usd == pytest.approx(0.6)
    assert t.pacing_z == 0.0 and t.pacing["n_bins"] == 24 and t.reservation_id
    asyncio.run(t.settle(0.5))
    t = asyncio.run(gate.admit_request(zcl, BOUNDS, routed=True))
    assert t.allowed_models == ("cheap", "mid") and t.max_cost_usd == pytest.approx(0.3) and t.pacing_z > 0
    asyncio.run(t.settle(0.3))
    # a direct request (one model) by the zcl key: admitted like hard, no routing choice to pace
    direct = asyncio.run(gate.admit_request(zcl, {"cheap": 0.1}, routed=False))
    assert direct.allowed_models is None and direct.pacing_z is None and direct.max_cost_usd == pytest.approx(0.1)
    asyncio.run(direct.settle(0.15))  # 0.95 spent now
    with pytest.raises(ApiError) as ei:
        asyncio.run(gate.admit_request(zcl, BOUNDS, routed=True))
    assert (ei.value.status, ei.value.code) == (429, "budget_exceeded") and ei.value.retry_after_s > 1
    assert gate.metrics.refusals == [("team", "budget_exceeded")]
    led.close()


def test_a_hard_key_keeps_todays_rule_one_reservation_of_the_largest_bound(tmp_path):
    gate, led = gate_for(tmp_path)
    hard = key("hard")
    t = asyncio.run(gate.admit_request(hard, BOUNDS, routed=True))
    assert t.allowed_models is None and t.pacing_z is None and t.max_cost_usd == pytest.approx(0.6)
    asyncio.run(t.settle(0.5))
    with pytest.raises(ApiError) as ei:  # 0.5 + 0.6 > 1: refused although cheaper models would fit
        asyncio.run(gate.admit_request(hard, BOUNDS, routed=True))
    assert ei.value.code == "budget_exceeded"
    led.close()


def test_max_cost_usd_restricts_the_models_for_hard_zcl_and_unbudgeted_keys(tmp_path):
    gate, led = gate_for(tmp_path)
    free = Principal("free", frozenset({"route"}), None, None)
    for who, reserved in ((key("hard"), True), (key("zcl", key_id="z"), True), (free, False), (ANONYMOUS, False)):
        t = asyncio.run(gate.admit_request(who, BOUNDS, routed=True, max_cost_usd=0.3))
        assert t.allowed_models == ("cheap", "mid") and t.max_cost_usd == pytest.approx(0.3)
        assert (t.reservation_id is not None) == reserved
        asyncio.run(t.settle(0.0))
    assert led.usage("team", "day")["reserved"] == 0.0
    led.close()


def test_a_cap_below_every_bound_is_a_400_naming_the_cheapest(tmp_path):
    gate, led = gate_for(tmp_path)
    for who in (key("hard"), key("zcl"), ANONYMOUS):
        with pytest.raises(ApiError) as ei:
            asyncio.run(gate.admit_request(who, BOUNDS, routed=True, max_cost_usd=0.05))
        assert (ei.value.status, ei.value.code) == (400, "max_cost_too_low")
        assert "'cheap' at $0.1" in ei.value.message
    with pytest.raises(ApiError) as ei:  # a direct request for a model whose bound is above the cap
        asyncio.run(gate.admit_request(key("zcl"), {"big": 0.6}, routed=False, max_cost_usd=0.5))
    assert ei.value.status == 400 and "'big' may cost up to $0.6" in ei.value.message
    ok = asyncio.run(gate.admit_request(key("zcl"), {"mid": 0.3}, routed=False, max_cost_usd=0.3))  # at the cap
    assert ok.max_cost_usd == pytest.approx(0.3) and ok.allowed_models is None
    assert led.usage("team", "day")["reserved"] == pytest.approx(0.3)  # the refused ones reserved nothing
    led.close()


def test_within_cap_keeps_bounds_order_and_passes_everything_without_a_cap():
    assert within_cap(BOUNDS, None, routed=True) == BOUNDS
    assert list(within_cap(BOUNDS, 0.6, routed=True)) == ["cheap", "mid", "big"]
    assert list(within_cap(BOUNDS, 0.1, routed=True)) == ["cheap"]


def test_budget_status_for_zcl_hard_and_unbudgeted_keys(tmp_path):
    gate, led = gate_for(tmp_path, bins=4)
    zcl = key("zcl", period="480s", key_id="z")
    led.admit_paced("r1", "z", 1.0, "480s", None, BOUNDS, 4)
    led.settle("r1", 0.1)
    assert asyncio.run(gate.budget_status(zcl))["z"] == pytest.approx(0.1 / 0.25)  # bin 0 of 4 ($0.25)
    out = asyncio.run(gate.budget_status(zcl))
    assert out["key_id"] == "z" and out["pacing"] == "zcl" and out["period"] == "480s" and out["budget_usd"] == 1.0
    assert out["spent_usd"] == pytest.approx(0.1) and out["reserved_usd"] == 0.0
    assert out["period_end"] - out["period_start"] == 480 and out["bin"]["n_bins"] == 4
    assert out["z"] == pytest.approx(bin_fraction_spent(1.0, 4, out["bin"]["bin"], out["bin"]["spent_at_bin_start"], 0.1))
    hard = asyncio.run(gate.budget_status(key("hard", usd=5.0)))
    assert hard["pacing"] == "hard" and hard["z"] is None and hard["bin"] is None and hard["period"] == "day"
    assert hard["spent_usd"] == 0.0 and hard["period_end"] - hard["period_start"] == 86400
    none = asyncio.run(gate.budget_status(Principal("free", frozenset({"route"}), None, None)))
    expected = ("budget_usd", "period", "pacing", "spent_usd", "reserved_usd", "period_start", "period_end", "z")
    assert none["key_id"] == "free" and all(none[k] is None for k in expected)
    assert asyncio.run(gate.budget_status(ANONYMOUS))["budget_usd"] is None
    led.close()


# ---------------------------------------------------------------------------------------------------------
# the request body and the key store
# ---------------------------------------------------------------------------------------------------------
BODY = {"model": "router", "messages": [{"role": "user", "content": "hi"}]}


def test_max_cost_usd_is_a_positive_finite_number():
    assert parse_chat({**BODY, "routing": {"max_cost_usd": 0.01}}, None).max_cost_usd() == 0.01
    assert parse_chat({**BODY, "routing": {"max_cost_usd": 2}}, None).max_cost_usd() == 2.0
    assert parse_chat(BODY, None).max_cost_usd() is None
    assert parse_chat({**BODY, "routing": {"preference": {"quality": 1, "cost": 0}}}, None).max_cost_usd() is None
    for bad in (0, -0.5, float("nan"), float("inf"), "0.01", True, [0.1], {"usd": 1}):
        with pytest.raises(ApiError) as ei:
            parse_chat({**BODY, "routing": {"max_cost_usd": bad}}, None)
        assert ei.value.status == 422 and "routing.max_cost_usd" in ei.value.message
    with pytest.raises(ApiError, match="max_cost"):  # a misspelt field is refused, not ignored
        parse_chat({**BODY, "routing": {"max_cost": 0.01}}, None)


def test_key_store_reads_pacing_and_custom_periods(tmp_path):
    path = tmp_path / "keys.yaml"
    _, entry = create_key(path, "pacer", ["route"], budget_usd=2.0, period="300s", pacing="zcl")
    (back,) = read_key_file(path)
    assert back.principal().budget == Budget(2.0, "300s", "zcl") and entry.budget.pacing == "zcl"
    create_key(path, "plain", ["route"], budget_usd=1.0)
    assert read_key_file(path)[1].principal().budget == Budget(1.0, "day", "hard")
    old = KeyEntry.model_validate(
        {"id": "o", "hash": "sha256:" + "0" * 64, "scopes": ["route"], "budget": {"usd": 1, "period": "week"}}
    )
    assert old.principal().budget.pacing == "hard"  # a key file from before issue 12 reads as hard


@pytest.mark.parametrize(
    "budget, why",
    [
        ({"usd": 1, "period": "total", "pacing": "zcl"}, "never does"),
        ({"usd": 1, "period": "day", "pacing": "soft"}, "pacing"),
        ({"usd": 1, "period": "5s"}, "too short"),
        ({"usd": 1, "period": "fortnight"}, "unknown budget period"),
        ({"usd": 1, "period": 300}, "period"),
    ],
)
def test_bad_pacing_or_period_in_a_key_store_is_refused_with_its_reason(tmp_path, budget, why):
    from deployments.gateway.auth import parse_key_store

    text = json.dumps({"keys": [{"id": "x", "hash": "sha256:" + "0" * 64, "scopes": ["route"], "budget": budget}]})
    with pytest.raises(KeyStoreError, match=why):
        parse_key_store(text, "keys.yaml")


def test_create_key_refuses_pacing_without_a_budget(tmp_path):
    with pytest.raises(KeyStoreError, match="--budget-usd"):
        create_key(tmp_path / "keys.yaml", "x", ["route"], pacing="zcl")
    with pytest.raises(KeyStoreError, match="pacing must be one of"):
        create_key(tmp_path / "keys.yaml", "x", ["route"], budget_usd=1.0, pacing="slow")
    assert not (tmp_path / "keys.yaml").exists()


def test_cli_keys_create_pacing_zcl(tmp_path):
    from typer.testing import CliRunner

    from banditrouter.cli import app

    path = tmp_path / "keys.yaml"
    runner = CliRunner()
    args = ["keys", "create", "--id", "pacer", "--scopes", "route", "--budget-usd", "0.5", "--file", str(path)]
    out = runner.invoke(app, [*args, "--period", "300s", "--pacing", "zcl"])
    assert out.exit_code == 0, out.output
    assert read_key_file(path)[0].principal().budget == Budget(0.5, "300s", "zcl")
    listed = runner.invoke(app, ["keys", "list", "--file", str(path)])
    assert "0.5 per 300s (zcl)" in listed.stdout
    bad = runner.invoke(app, ["keys", "create", "--id", "t", "--scopes", "route", "--budget-usd", "1", "--period", "total",
                              "--pacing", "zcl", "--file", str(path)])  # fmt: skip
    assert bad.exit_code == 2 and "never does" in bad.output


# ---------------------------------------------------------------------------------------------------------
# the ingress hands the router the allowed models and z (no Ray: a fake router, the Gate on a local ledger)
# ---------------------------------------------------------------------------------------------------------
class FakeRouter:
    def __init__(self):
        self.requests = []
        router = self

        class _Route:
            async def remote(self, req):
                from deployments.backends import CompletionResult

                router.requests.append(req)
                model = (req.allowed_models or ("cheap",))[0]
                result = CompletionResult("ok", 0.01, 5, 1, 0.01, {"backend": "fake"})
                return {"result": result, "routing": {"model": model, "decision_id": "d1", "cost_usd": 0.01}}

        self.route = _Route()


def fake_ingress(tmp_path, bins=4):
    from deployments.gateway.cost import CostModel, ModelPrice
    from deployments.ingress import Ingress

    cfg = load_config(
        {"gateway": {"state_dir": str(tmp_path / "gw")}, "models": [{"name": m} for m in BOUNDS]}, base_dir=tmp_path
    )
    ing = object.__new__(Ingress.func_or_class)
    ing.cfg, ing.limits = cfg, cfg.gateway.limits
    ing.router = FakeRouter()
    ing.models = dict.fromkeys(BOUNDS)
    ing.model_cfgs = {m.name: m for m in cfg.models}
    ing.default_preference = (1.0, 0.0)
    ing.costs = CostModel({m: ModelPrice(m, max_logged_cost=b) for m, b in BOUNDS.items()}, 256)
    ing.gate, led = gate_for(tmp_path, bins=bins)
    return ing, led


def http_request(body: dict):
    from starlette.requests import Request

    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_the_ingress_passes_allowed_models_and_pacing_z_and_reserves_their_largest_bound(tmp_path):
    ing, led = fake_ingress(tmp_path)
    cls = type(ing)
    zcl = key("zcl", period="480s", key_id="z")
    resp = asyncio.run(cls.chat_completions(ing, http_request(BODY), zcl, None))
    assert resp.status_code == 200
    req = ing.router.requests[-1]
    assert req.allowed_models == ("cheap", "mid", "big") and req.pacing_z == 0.0
    capped = {**BODY, "routing": {"max_cost_usd": 0.35}}
    asyncio.run(cls.chat_completions(ing, http_request(capped), zcl, None))
    req = ing.router.requests[-1]
    assert req.allowed_models == ("cheap", "mid") and req.pacing_z > 0  # 0.01 settled in bin 0
    hard = key("hard", key_id="h")
    asyncio.run(cls.chat_completions(ing, http_request(capped), hard, None))
    assert ing.router.requests[-1].allowed_models == ("cheap", "mid") and ing.router.requests[-1].pacing_z is None
    asyncio.run(cls.chat_completions(ing, http_request(BODY), hard, None))
    assert ing.router.requests[-1].allowed_models is None and ing.router.requests[-1].pacing_z is None
    assert led.usage("z", "480s")["spent"] == pytest.approx(0.02) and led.usage("h", "day")["spent"] == pytest.approx(0.02)
    with pytest.raises(ApiError) as ei:
        asyncio.run(cls.chat_completions(ing, http_request({**BODY, "routing": {"max_cost_usd": 0.01}}), hard, None))
    assert ei.value.status == 400 and ei.value.code == "max_cost_too_low"
    assert len(ing.router.requests) == 4  # the refused request reached no router
    status = asyncio.run(cls.budget(ing, zcl))
    assert status["spent_usd"] == pytest.approx(0.02) and status["pacing"] == "zcl" and status["z"] > 0
    led.close()
