"""The buffer's logic between serving and learning, Ray-free: the durable event log
(`learner/eventlog.py`) plus feedback validation and implicit signals.

It validates feedback against the decisions it holds (a second different score, NaN or out-of-range values
are refused and counted) and turns a user's repeated prompt into a `retrial` of their previous decision
(cosine >= theta within T seconds); a decision with a user and no retrial within T becomes `accepted`.

Routers deliver decisions in the background (`deployments/delivery.py`), after answering, so feedback can
arrive before its decision. Such feedback is *held* (answered "held", HTTP 202) for `feedback_hold_s`: when
the decision arrives, the held score is validated and recorded exactly as if it had come after it; a hold
that expires is refused as `unknown_decision`. Holds are written to a small SQLite file next to the log
(`<log>.held.sqlite`), so a buffer restart does not lose feedback it already answered 202 for.

Every piece of in-memory state is bounded: the per-user retrial state and the decisions awaiting acceptance
are TTL caches (TTL = the retrial window, at most `max_tracked_users` entries), the holds one of at most
`max_held_feedback` entries with TTL `feedback_hold_s`.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cachetools import TTLCache

from banditrouter.schemas import FeedbackEvent
from learner.eventlog import SQLiteEventLog

ROUTER_OUTCOMES = ("error", "timeout")
"""Outcome events a router emits itself, right after the decision (the model call failed)."""


class FeedbackRefused(ValueError):
    """Feedback the policy must never see; `status` is the HTTP status the ingress answers."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


class ExpiringCache(TTLCache):
    """A wall-clock `TTLCache` that hands every item leaving it by age to `on_expire(key, value)` and every
    item pushed out by `maxsize` to `on_evict(key, value)`, so nothing it tracks disappears unaccounted.
    Expiry happens on any access and on `expire(now)` (the buffer's `sweep`)."""

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        on_expire: Callable[[Any, Any], None] | None = None,
        on_evict: Callable[[Any, Any], None] | None = None,
        timer: Callable[[], float] = time.time,
    ):
        super().__init__(maxsize, ttl, timer=timer)
        self._on_expire, self._on_evict = on_expire, on_evict

    def expire(self, time=None):
        expired = super().expire(time)
        if self._on_expire is not None:
            for key, value in expired:
                self._on_expire(key, value)
        return expired

    def popitem(self):
        key, value = super().popitem()
        if self._on_evict is not None:
            self._on_evict(key, value)
        return key, value


class _HeldStore:
    """The durable copy of held feedback: one row per decision id (SQLite, WAL), deleted when the hold is
    resolved or expires."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS held (decision_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, score REAL NOT NULL,"
            " received REAL NOT NULL)"
        )

    def put(self, decision_id: str, hold: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO held (decision_id, event_id, score, received) VALUES (?, ?, ?, ?)",
            (decision_id, hold["event_id"], hold["score"], hold["received"]),
        )

    def delete(self, decision_id: str) -> None:
        self.db.execute("DELETE FROM held WHERE decision_id = ?", (decision_id,))

    def load(self) -> list[tuple[str, dict[str, Any]]]:
        rows = self.db.execute("SELECT decision_id, event_id, score, received FROM held ORDER BY received")
        return [(d, {"event_id": e, "score": s, "received": r}) for d, e, s, r in rows.fetchall()]

    def close(self) -> None:
        self.db.close()


class EventBuffer:
    """Event log + feedback validation (with holds) + retrial detection: the buffer actor's logic, Ray-free."""

    def __init__(
        self,
        path: str | Path,
        retrial_similarity: float = 0.9,
        retrial_window_s: float = 60.0,
        *,
        feedback_hold_s: float = 30.0,
        max_held_feedback: int = 10_000,
        max_tracked_users: int = 100_000,
        clock: Callable[[], float] = time.time,
    ):
        """`clock` is the buffer's notion of now (wall time; a simulation or a soak passes its own)."""
        self.log = SQLiteEventLog(path)
        self.clock = clock
        self.theta, self.window, self.hold_s = retrial_similarity, retrial_window_s, feedback_hold_s
        self.refused: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        """Tracking state pushed out by the size bounds (no event is lost: these only miss an implicit label)."""
        self.holds: Counter[str] = Counter()
        """Feedback that came before its decision: held, released (recorded when it came), expired."""
        self._last_by_user: ExpiringCache = ExpiringCache(
            max_tracked_users, retrial_window_s, on_evict=lambda *_: self.dropped.update(["user_state"]), timer=clock
        )
        self._awaiting_acceptance: ExpiringCache = ExpiringCache(  # decision_id -> time, for decisions with a user
            max_tracked_users,
            retrial_window_s,
            on_expire=self._accept,
            on_evict=lambda *_: self.dropped.update(["awaiting_acceptance"]),
            timer=clock,
        )
        self._held_store = _HeldStore(self.log.path.with_name(self.log.path.name + ".held.sqlite"))
        self._held: ExpiringCache = ExpiringCache(max_held_feedback, feedback_hold_s, on_expire=self._hold_expired, timer=clock)
        self._restore_holds()

    # -- decisions ------------------------------------------------------------------------------------------
    def append_decisions(self, events: list[dict[str, Any]]) -> int:
        """Append what a router delivers: decisions and the `error` / `timeout` outcomes it observed itself.
        Delivery is at-least-once: a re-sent event is ignored by the log and not tracked again (so a re-sent
        decision is never a retrial of itself). Returns how many events were new."""
        decisions, outcomes, batch = [], [], set()
        for e in events:
            if e["event_id"] in batch:
                continue
            batch.add(e["event_id"])
            if e.get("kind", "decision") == "decision":
                if not self.log.has_decision(e["decision_id"]):
                    decisions.append(e)
            elif e["kind"] in ROUTER_OUTCOMES:
                outcomes.append(e)
            else:
                raise ValueError(f"routers deliver decisions and {ROUTER_OUTCOMES} outcomes, not {e['kind']!r}")
        new = self.log.append(decisions) if decisions else 0
        self.counts["decision"] += new
        for e in decisions:
            self._track_user(e)
        for e in outcomes:
            new += self._append_outcome(e)
        for e in decisions:
            self._release_hold(e["decision_id"])
        return new

    def _track_user(self, e: dict[str, Any]) -> None:
        user, ctx = e.get("user"), e.get("context")
        if not user or ctx is None or e.get("outcome", "ok") != "ok":
            return  # a failed call is labelled by its own outcome event: never `accepted`
        x, now = np.asarray(ctx, dtype=np.float32), float(e.get("time") or self.clock())
        prev = self._last_by_user.get(user)
        if prev is not None:
            prev_id, prev_x, prev_t = prev
            if (
                now - prev_t <= self.window
                and float(prev_x @ x) >= self.theta
                and self._awaiting_acceptance.pop(prev_id, None) is not None
            ):
                self._append_outcome(FeedbackEvent(prev_id, "retrial", 0.0).to_dict())
        self._last_by_user[user] = (e["decision_id"], x, now)
        self._awaiting_acceptance[e["decision_id"]] = now

    def _accept(self, decision_id: str, _t: float) -> None:
        self._append_outcome(FeedbackEvent(decision_id, "accepted", 1.0).to_dict())

    def sweep(self, now: float | None = None) -> int:
        """Decisions with a user and no retrial within T count as accepted; expired holds are refused as
        unknown_decision. Returns how many decisions were accepted."""
        now = self.clock() if now is None else now
        self._held.expire(now)
        self._last_by_user.expire(now)
        return len(self._awaiting_acceptance.expire(now))

    def _append_outcome(self, event: dict[str, Any]) -> int:
        new = self.log.append([event])
        self.counts[event["kind"]] += new
        return new

    # -- explicit feedback ----------------------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, message: str):
        self.refused[reason] += 1
        raise FeedbackRefused(status, reason, message)

    def add_feedback(self, decision_id: str, score: Any, event_id: str | None = None) -> dict[str, Any]:
        """Validate and append an explicit score. Idempotent: the same score again answers 'duplicate'.
        Feedback for a decision not in the log yet is held (status 'held') until it arrives."""
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            self._refuse(422, "not_finite", f"score must be a finite number in [0, 1], got {score!r}")
        if not 0.0 <= float(score) <= 1.0:
            self._refuse(422, "out_of_range", f"score must lie in [0, 1], got {score}")
        if not self.log.has_decision(decision_id):
            return self._hold(decision_id, float(score), event_id)
        return self._record(decision_id, float(score), event_id)

    def _record(self, decision_id: str, score: float, event_id: str | None, at: float | None = None) -> dict[str, Any]:
        """`at`: when the feedback reached the buffer (a released hold's own time, so staleness counts the hold)."""
        earlier = [v for k, v in self.log.outcomes(decision_id) if k == "explicit"]
        if earlier:
            if math.isclose(earlier[0], score, abs_tol=1e-12):
                self.refused["replay"] += 1
                return {"status": "duplicate", "decision_id": decision_id}
            self._refuse(409, "conflict", f"decision {decision_id!r} already has score {earlier[0]}; scores are final")
        ev = FeedbackEvent(
            decision_id, "explicit", score, **({"event_id": event_id} if event_id else {}), **({"time": at} if at else {})
        )
        self._append_outcome(ev.to_dict())
        return {"status": "recorded", "decision_id": decision_id, "event_id": ev.event_id}

    # -- holds: feedback that came before its decision --------------------------------------------------------
    def _hold(self, decision_id: str, score: float, event_id: str | None) -> dict[str, Any]:
        unknown = f"no decision {decision_id!r} (it may not have been routed here)"
        if self.hold_s <= 0:
            self._refuse(404, "unknown_decision", unknown)
        held = self._held.get(decision_id)
        if held is not None:  # the same rules as for a recorded score: the same again is a replay, another a conflict
            if math.isclose(held["score"], score, abs_tol=1e-12):
                self.refused["replay"] += 1
                return self._held_answer(decision_id, held)
            self._refuse(409, "conflict", f"decision {decision_id!r} already has score {held['score']} (held); scores are final")
        if len(self._held) >= self._held.maxsize:
            self._refuse(404, "unknown_decision", unknown + f"; {self._held.maxsize} feedbacks already wait for theirs")
        hold = {"event_id": event_id or FeedbackEvent(decision_id, "explicit").event_id, "score": score, "received": self.clock()}
        self._held_store.put(decision_id, hold)
        self._held[decision_id] = hold
        self.holds["held"] += 1
        return self._held_answer(decision_id, hold)

    def _held_answer(self, decision_id: str, hold: dict[str, Any]) -> dict[str, Any]:
        return {"status": "held", "decision_id": decision_id, "event_id": hold["event_id"], "hold_s": self.hold_s}

    def _release_hold(self, decision_id: str) -> None:
        hold = self._held.get(decision_id)
        if hold is None:
            return
        try:
            self._record(decision_id, hold["score"], hold["event_id"], at=hold["received"])
        except FeedbackRefused:
            pass  # counted by _refuse, as it would have been had the feedback come after the decision
        # forgotten only once recorded: if the append failed, the hold (and its durable row) stays
        self._held.pop(decision_id, None)
        self._held_store.delete(decision_id)
        self.holds["released"] += 1

    def _hold_expired(self, decision_id: str, _hold: dict[str, Any]) -> None:
        self.refused["unknown_decision"] += 1
        self.holds["expired"] += 1
        self._held_store.delete(decision_id)

    def _restore_holds(self) -> None:
        """After a restart: holds whose decision arrived meanwhile are recorded, the others wait again for a
        full window (the buffer was down: their decisions may still be on their way)."""
        for decision_id, hold in self._held_store.load():
            if self.log.has_decision(decision_id):
                self._held[decision_id] = hold
                self._release_hold(decision_id)
            else:
                self._held[decision_id] = hold

    def stats(self) -> dict[str, Any]:
        return {
            "last_seq": self.log.last_seq(),
            "events": dict(self.counts),
            "refused": dict(self.refused),
            "awaiting_acceptance": len(self._awaiting_acceptance),
            "held_feedback": len(self._held),
            "holds": dict(self.holds),
            "tracked_users": len(self._last_by_user),
            "dropped": dict(self.dropped),
            "path": str(self.log.path),
        }

    def close(self) -> None:
        self._held_store.close()
        self.log.close()
