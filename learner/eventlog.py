"""The durable event log between serving and learning.

`EventLog` is the small interface; `SQLiteEventLog` the embedded default: an append-only SQLite table in
WAL mode, one row per event, ordered by `seq`, unique by `event_id` (a re-sent event is ignored, so
delivery can be at-least-once). The buffer actor (`learner/buffer.py`, `learner/actors.py`) owns the file:
routers and the ingress reach the actor, not the file, so it works across a Ray cluster.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
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


class SQLiteEventLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (WAL); fsync at checkpoints
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL,"
            " kind TEXT NOT NULL, decision_id TEXT, received REAL NOT NULL, body TEXT NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS events_decision ON events (decision_id, kind)")

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
