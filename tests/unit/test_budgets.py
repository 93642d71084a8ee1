"""The budget ledger and gate without Ray: calendar periods, reserve-then-settle, refusals with Retry-After,
the sliding-window rate limit, expiry of unsettled reservations, idempotency, durability across a reopen,
and the budget invariant under concurrency (threads against the ledger core, asyncio through the Gate)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import datetime, timezone

import pytest

from banditrouter.config import load_config
from deployments.gateway.auth import Budget, Principal
from deployments.gateway.budgets import Gate, Ledger, period_bounds
from deployments.gateway.errors import ApiError

T0 = datetime(2026, 3, 18, 15, 42, 7, tzinfo=timezone.utc).timestamp()  # a Wednesday


def ts(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite", reservation_ttl_s=600.0)
    yield led
    led.close()


class RecordingMetrics:
    def __init__(self):
        self.spent: list[tuple[str | None, float]] = []
        self.refusals: list[tuple[str | None, str]] = []

    def spend(self, key_id, usd):
        self.spent.append((key_id, usd))

    def refused(self, key_id, code):
        self.refusals.append((key_id, code))


def cfg_for(tmp_path):
    return load_config(
        {"gateway": {"state_dir": str(tmp_path / "gw")}, "models": [{"name": "a"}, {"name": "b"}]}, base_dir=tmp_path
    )


# ---------------------------------------------------------------------------------------------------------
# periods
# ---------------------------------------------------------------------------------------------------------
def test_period_bounds_are_utc_calendar_periods():
    assert period_bounds("hour", T0) == (ts(2026, 3, 18, 15), ts(2026, 3, 18, 16))
    assert period_bounds("day", T0) == (ts(2026, 3, 18), ts(2026, 3, 19))
    assert period_bounds("week", T0) == (ts(2026, 3, 16), ts(2026, 3, 23))  # Monday to Monday
    assert period_bounds("month", T0) == (ts(2026, 3, 1), ts(2026, 4, 1))
    assert period_bounds("month", ts(2026, 12, 31, 23, 59)) == (ts(2026, 12, 1), ts(2027, 1, 1))
    assert period_bounds("total", T0) == (0.0, None)
    with pytest.raises(ValueError, match="unknown budget period"):
        period_bounds("fortnight", T0)


def test_relative_gateway_state_dir_resolves_against_the_config_folder(tmp_path):
    cfg = load_config({"gateway": {"state_dir": "gw"}, "models": [{"name": "a"}, {"name": "b"}]}, base_dir=tmp_path)
    assert cfg.gateway.state_dir == (tmp_path / "gw").resolve()


# ---------------------------------------------------------------------------------------------------------
# reserve, settle, refuse
# ---------------------------------------------------------------------------------------------------------
def test_reservation_counts_until_settled_then_the_actual_cost_replaces_it(ledger):
    out = ledger.admit("r1", "k", 1.0, "day", None, 0.4, now=T0)
    assert out["ok"] and out["reserved"] == pytest.approx(0.4) and out["spent"] == 0.0
    assert ledger.usage("k", "day", now=T0) == {
        "spent": 0.0,
        "reserved": pytest.approx(0.4),
        "period_start": ts(2026, 3, 18),
        "period_end": ts(2026, 3, 19),
    }
    assert ledger.settle("r1", 0.1, now=T0 + 1) == {"status": "settled", "charged": 0.1}
    u = ledger.usage("k", "day", now=T0 + 1)
    assert u["spent"] == pytest.approx(0.1) and u["reserved"] == 0.0
    # a second settle (a retried call) charges nothing more
    assert ledger.settle("r1", 0.1, now=T0 + 2)["status"] == "unknown"
    assert ledger.usage("k", "day", now=T0 + 2)["spent"] == pytest.approx(0.1)
    # the same spend is seen by every period kind (a key's period can be changed in the key store)
    for p in ("hour", "week", "month", "total"):
        assert ledger.usage("k", p, now=T0 + 2)["spent"] == pytest.approx(0.1)


def test_budget_exceeded_retry_after_is_the_time_to_the_period_reset(ledger):
    assert ledger.admit("r1", "k", 1.0, "day", None, 0.6, now=T0)["ok"]
    ledger.settle("r1", 0.6, now=T0)
    out = ledger.admit("r2", "k", 1.0, "day", None, 0.5, now=T0 + 10)
    assert not out["ok"] and out["code"] == "budget_exceeded"
    assert out["retry_after_s"] == pytest.approx(ts(2026, 3, 19) - (T0 + 10))
    assert "$1 this day (UTC) is spent" in out["message"]
    assert ledger.admit("r3", "k", 1.0, "day", None, 0.4, now=T0 + 11)["ok"]  # what still fits is admitted
    # the next day starts from zero, and the refused request reserved nothing
    assert ledger.admit("r4", "k", 1.0, "day", None, 0.9, now=ts(2026, 3, 19, 0, 0, 1))["ok"]


def test_total_budget_never_resets_so_there_is_no_retry_after(ledger):
    assert ledger.admit("r1", "k", 0.5, "total", None, 0.5, now=T0)["ok"]
    ledger.settle("r1", 0.5, now=T0)
    out = ledger.admit("r2", "k", 0.5, "total", None, 0.01, now=T0 + 365 * 86400)
    assert out["code"] == "budget_exceeded" and out["retry_after_s"] is None and "does not reset" in out["message"]


def test_refusal_caused_only_by_requests_in_flight_says_retry_shortly(ledger):
    assert ledger.admit("r1", "k", 1.0, "hour", None, 0.8, now=T0)["ok"]
    out = ledger.admit("r2", "k", 1.0, "hour", None, 0.5, now=T0 + 1)
    assert out["code"] == "budget_exceeded" and out["retry_after_s"] == 1.0 and "in flight" in out["message"]
    ledger.settle("r1", 0.2, now=T0 + 2)  # the in-flight request cost less than its maximum
    assert ledger.admit("r2", "k", 1.0, "hour", None, 0.5, now=T0 + 3)["ok"]


def test_a_request_whose_maximum_exceeds_the_whole_budget_is_told_so(ledger):
    out = ledger.admit("r1", "k", 0.01, "day", None, 0.02, now=T0)
    assert out["code"] == "budget_exceeded" and out["retry_after_s"] is None and "lower max_tokens" in out["message"]


def test_cost_counts_in_the_period_the_request_was_admitted_in(ledger):
    late = ts(2026, 3, 18, 23, 59, 59)
    assert ledger.admit("r1", "k", 1.0, "day", None, 0.7, now=late)["ok"]
    ledger.settle("r1", 0.7, now=late + 5)  # settles after midnight
    assert ledger.usage("k", "day", now=late)["spent"] == pytest.approx(0.7)
    assert ledger.usage("k", "day", now=late + 5)["spent"] == 0.0


def test_bad_arguments_are_refused_with_a_clear_error(ledger):
    with pytest.raises(ValueError, match="max_cost"):
        ledger.admit("r", "k", 1.0, "day", None, float("nan"), now=T0)
    with pytest.raises(ValueError, match="period"):
        ledger.admit("r", "k", 1.0, "year", None, 0.1, now=T0)
    with pytest.raises(ValueError, match="rate_per_min"):
        ledger.admit("r", "k", None, "day", 0, 0.1, now=T0)


def test_settle_with_a_non_finite_cost_charges_the_maximum(ledger):
    assert ledger.admit("r1", "k", 1.0, "day", None, 0.3, now=T0)["ok"]
    assert ledger.settle("r1", float("nan"), now=T0)["charged"] == pytest.approx(0.3)
    assert ledger.usage("k", "day", now=T0)["spent"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------------------
# rate limit: sliding-window log
# ---------------------------------------------------------------------------------------------------------
def test_rate_limit_is_a_sliding_60s_window_and_retry_after_is_when_a_slot_frees(ledger):
    for i, dt in enumerate((0.0, 10.0, 20.0)):
        assert ledger.admit(f"r{i}", "k", None, "day", 3, 0.0, now=T0 + dt)["ok"]
    out = ledger.admit("r3", "k", None, "day", 3, 0.0, now=T0 + 30)
    assert out["code"] == "rate_limited" and out["retry_after_s"] == pytest.approx(30.0)  # the t=0 slot frees at 60
    # refused requests take no slot: a burst of refusals does not push the window on
    for i in range(5):
        assert not ledger.admit(f"x{i}", "k", None, "day", 3, 0.0, now=T0 + 59)["ok"]
    assert ledger.admit("r4", "k", None, "day", 3, 0.0, now=T0 + 60.001)["ok"]
    out = ledger.admit("r5", "k", None, "day", 3, 0.0, now=T0 + 61)
    assert out["code"] == "rate_limited" and out["retry_after_s"] == pytest.approx(9.0)  # t=10 frees at 70
    assert ledger.admit("other", "k2", None, "day", 3, 0.0, now=T0 + 61)["ok"]  # per key


def test_rate_limit_is_checked_before_the_budget_and_both_apply(ledger):
    assert ledger.admit("r1", "k", 1.0, "day", 2, 0.6, now=T0)["ok"]
    assert ledger.admit("r2", "k", 1.0, "day", 2, 0.6, now=T0)["code"] == "budget_exceeded"
    assert ledger.admit("r3", "k", 1.0, "day", 2, 0.1, now=T0)["ok"]
    assert ledger.admit("r4", "k", 1.0, "day", 2, 0.1, now=T0)["code"] == "rate_limited"


# ---------------------------------------------------------------------------------------------------------
# idempotency, expiry, durability
# ---------------------------------------------------------------------------------------------------------
def test_a_retried_admit_reserves_once(ledger):
    for _ in range(3):  # Ray retries a call across an actor restart with the same reservation id
        assert ledger.admit("r1", "k", 1.0, "day", 5, 0.4, now=T0)["ok"]
    assert ledger.usage("k", "day", now=T0)["reserved"] == pytest.approx(0.4)
    assert ledger.admit("r2", "k", 1.0, "day", 5, 0.6, now=T0)["ok"]  # 0.4 + 0.6 fits exactly


def test_unsettled_reservation_expires_charged_at_its_maximum_and_a_late_settle_corrects_it(ledger):
    assert ledger.admit("r1", "k", 1.0, "day", None, 0.5, now=T0)["ok"]
    assert ledger.usage("k", "day", now=T0 + 599)["reserved"] == pytest.approx(0.5)
    u = ledger.usage("k", "day", now=T0 + 600)  # past the TTL: the replica that held it is presumed dead
    assert u["reserved"] == 0.0 and u["spent"] == pytest.approx(0.5)
    assert ledger.settle("r1", 0.125, now=T0 + 700) == {"status": "settled_late", "charged": 0.125}
    assert ledger.usage("k", "day", now=T0 + 700)["spent"] == pytest.approx(0.125)
    assert ledger.settle("r1", 0.125, now=T0 + 701)["status"] == "unknown"


def test_spend_reservations_and_rate_windows_survive_a_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    assert led.admit("r1", "k", 1.0, "day", 2, 0.3, now=T0)["ok"]
    led.settle("r1", 0.3, now=T0)
    assert led.admit("r2", "k", 1.0, "day", 2, 0.5, now=T0 + 1)["ok"]  # left open
    led.close()
    led = Ledger(path)  # a restarted actor: same file
    u = led.usage("k", "day", now=T0 + 2)
    assert u["spent"] == pytest.approx(0.3) and u["reserved"] == pytest.approx(0.5)
    assert led.admit("r3", "k", 1.0, "day", 2, 0.1, now=T0 + 2)["code"] == "rate_limited"  # window kept
    assert led.settle("r2", 0.5, now=T0 + 3)["status"] == "settled"
    assert led.admit("r4", "k", 1.0, "day", 2, 0.3, now=T0 + 61)["code"] == "budget_exceeded"
    led.close()


# ---------------------------------------------------------------------------------------------------------
# the invariant under concurrency
# ---------------------------------------------------------------------------------------------------------
def test_spend_never_exceeds_the_budget_with_8_threads(tmp_path):
    """8 clients hammer one key; each request's actual cost is at most its reserved maximum. The ledger serialises
    check-and-reserve, so settled + reserved <= budget at every admission and the final spend <= budget."""
    led = Ledger(tmp_path / "ledger.sqlite")
    budget, max_cost = 0.05, 0.004
    admitted, observed, errors = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client(c: int) -> None:
        rng = random.Random(c)
        start.wait()
        try:
            for i in range(400):
                rid = f"c{c}-{i}"
                out = led.admit(rid, "k", budget, "day", None, max_cost)
                if not out["ok"]:
                    if out["retry_after_s"] == 1.0:  # others' reservations in the way: they settle soon
                        time.sleep(0.001)
                        continue
                    return  # budget spent
                with lock:
                    admitted.append(rid)
                    observed.append(out["spent"] + out["reserved"])
                time.sleep(rng.random() * 0.002)  # the model call: others admit meanwhile
                led.settle(rid, rng.uniform(0.5, 1.0) * max_cost)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spent = led.usage("k", "day")["spent"]
    assert max(observed) <= budget + 1e-12
    assert spent <= budget + 1e-12
    assert spent >= budget - 2 * max_cost  # it did spend the budget (everyone stopped only at the limit)
    assert len(admitted) > 12
    led.close()


def test_gate_8_concurrent_clients_refused_with_429_once_spent(tmp_path):
    metrics = RecordingMetrics()
    led = Ledger(tmp_path / "ledger.sqlite")
    gate = Gate(cfg_for(tmp_path), ledger=led, metrics=metrics)
    principal = Principal("team-a", frozenset({"route"}), Budget(0.02, "day"), None)
    max_cost = 0.003

    async def client(c: int) -> list[ApiError]:
        refusals = []
        for _ in range(50):
            try:
                ticket = await gate.admit(principal, max_cost)
            except ApiError as e:
                refusals.append(e)
                if e.retry_after_s == 1.0:
                    await asyncio.sleep(0.005)
                    continue
                return refusals
            await asyncio.sleep(0.002 * (c % 3))
            await ticket.settle(max_cost * 0.9)
            await ticket.settle(max_cost * 0.9)  # idempotent
        return refusals

    async def main():
        return await asyncio.gather(*(client(c) for c in range(8)))

    results = asyncio.run(main())
    final = [r[-1] for r in results]
    assert all(e.status == 429 and e.code == "budget_exceeded" for e in final)
    assert all(e.retry_after_s is not None and e.retry_after_s > 1.0 for e in final)  # until midnight UTC
    spent = led.usage("team-a", "day")["spent"]
    assert spent <= 0.02 + 1e-12
    assert sum(usd for _, usd in metrics.spent) == pytest.approx(spent)  # settle feeds the spend metric once
    assert metrics.refusals and all(r == ("team-a", "budget_exceeded") for r in metrics.refusals)
    led.close()


def test_gate_rate_limited_is_429_with_retry_after(tmp_path):
    metrics = RecordingMetrics()
    led = Ledger(tmp_path / "ledger.sqlite")
    gate = Gate(cfg_for(tmp_path), ledger=led, metrics=metrics)
    principal = Principal("k", frozenset({"route"}), None, 2)

    async def main():
        for _ in range(2):
            t = await gate.admit(principal, 0.0)
            assert t.reservation_id is None  # no budget: nothing to reserve
            await t.settle(0.01)
        with pytest.raises(ApiError) as ei:
            await gate.admit(principal, 0.0)
        return ei.value

    e = asyncio.run(main())
    assert e.status == 429 and e.code == "rate_limited" and 55 < e.retry_after_s <= 60
    assert metrics.refusals == [("k", "rate_limited")] and [u for _, u in metrics.spent] == [0.01, 0.01]
    led.close()


class Unreachable:
    def __getattr__(self, name):
        raise AssertionError(f"the ledger was called ({name}) for a principal without limits")


@pytest.mark.parametrize(
    "principal",
    [
        None,
        Principal(None, frozenset({"route", "admin"}), None, None),  # auth: none
        Principal("k", frozenset({"route"}), None, None),  # a key without budget or rate limit
    ],
)
def test_gate_passes_principals_without_limits_with_no_ledger_call(tmp_path, principal):
    metrics = RecordingMetrics()
    gate = Gate(cfg_for(tmp_path), ledger=Unreachable(), metrics=metrics)

    async def main():
        t = await gate.admit(principal, 0.5)
        await t.settle(0.2)

    asyncio.run(main())
    assert [u for _, u in metrics.spent] == [0.2] and not metrics.refusals


def test_gate_fails_closed_when_the_ledger_is_unreachable(tmp_path):
    class Broken:
        def admit(self, *a):
            raise ConnectionError("actor died")

    gate = Gate(cfg_for(tmp_path), ledger=Broken(), metrics=RecordingMetrics())
    with pytest.raises(ApiError) as ei:
        asyncio.run(gate.admit(Principal("k", frozenset({"route"}), Budget(1.0, "day"), None), 0.1))
    assert ei.value.status == 503 and ei.value.code == "ledger_unavailable" and ei.value.retry_after_s == 1.0


def test_gate_rejects_a_non_finite_maximum(tmp_path):
    gate = Gate(cfg_for(tmp_path), ledger=Unreachable(), metrics=RecordingMetrics())
    with pytest.raises(ValueError, match="max_cost_usd"):
        asyncio.run(gate.admit(Principal("k", frozenset({"route"}), Budget(1.0, "day"), None), float("inf")))


# ---------------------------------------------------------------------------------------------------------
# "<N>s" periods (issue 12: demos and tests of pacing)
# ---------------------------------------------------------------------------------------------------------
def test_custom_periods_are_epoch_aligned_and_bad_ones_are_refused():
    assert period_bounds("300s", 1_000_000_123.4) == (1_000_000_200.0 - 300, 1_000_000_200.0)
    assert period_bounds("10s", 20.0) == (20.0, 30.0)  # a boundary starts a period
    assert period_bounds("86400s", T0) == period_bounds("day", T0)  # the same slices as the UTC day
    for bad, why in (("9s", "too short"), ("0s", "too short"), ("5m", "unknown"), ("s", "unknown"), ("-30s", "unknown")):
        with pytest.raises(ValueError, match=why):
            period_bounds(bad, T0)


def test_a_custom_period_budget_is_charged_and_rolls_over(ledger):
    t = 1_800_000_000.0  # a multiple of 300: a period starts here
    assert ledger.admit("r1", "k", 1.0, "300s", None, 0.8, now=t + 10)["ok"]
    ledger.settle("r1", 0.8, now=t + 20)
    out = ledger.admit("r2", "k", 1.0, "300s", None, 0.5, now=t + 30)
    assert out["code"] == "budget_exceeded" and out["retry_after_s"] == pytest.approx(270.0)
    assert "this 300 s period" in out["message"]
    assert ledger.usage("k", "300s", now=t + 299)["spent"] == pytest.approx(0.8)
    # the next 300 s period starts from zero; the calendar periods keep counting both
    nxt = ledger.admit("r3", "k", 1.0, "300s", None, 0.5, now=t + 300)
    assert nxt["ok"] and nxt["spent"] == 0.0 and nxt["period_start"] == t + 300 and nxt["period_end"] == t + 600
    ledger.settle("r3", 0.25, now=t + 301)
    assert ledger.usage("k", "300s", now=t + 301)["spent"] == pytest.approx(0.25)
    assert ledger.usage("k", "total", now=t + 301)["spent"] == pytest.approx(1.05)


def test_an_expired_reservation_is_charged_to_its_custom_period_too(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite", reservation_ttl_s=30.0)
    t = 1_800_000_000.0
    assert led.admit("r1", "k", 1.0, "600s", None, 0.4, now=t)["ok"]
    u = led.usage("k", "600s", now=t + 31)  # never settled: charged at its maximum, in its own period
    assert u["spent"] == pytest.approx(0.4) and u["reserved"] == 0.0
    led.close()


def test_ended_custom_periods_are_pruned_but_the_current_one_is_kept(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite", reservation_ttl_s=30.0)
    t = 1_800_000_000.0
    for i, at in enumerate((t, t + 400.0)):
        assert led.admit(f"r{i}", "k", 10.0, "20s", None, 0.1, now=at)["ok"]
        led.settle(f"r{i}", 0.1, now=at)
    rows = led.db.execute("SELECT start FROM totals WHERE period = '20s'").fetchall()
    assert rows == [(t + 400.0,)]  # the period that ended 380 s ago (> 2 TTLs) is gone
    assert led.usage("k", "20s", now=t + 401)["spent"] == pytest.approx(0.1)
    led.close()


# ---------------------------------------------------------------------------------------------------------
# a ledger file from before issue 12
# ---------------------------------------------------------------------------------------------------------
PREVIOUS_SCHEMA = """
CREATE TABLE totals (
    key_id TEXT NOT NULL, period TEXT NOT NULL, start REAL NOT NULL, usd REAL NOT NULL,
    PRIMARY KEY (key_id, period, start)
);
CREATE TABLE reservations (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, t REAL NOT NULL, max_usd REAL NOT NULL,
    expires REAL NOT NULL, state TEXT NOT NULL
);
CREATE INDEX reservations_key ON reservations (key_id, state, t);
CREATE INDEX reservations_expiry ON reservations (state, expires);
CREATE TABLE hits (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX hits_key ON hits (key_id, t);
"""
"""The ledger's schema as committed before issue 12 (63ee2a6), verbatim."""


def test_a_ledger_file_from_the_previous_schema_is_migrated_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript(PREVIOUS_SCHEMA)
    day = period_bounds("day", T0)[0]
    db.executemany(
        "INSERT INTO totals VALUES (?, ?, ?, ?)",
        [("k", p, period_bounds(p, T0)[0], 0.3) for p in ("hour", "day", "week", "month", "total")],
    )
    db.execute("INSERT INTO reservations VALUES ('old', 'k', ?, 0.2, ?, 'open')", (T0, T0 + 600))
    db.execute("INSERT INTO hits VALUES ('old', 'k', ?)", (T0,))
    db.commit()
    db.close()

    led = Ledger(path)
    cols = {row[1] for row in led.db.execute("PRAGMA table_info(reservations)")}
    assert {"period", "models"} <= cols
    assert led.db.execute("SELECT name FROM sqlite_master WHERE name = 'bin_starts'").fetchone()
    u = led.usage("k", "day", now=T0 + 1)  # the old rows read as before
    assert (u["spent"], u["reserved"], u["period_start"]) == (pytest.approx(0.3), pytest.approx(0.2), day)
    assert led.admit("old", "k", 1.0, "day", None, 0.2, now=T0 + 1)["ok"]  # idempotent on an old reservation id
    assert led.settle("old", 0.1, now=T0 + 2)["status"] == "settled"  # an old reservation (period NULL) settles
    assert led.usage("k", "total", now=T0 + 2)["spent"] == pytest.approx(0.4)
    assert led.admit("new", "k", 1.0, "300s", None, 0.2, now=T0 + 3)["ok"]  # the new columns are used
    assert led.db.execute("SELECT period FROM reservations WHERE id = 'new'").fetchone() == ("300s",)
    led.close()
    led = Ledger(path)  # opening a migrated file again changes nothing
    assert led.usage("k", "day", now=T0 + 3) == {
        "spent": pytest.approx(0.4),
        "reserved": pytest.approx(0.2),
        "period_start": day,
        "period_end": period_bounds("day", T0)[1],
    }
    led.close()
