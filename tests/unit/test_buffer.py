"""The durable buffer without Ray: the append-only event log, feedback validation and retrial detection."""

from __future__ import annotations

import numpy as np
import pytest

from banditrouter.schemas import DecisionEvent, FeedbackEvent
from learner.buffer import EventBuffer, FeedbackRefused
from learner.eventlog import SQLiteEventLog

MODELS = ("cheap", "strong")


def decision(i: int, rng, user: str | None = None, context=None, model: str | None = None) -> dict:
    x = context if context is not None else rng.normal(size=8)
    x = x / np.linalg.norm(x)
    m = model or MODELS[i % 2]
    return DecisionEvent(
        decision_id=f"d{i}",
        request_id=f"r{i}",
        model=m,
        arm=MODELS.index(m),
        propensity=0.5,
        policy="linucb",
        policy_version=0,
        preference=(0.7, 0.3),
        context=[float(v) for v in x],
        context_ref=None,
        cost_usd=0.001 if m == "cheap" else 0.01,
        latency_s=0.1,
        pool_version="p",
        user=user,
    ).to_dict()


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
    with pytest.raises(FeedbackRefused) as e:
        buf.add_feedback("nope", 0.5)
    assert e.value.status == 404
    assert buf.add_feedback("d0", 0.8)["status"] == "recorded"
    assert buf.add_feedback("d0", 0.8)["status"] == "duplicate"  # idempotent
    with pytest.raises(FeedbackRefused) as e:
        buf.add_feedback("d0", 0.2)
    assert e.value.status == 409
    assert buf.stats()["refused"] == {"not_finite": 2, "out_of_range": 2, "unknown_decision": 1, "replay": 1, "conflict": 1}
    assert [e["kind"] for _, e in buf.log.read(0)] == ["decision", "explicit"]  # nothing bad reached the log


def test_retrial_and_acceptance(tmp_path, rng):
    buf = EventBuffer(tmp_path / "e.sqlite", retrial_similarity=0.9, retrial_window_s=30)
    x = rng.normal(size=8)
    first = decision(0, rng, user="u", context=x)
    buf.append_decisions([first])
    again = decision(1, rng, user="u", context=x + 0.01 * rng.normal(size=8))  # same question, reworded
    buf.append_decisions([again])
    other = decision(2, rng, user="v", context=x)  # another user: not a retrial of u's
    buf.append_decisions([other])
    kinds = [(e["kind"], e["decision_id"]) for _, e in buf.log.read(0)]
    assert ("retrial", "d0") in kinds and ("retrial", "d1") not in kinds
    assert buf.sweep(now=first["time"] + 10) == 0
    assert buf.sweep(now=first["time"] + 31) == 2  # d1 and d2 had no retrial within T
    accepted = {e["decision_id"] for _, e in buf.log.read(0) if e["kind"] == "accepted"}
    assert accepted == {"d1", "d2"}
