"""The durable event log between serving and learning.

`EventLog` is the small interface; `SQLiteEventLog` the embedded default: an append-only SQLite table in
WAL mode, one row per event, ordered by `seq`, unique by `event_id` (a re-sent event is ignored, so
delivery can be at-least-once). The buffer actor (`learner/buffer.py`, `learner/actors.py`) owns the file:
routers and the ingress reach the actor, not the file, so it works across a Ray cluster.

What a reader may rely on:
- `seq` only grows within one log: it is AUTOINCREMENT, so a deleted (compacted) row's seq is never given
  to another event. A consumer's offset (the last seq it consumed) stays valid across compaction.
- Every log has an identity, `log_id()`: a random id written in the `meta` table when the file is created.
  A log replaced by a fresh file has another id. With `synchronous=NORMAL` a power loss can take the last
  committed transactions (the tail, and with it the AUTOINCREMENT counter, so later events reuse those
  seqs): the id survives, so a consumer must also check that the event at its offset is the one it
  consumed (`learner.core.Learner.restore` does both and re-reads by event id on a mismatch).
- `compact` deletes a prefix of the log (consumed and old), never the row at `below_seq` or after it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol


class EventLog(Protocol):
    def append(self, events: list[dict[str, Any]]) -> int:
        """Append events (dicts with `event_id` and `kind`); returns how many were new."""
        ...

    def read(self, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Events with seq > after, oldest first, at most `limit`."""
        ...

    def last_seq(self) -> int: ...

    def log_id(self) -> str:
        """This log's identity (fixed at creation)."""
        ...


class SQLiteEventLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (WAL); fsync at checkpoints
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL,"
                " kind TEXT NOT NULL, decision_id TEXT, received REAL NOT NULL, body TEXT NOT NULL)"
            )
            self.db.execute("CREATE INDEX IF NOT EXISTS events_decision ON events (decision_id, kind)")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('log_id', ?)", (uuid.uuid4().hex,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._log_id = self.db.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0]

    def log_id(self) -> str:
        """Random id written when the file was created: a replaced log has another one."""
        return self._log_id

    def append(self, events: list[dict[str, Any]]) -> int:
        now = time.time()
        rows = [(e["event_id"], e["kind"], e.get("decision_id"), now, json.dumps({**e, "received": now})) for e in events]
        with self._lock:
            before = self.db.total_changes
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO events (event_id, kind, decision_id, received, body) VALUES (?, ?, ?, ?, ?)", rows
            )
            self.db.execute("COMMIT")
            return self.db.total_changes - before

    def read(self, after: int, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        with self._lock:
            cur = self.db.execute("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
            return [(seq, json.loads(body)) for seq, body in cur.fetchall()]

    def last_seq(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def first_seq(self) -> int:
        """Seq of the oldest event still in the log (after compaction), or last_seq() + 1 when it is empty."""
        with self._lock:
            row = self.db.execute("SELECT MIN(seq), (SELECT seq FROM sqlite_sequence WHERE name = 'events') FROM events")
            first, top = row.fetchone()
            return first if first is not None else (top or 0) + 1

    def compact(self, below_seq: int, older_than_s: float, now: float | None = None) -> int:
        """Retention: delete the events with seq < below_seq that were received more than `older_than_s`
        seconds ago, as a prefix: deletion stops at the first event that is too young, so the log is always a
        contiguous run of seqs. `below_seq` is the consumer's safe bound (`Learner.compaction_floor()`: at most
        its committed offset, whose row is therefore kept). Seqs are never reused, so offsets stay valid.
        Returns the number of events deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._lock:
            young = self.db.execute(  # bounded by the floor: never scans the (unbounded) tail
                "SELECT MIN(seq) FROM events WHERE seq < ? AND received >= ?", (below_seq, cutoff)
            ).fetchone()[0]
            stop = below_seq if young is None else min(below_seq, young)
            before = self.db.total_changes
            self.db.execute("DELETE FROM events WHERE seq < ?", (stop,))
            return self.db.total_changes - before

    def outcomes(self, decision_id: str) -> list[tuple[str, float | None]]:
        with self._lock:
            cur = self.db.execute(
                "SELECT kind, body FROM events WHERE decision_id = ? AND kind != 'decision' ORDER BY seq", (decision_id,)
            )
            return [(kind, json.loads(body).get("value")) for kind, body in cur.fetchall()]

    def has_decision(self, decision_id: str) -> bool:
        with self._lock:
            row = self.db.execute("SELECT 1 FROM events WHERE decision_id = ? AND kind = 'decision' LIMIT 1", (decision_id,))
            return row.fetchone() is not None

    def event_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT event_id FROM events ORDER BY seq")]

    def close(self) -> None:
        self.db.close()
