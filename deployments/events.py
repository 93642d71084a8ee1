"""The router replica's own record of its events: an in-memory ring (default, served by
`GET /v1/routing/events`) or an append-only JSONL file (`router.events_path`). With online learning on, the
same events also go to the durable buffer actor, off the response path (`deployments/delivery.py`)."""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path
from typing import Protocol

from banditrouter.schemas import DecisionEvent, FeedbackEvent


class EventSink(Protocol):
    def emit(self, event: DecisionEvent | FeedbackEvent) -> None: ...

    def recent(self, n: int) -> list[dict]: ...


class MemorySink:
    def __init__(self, maxlen: int = 10_000):
        self._events: deque[dict] = deque(maxlen=maxlen)

    def emit(self, event) -> None:
        self._events.append(event.to_dict())

    def recent(self, n: int) -> list[dict]:
        return list(self._events)[-n:]


class JsonlSink(MemorySink):
    """Appends one JSON line per event (and keeps the recent ones in memory)."""

    def __init__(self, path: Path, maxlen: int = 10_000):
        super().__init__(maxlen)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def emit(self, event) -> None:
        super().emit(event)
        line = json.dumps(event.to_dict())
        with self._lock, self.path.open("a") as fh:
            fh.write(line + "\n")


def make_sink(path: Path | None) -> EventSink:
    return JsonlSink(path) if path else MemorySink()
