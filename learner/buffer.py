"""The buffer's logic between serving and learning, Ray-free: the durable event log
(`learner/eventlog.py`) plus feedback validation and implicit signals.

It validates feedback against the decisions it holds (unknown id, a second different score,
NaN or out-of-range values are refused and counted) and turns a user's repeated prompt into a `retrial`
of their previous decision (cosine >= theta within T seconds); a decision with a user and no retrial within
T becomes `accepted`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from banditrouter.schemas import FeedbackEvent
from learner.eventlog import SQLiteEventLog


class FeedbackRefused(ValueError):
    """Feedback the policy must never see; `status` is the HTTP status the ingress answers."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


class EventBuffer:
    """Event log + feedback validation + retrial detection (the logic of the buffer actor, Ray-free)."""

    def __init__(self, path: str | Path, retrial_similarity: float = 0.9, retrial_window_s: float = 60.0):
        self.log = SQLiteEventLog(path)
        self.theta, self.window = retrial_similarity, retrial_window_s
        self.refused: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._last_by_user: dict[str, tuple[str, np.ndarray, float]] = {}
        self._awaiting_acceptance: dict[str, float] = {}  # decision_id -> time, for decisions with a user

    # -- decisions ------------------------------------------------------------------------------------------
    def append_decisions(self, events: list[dict[str, Any]]) -> int:
        new = self.log.append(events)
        self.counts["decision"] += new
        for e in events:
            self._track_user(e)
        return new

    def _track_user(self, e: dict[str, Any]) -> None:
        user, ctx = e.get("user"), e.get("context")
        if not user or ctx is None:
            return
        x, now = np.asarray(ctx, dtype=np.float32), float(e.get("time") or time.time())
        prev = self._last_by_user.get(user)
        if prev is not None:
            prev_id, prev_x, prev_t = prev
            if now - prev_t <= self.window and float(prev_x @ x) >= self.theta and self._awaiting_acceptance.pop(prev_id, None):
                self._append_outcome(FeedbackEvent(prev_id, "retrial", 0.0).to_dict())
        self._last_by_user[user] = (e["decision_id"], x, now)
        self._awaiting_acceptance[e["decision_id"]] = now

    def sweep(self, now: float | None = None) -> int:
        """Decisions with a user and no retrial within T count as accepted."""
        now = time.time() if now is None else now
        due = [d for d, t in self._awaiting_acceptance.items() if now - t > self.window]
        for d in due:
            del self._awaiting_acceptance[d]
            self._append_outcome(FeedbackEvent(d, "accepted", 1.0).to_dict())
        return len(due)

    def _append_outcome(self, event: dict[str, Any]) -> None:
        self.counts[event["kind"]] += self.log.append([event])

    # -- explicit feedback ----------------------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, message: str):
        self.refused[reason] += 1
        raise FeedbackRefused(status, reason, message)

    def add_feedback(self, decision_id: str, score: Any, event_id: str | None = None) -> dict[str, Any]:
        """Validate and append an explicit score. Idempotent: the same score again answers 'duplicate'."""
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            self._refuse(422, "not_finite", f"score must be a finite number in [0, 1], got {score!r}")
        if not 0.0 <= float(score) <= 1.0:
            self._refuse(422, "out_of_range", f"score must lie in [0, 1], got {score}")
        if not self.log.has_decision(decision_id):
            self._refuse(404, "unknown_decision", f"no decision {decision_id!r} (it may not have been routed here)")
        earlier = [v for k, v in self.log.outcomes(decision_id) if k == "explicit"]
        if earlier:
            if math.isclose(earlier[0], float(score), abs_tol=1e-12):
                self.refused["replay"] += 1
                return {"status": "duplicate", "decision_id": decision_id}
            self._refuse(409, "conflict", f"decision {decision_id!r} already has score {earlier[0]}; scores are final")
        ev = FeedbackEvent(decision_id, "explicit", float(score), **({"event_id": event_id} if event_id else {}))
        self._append_outcome(ev.to_dict())
        return {"status": "recorded", "decision_id": decision_id, "event_id": ev.event_id}

    def stats(self) -> dict[str, Any]:
        return {
            "last_seq": self.log.last_seq(),
            "events": dict(self.counts),
            "refused": dict(self.refused),
            "awaiting_acceptance": len(self._awaiting_acceptance),
            "path": str(self.log.path),
        }
