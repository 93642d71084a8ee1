"""The buffer's logic between serving and learning, Ray-free: the durable event log
(`learner/eventlog.py`) plus feedback validation and implicit signals.

It validates feedback against the decisions it holds (a second different score, NaN or out-of-range values
are refused and counted) and reads each user's next request as an implicit label of their previous decision
(ARCHITECTURE.md "Implicit signals"; the rules, ours, are in `EventBuffer._label_previous`):

- the previous call failed (outcome error/timeout): it is labelled by its own outcome event; the new request
  retries it, so no older decision is labelled;
- the new request carries the previous answer as an assistant turn (continuation) -> previous `accepted` (1);
- same latest user turn (same normalised text, or cosine >= theta of the latest-turn embeddings), previous
  answer absent, decided within T of the previous answer's delivery (decision time + latency) -> `retrial` (0);
- anything else (a new question, or a request after T) -> `accepted` (1); no request within T -> `accepted`
  when the decision's tracking expires, T + grace after it reached the buffer (`sweep`).
Implicit labels have the event id `<decision_id>:implicit`, so a decision gets at most one, whatever is
re-delivered or replayed. A decision older than the user's tracked one (out of order), decided before the
previous answer was delivered (concurrent), or re-delivered labels nothing; each case is counted in
`stats()["implicit"]`. After a restart the tracking state is rebuilt from the log's last 2(T + grace) seconds.

Routers deliver decisions in the background (`deployments/delivery.py`), after answering, so feedback can
arrive before its decision. Such feedback is *held* (answered "held", HTTP 202) for `feedback_hold_s`: when
the decision arrives, the held score is validated and recorded exactly as if it had come after it; a hold
that expires is refused as `unknown_decision`. Holds are written to a small SQLite file next to the log
(`<log>.held.sqlite`), so a buffer restart does not lose feedback it already answered 202 for.

Only the API key that made a decision (`DecisionEvent.key_id`) may score it, and only for the same `user` when
the decision had one: anything else is refused `not_owner` (403) and counted, also for held feedback, checked
when its decision arrives. A decision made with auth off (no key id) takes feedback from any key.

Every piece of in-memory state is bounded: the per-user retrial state and the decisions awaiting acceptance
are TTL caches (TTL = the retrial window + grace, at most `max_tracked_users` entries), the holds one of at most
`max_held_feedback` entries with TTL `feedback_hold_s`.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cachetools import TTLCache

from banditrouter.schemas import FeedbackEvent
from learner.eventlog import SQLiteEventLog

ROUTER_OUTCOMES = ("error", "timeout")
"""Outcome events a router emits itself, right after the decision (the model call failed)."""


def implicit_event_id(decision_id: str) -> str:
    """The one event id a decision's implicit label (retrial or accepted) can have."""
    return f"{decision_id}:implicit"


@dataclass(frozen=True)
class _Tracked:
    """A user's latest decision, as the next request is compared with it."""

    decision_id: str
    time: float
    """When it was decided."""
    requested: float
    """When the user sent it: `requested_at`, else `time`."""
    delivered: float
    """When the user had its answer (or its failure): `answered_at`, else `time + latency_s`."""
    failed: bool
    turn_ref: str | None
    turn_x: np.ndarray | None
    """The latest user turn's embedding, unit norm (None when the event had none)."""
    answer_ref: str | None
    history_refs: frozenset[str]

    @classmethod
    def of(cls, e: dict[str, Any], now: float) -> _Tracked:
        t = e.get("time")
        t = float(t) if isinstance(t, int | float) and math.isfinite(t) else now
        lat = e.get("latency_s")
        lat = float(lat) if isinstance(lat, int | float) and math.isfinite(lat) and lat > 0 else 0.0
        ctx = e.get("turn_context")
        if ctx is None:
            ctx = e.get("context")
        x = None
        if ctx is not None:
            x = np.asarray(ctx, dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(x))
            x = x / norm if norm > 0 and math.isfinite(norm) else None

        def stamp(key: str, default: float) -> float:
            v = e.get(key)
            return float(v) if isinstance(v, int | float) and math.isfinite(v) else default

        return cls(
            decision_id=e["decision_id"],
            time=t,
            requested=stamp("requested_at", t),
            delivered=stamp("answered_at", t + lat),
            failed=e.get("outcome", "ok") != "ok",
            turn_ref=e.get("turn_ref"),
            turn_x=x,
            answer_ref=e.get("answer_ref"),
            history_refs=frozenset(e.get("history_refs") or ()),
        )


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
            " received REAL NOT NULL, key_id TEXT, user TEXT)"
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(held)")}
        for col in ("key_id", "user"):  # a hold file written before feedback ownership existed
            if col not in columns:
                self.db.execute(f"ALTER TABLE held ADD COLUMN {col} TEXT")

    def put(self, decision_id: str, hold: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO held (decision_id, event_id, score, received, key_id, user) VALUES (?, ?, ?, ?, ?, ?)",
            (decision_id, hold["event_id"], hold["score"], hold["received"], hold.get("key_id"), hold.get("user")),
        )

    def delete(self, decision_id: str) -> None:
        self.db.execute("DELETE FROM held WHERE decision_id = ?", (decision_id,))

    def load(self) -> list[tuple[str, dict[str, Any]]]:
        rows = self.db.execute("SELECT decision_id, event_id, score, received, key_id, user FROM held ORDER BY received")
        return [(d, {"event_id": e, "score": s, "received": r, "key_id": k, "user": u}) for d, e, s, r, k, u in rows.fetchall()]

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
        retrial_grace_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        """`clock` is the buffer's notion of now (wall time; a simulation or a soak passes its own).
        `retrial_grace_s`: a decision is tracked (and accepted for want of a next request) T + grace after it
        reached the buffer, because routers log a decision once it is answered: the next request, decided
        within T, reaches the buffer up to its own latency (and the delivery delay) later."""
        if not (0 < retrial_window_s < math.inf and 0 <= retrial_grace_s < math.inf):
            raise ValueError(f"need retrial_window_s > 0 and retrial_grace_s >= 0, got {retrial_window_s}, {retrial_grace_s}")
        self.log = SQLiteEventLog(path)
        self.clock = clock
        self._replay_at: float | None = None  # while rebuilding: the time a replayed decision arrived
        self.theta, self.window, self.hold_s = retrial_similarity, retrial_window_s, feedback_hold_s
        self.tracked_s = retrial_window_s + retrial_grace_s
        self.refused: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        """Tracking state pushed out by the size bounds (no event is lost: these only miss an implicit label)."""
        self.holds: Counter[str] = Counter()
        """Feedback that came before its decision: held, released (recorded when it came), expired."""
        self.implicit: Counter[str] = Counter()
        """Which rule each user's next request met (continuation, retrial, new_question, late, after_failure,
        concurrent), decisions accepted for want of a next request (no_request), and requests that label
        nothing (out_of_order, duplicate); `rebuilt`: decisions replayed from the log after a restart."""
        self._last_by_user: ExpiringCache = ExpiringCache(  # user -> _Tracked (their latest decision)
            max_tracked_users, self.tracked_s, on_evict=lambda *_: self.dropped.update(["user_state"]), timer=self._now
        )
        self._awaiting_acceptance: ExpiringCache = ExpiringCache(  # decision_id -> decision time, for answered ones
            max_tracked_users,
            self.tracked_s,
            on_expire=self._accept,
            on_evict=lambda *_: self.dropped.update(["awaiting_acceptance"]),
            timer=self._now,
        )
        self._held_store = _HeldStore(self.log.path.with_name(self.log.path.name + ".held.sqlite"))
        self._held: ExpiringCache = ExpiringCache(max_held_feedback, feedback_hold_s, on_expire=self._hold_expired, timer=clock)
        self._restore_holds()
        self._rebuild_tracking()

    def _now(self) -> float:
        return self._replay_at if self._replay_at is not None else self.clock()

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

    # -- implicit signals: what a user's next request says about their previous decision ------------------------
    def _track_user(self, e: dict[str, Any]) -> None:
        """Label the user's previous decision from this one (`_label_previous`), then track this one as the
        user's latest. Failed decisions are tracked too (a retry of one is charged to it, not to an older
        decision) but never await acceptance: their own error/timeout event labels them."""
        user = e.get("user")
        if not user:
            return
        cur = _Tracked.of(e, self._now())
        prev = self._last_by_user.get(user)
        if prev is not None:
            if prev.decision_id == cur.decision_id:  # re-delivered: never a retrial of itself
                self.implicit["duplicate"] += 1
                return
            if cur.time < prev.time:  # arrived after a later decision of the same user: it labels nothing
                self.implicit["out_of_order"] += 1
                return
            self._label_previous(prev, cur)
        self._last_by_user[user] = cur
        if not cur.failed:
            self._awaiting_acceptance[cur.decision_id] = cur.time

    def _label_previous(self, prev: _Tracked, cur: _Tracked) -> None:
        """The rules [ours; module docstring], in order."""
        if prev.failed:  # labelled by its own outcome event; `cur` retries it (or moves on): charge nobody else
            self.implicit["after_failure"] += 1
            return
        gap = cur.requested - prev.delivered
        if gap < 0:  # decided before the previous answer was out: not a reaction to it (e.g. a double submit)
            self.implicit["concurrent"] += 1
            return
        if prev.answer_ref is not None and prev.answer_ref in cur.history_refs:
            rule, kind = "continuation", "accepted"
        elif gap > self.window:
            rule, kind = "late", "accepted"
        elif self._same_turn(prev, cur):
            rule, kind = "retrial", "retrial"
        else:
            rule, kind = "new_question", "accepted"
        self.implicit[rule] += 1
        self._awaiting_acceptance.pop(prev.decision_id, None)
        self._label(prev.decision_id, kind)

    def _same_turn(self, prev: _Tracked, cur: _Tracked) -> bool:
        if prev.turn_ref is not None and prev.turn_ref == cur.turn_ref:
            return True
        if prev.turn_x is None or cur.turn_x is None or prev.turn_x.shape != cur.turn_x.shape:
            return False
        return float(prev.turn_x @ cur.turn_x) >= self.theta

    def _label(self, decision_id: str, kind: str) -> int:
        """Append the decision's one implicit label (a second one, of any kind, is ignored by the log)."""
        value = 0.0 if kind == "retrial" else 1.0
        return self._append_outcome(
            FeedbackEvent(decision_id, kind, value, self._now(), implicit_event_id(decision_id)).to_dict()
        )

    def _accept(self, decision_id: str, _t: float) -> None:
        if self._label(decision_id, "accepted"):  # not when a rebuild re-tracked an already labelled decision
            self.implicit["no_request"] += 1

    def _rebuild_tracking(self) -> None:
        """After a restart: replay the decisions received within 2(T + grace) of the log's last event (once:
        what was still tracked; twice: decisions whose acceptance fell due just before the crash, before a sweep)
        in log order, at the times they arrived, through the same tracking. Labels the buffer wrote before it
        went down come out the same and are ignored (deterministic ids); labels it had not written yet are
        written; decisions whose T has passed since are accepted by the closing sweep."""
        # the constructor runs before anyone else holds this log: read it directly, newest first, and stop
        # at the edge (seq order is arrival order)
        rows, last = [], None
        for received, kind, body in self.log.db.execute("SELECT received, kind, body FROM events ORDER BY seq DESC"):
            if last is None:
                last = received
            if received < last - 2 * self.tracked_s:
                break
            if kind == "decision":
                rows.append((received, body))
        if not rows:
            return
        offset = self.clock() - time.time()  # `received` is wall time; the buffer's clock may be another
        try:
            for received, body in reversed(rows):
                e = json.loads(body)
                if e.get("user"):
                    self._replay_at = max(received + offset, self._replay_at or -math.inf)
                    self._track_user(e)
                    self.implicit["rebuilt"] += 1
        finally:
            self._replay_at = None
        self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Answered decisions with a user whose user sent nothing within T (+ grace) are accepted; expired
        holds are refused as unknown_decision. Returns how many decisions left the acceptance wait."""
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

    def add_feedback(
        self,
        decision_id: str,
        score: Any,
        event_id: str | None = None,
        key_id: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Validate and append an explicit score. Idempotent: the same score again answers 'duplicate'.
        Feedback for a decision not in the log yet is held (status 'held') until it arrives. `key_id` / `user`:
        who sends it; only the decision's own key (and user, when it had one) may score it (else 403 not_owner)."""
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            self._refuse(422, "not_finite", f"score must be a finite number in [0, 1], got {score!r}")
        if not 0.0 <= float(score) <= 1.0:
            self._refuse(422, "out_of_range", f"score must lie in [0, 1], got {score}")
        owner = self._owner(decision_id)
        if owner is None:
            return self._hold(decision_id, float(score), event_id, key_id, user)
        return self._record(decision_id, float(score), event_id, key_id=key_id, user=user, owner=owner)

    def _owner(self, decision_id: str) -> tuple[str | None, str | None] | None:
        """(key_id, user) of the logged decision, or None when the log does not hold it. The buffer is the
        log's one user, in one thread (the actor), like `_rebuild_tracking`'s direct read."""
        row = self.log.db.execute(
            "SELECT json_extract(body, '$.key_id'), json_extract(body, '$.user') FROM events"
            " WHERE decision_id = ? AND kind = 'decision' LIMIT 1",
            (decision_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def _check_owner(self, decision_id: str, owner: tuple[str | None, str | None], key_id: str | None, user: str | None):
        """Refuses (403 not_owner, counted) feedback from another key, or for another user; the message names
        neither the decision's key nor its user."""
        owner_key, owner_user = owner
        if owner_key is not None and key_id != owner_key:
            self._refuse(403, "not_owner", f"decision {decision_id!r} was made with another API key; only that key may score it")
        if owner_user and user != owner_user:
            self._refuse(
                403,
                "not_owner",
                f"decision {decision_id!r} was made for another user; send the request's own `user` with the feedback",
            )

    def _record(
        self,
        decision_id: str,
        score: float,
        event_id: str | None,
        at: float | None = None,
        *,
        key_id: str | None = None,
        user: str | None = None,
        owner: tuple[str | None, str | None] | None = None,
    ) -> dict[str, Any]:
        """`at`: when the feedback reached the buffer (a released hold's own time, so staleness counts the hold).
        `owner`: the decision's (key_id, user) when the caller already read it."""
        self._check_owner(decision_id, owner if owner is not None else self._owner(decision_id) or (None, None), key_id, user)
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
    def _hold(
        self, decision_id: str, score: float, event_id: str | None, key_id: str | None = None, user: str | None = None
    ) -> dict[str, Any]:
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
        hold = {
            "event_id": event_id or FeedbackEvent(decision_id, "explicit").event_id,
            "score": score,
            "received": self.clock(),
            "key_id": key_id,
            "user": user,
        }
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
            self._record(
                decision_id,
                hold["score"],
                hold["event_id"],
                at=hold["received"],
                key_id=hold.get("key_id"),
                user=hold.get("user"),
            )
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
            "implicit": dict(self.implicit),
            "dropped": dict(self.dropped),
            "path": str(self.log.path),
        }

    def close(self) -> None:
        self._held_store.close()
        self.log.close()
