"""The durable buffer without Ray: the append-only event log, feedback validation and retrial detection."""

from __future__ import annotations

import time

import pytest
from factories import decision

from banditrouter.schemas import FeedbackEvent
from learner.buffer import EventBuffer, FeedbackRefused
from learner.eventlog import SQLiteEventLog


def test_log_is_append_only_ordered_and_idempotent(tmp_path):
    log = SQLiteEventLog(tmp_path / "events.sqlite")
    a, b = FeedbackEvent("x", "explicit", 0.5).to_dict(), FeedbackEvent("y", "explicit", 1.0).to_dict()
    assert log.append([a, b]) == 2
    assert log.append([a]) == 0  # at-least-once delivery: a re-sent event is ignored
    assert [e["event_id"] for _, e in log.read(0)] == [a["event_id"], b["event_id"]]
    assert log.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    log.close()
    assert SQLiteEventLog(tmp_path / "events.sqlite").last_seq() == 2  # durable


def test_feedback_validation_refuses_and_counts(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite")
    buf.append_decisions([decision(0, rng)])
    cases = [(float("nan"), 422, "not_finite"), (1.5, 422, "out_of_range"), (-0.1, 422, "out_of_range"), ("1", 422, "not_finite")]
    for score, status, reason in cases:
        with pytest.raises(FeedbackRefused) as e:
            buf.add_feedback("d0", score)
        assert (e.value.status, e.value.reason) == (status, reason)
    assert buf.add_feedback("nope", 0.5)["status"] == "held"  # its decision may still be on its way (below)
    assert buf.add_feedback("d0", 0.8)["status"] == "recorded"
    assert buf.add_feedback("d0", 0.8)["status"] == "duplicate"  # idempotent
    with pytest.raises(FeedbackRefused) as e:
        buf.add_feedback("d0", 0.2)
    assert e.value.status == 409
    assert buf.stats()["refused"] == {"not_finite": 2, "out_of_range": 2, "replay": 1, "conflict": 1}
    assert [e["kind"] for _, e in buf.log.read(0)] == ["decision", "explicit"]  # nothing bad reached the log


def test_unknown_decision_is_404_without_a_hold_window(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite", feedback_hold_s=0)
    with pytest.raises(FeedbackRefused) as e:
        buf.add_feedback("nope", 0.5)
    assert (e.value.status, e.value.reason) == (404, "unknown_decision")
    full = EventBuffer(tmp_path / "f.sqlite", max_held_feedback=2)
    assert [full.add_feedback(f"x{i}", 0.5)["status"] for i in range(2)] == ["held", "held"]
    with pytest.raises(FeedbackRefused) as e:  # the hold is bounded: beyond it, unknown ids are refused
        full.add_feedback("x2", 0.5)
    assert e.value.status == 404 and full.stats()["refused"] == {"unknown_decision": 1}


def test_feedback_before_its_decision_is_held_then_recorded(tmp_path, rng):
    """A router answers before its decision reaches the buffer, so feedback can come first: it is held, and
    recorded (same event id, same validation) when the decision arrives."""
    now = [1000.0]
    buf = EventBuffer(tmp_path / "e.sqlite", feedback_hold_s=30, clock=lambda: now[0])
    out = buf.add_feedback("d0", 0.8, event_id="fb-0")
    now[0] = 1005.0  # the decision comes 5 s later
    assert out["status"] == "held" and out["event_id"] == "fb-0"
    assert buf.add_feedback("d0", 0.8)["status"] == "held"  # the same again: idempotent (counted as a replay)
    with pytest.raises(FeedbackRefused) as e:  # another score: scores are final, held or not
        buf.add_feedback("d0", 0.1)
    assert e.value.status == 409
    assert buf.log.read(0) == []
    buf.append_decisions([decision(0, rng)])
    rows = [e for _, e in buf.log.read(0)]
    assert [(e["kind"], e["event_id"]) for e in rows[1:]] == [("explicit", "fb-0")] and rows[1]["value"] == 0.8
    assert rows[1]["time"] == 1000.0  # when the feedback came, not when it was released: staleness counts the hold
    assert buf.add_feedback("d0", 0.8)["status"] == "duplicate"
    st = buf.stats()
    assert st["held_feedback"] == 0 and st["holds"] == {"held": 1, "released": 1}
    assert st["refused"] == {"replay": 2, "conflict": 1}


def test_expired_hold_is_refused_as_unknown_decision(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite", feedback_hold_s=5)
    t0 = time.time()
    assert buf.add_feedback("d0", 0.8)["status"] == "held"
    buf.sweep(now=t0 + 2)
    assert buf.stats()["held_feedback"] == 1 and "unknown_decision" not in buf.stats()["refused"]
    buf.sweep(now=t0 + 6)
    assert buf.stats()["refused"] == {"unknown_decision": 1} and buf.stats()["holds"]["expired"] == 1
    buf.append_decisions([decision(0, rng)])  # too late: the feedback is gone, as a 404 would have said
    assert [e["kind"] for _, e in buf.log.read(0)] == ["decision"]
    buf.close()
    assert EventBuffer(tmp_path / "e.sqlite").stats()["held_feedback"] == 0  # and it does not come back


def test_held_feedback_survives_a_buffer_restart(tmp_path, rng):
    """The ingress answered 202 for it: a buffer crash before the decision arrives must not lose it."""
    buf = EventBuffer(tmp_path / "e.sqlite")
    buf.add_feedback("d0", 0.3, event_id="fb-0")
    buf.add_feedback("d1", 0.6, event_id="fb-1")
    del buf  # crash
    again = EventBuffer(tmp_path / "e.sqlite")
    assert again.stats()["held_feedback"] == 2
    again.append_decisions([decision(0, rng), decision(1, rng)])
    explicit = {e["event_id"]: e["value"] for _, e in again.log.read(0) if e["kind"] == "explicit"}
    assert explicit == {"fb-0": 0.3, "fb-1": 0.6}
    again.close()
    third = EventBuffer(tmp_path / "e.sqlite")  # resolved holds are gone from the durable store too
    assert third.stats()["held_feedback"] == 0 and len(third.log.read(0)) == 4


def test_redelivered_decision_is_counted_once_and_not_a_retrial_of_itself(tmp_path, rng):
    """Routers deliver at least once: the same decision twice must not be logged, counted or labelled twice."""
    buf = EventBuffer(tmp_path / "e.sqlite", retrial_similarity=0.9, retrial_window_s=30)
    d = decision(0, rng, user="u")
    assert buf.append_decisions([d]) == 1
    assert buf.append_decisions([d]) == 0
    assert buf.append_decisions([d, d]) == 0
    assert [e["kind"] for _, e in buf.log.read(0)] == ["decision"]
    assert buf.stats()["events"] == {"decision": 1}


def test_router_outcomes_are_logged_and_never_accepted(tmp_path, rng):
    """A failed model call arrives as a decision with outcome error/timeout plus its outcome event; it is
    not tracked for retrial/acceptance (an `accepted` label would say the failure satisfied the user)."""
    buf = EventBuffer(tmp_path / "e.sqlite", retrial_window_s=30)
    failed = {**decision(0, rng, user="u"), "outcome": "timeout", "cost_usd": 0.0}
    outcome = FeedbackEvent("d0", "timeout", 0.0).to_dict()
    assert buf.append_decisions([failed, outcome]) == 2
    assert buf.append_decisions([failed, outcome]) == 0  # re-delivered
    assert buf.sweep(now=failed["time"] + 31) == 0
    assert [e["kind"] for _, e in buf.log.read(0)] == ["decision", "timeout"]
    with pytest.raises(ValueError, match="explicit"):  # explicit feedback goes through add_feedback, validated
        buf.append_decisions([FeedbackEvent("d0", "explicit", 1.0).to_dict()])


def test_user_state_is_bounded(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite", retrial_window_s=30, max_tracked_users=10, retrial_grace_s=0)
    buf.append_decisions([decision(i, rng, user=f"u{i}") for i in range(50)])
    st = buf.stats()
    assert st["tracked_users"] == 10 and st["awaiting_acceptance"] == 10
    assert st["dropped"] == {"user_state": 40, "awaiting_acceptance": 40}
    assert st["events"] == {"decision": 50}  # every decision is logged; only their implicit labels are lost
    t = time.time()
    assert buf.sweep(now=t + 31) == 10  # and the state empties after the window
    assert buf.stats()["tracked_users"] == 0 and buf.stats()["awaiting_acceptance"] == 0


def test_retrial_and_acceptance(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite", retrial_similarity=0.9, retrial_window_s=30, retrial_grace_s=0)
    x = rng.normal(size=8)
    first = decision(0, rng, user="u", context=x)
    buf.append_decisions([first])
    again = decision(1, rng, user="u", context=x + 0.01 * rng.normal(size=8))  # same question, reworded
    again["time"] = first["time"] + first["latency_s"] + 1.0  # sent once the first answer was out
    buf.append_decisions([again])
    other = decision(2, rng, user="v", context=x)  # another user: not a retrial of u's
    buf.append_decisions([other])
    kinds = [(e["kind"], e["decision_id"]) for _, e in buf.log.read(0)]
    assert ("retrial", "d0") in kinds and ("retrial", "d1") not in kinds
    assert buf.sweep(now=first["time"] + 10) == 0
    assert buf.sweep(now=first["time"] + 31) == 2  # d1 and d2 had no retrial within T
    accepted = {e["decision_id"] for _, e in buf.log.read(0) if e["kind"] == "accepted"}
    assert accepted == {"d1", "d2"}
