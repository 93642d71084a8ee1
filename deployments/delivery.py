"""Decision delivery from a router replica to the buffer, off the response path.

The router answers first and hands the decision to a `DecisionShipper` (`submit`, which never waits and
never raises). A background task on the replica's event loop sends queued events in batches with a bounded
timeout (`asyncio.wait_for`). A batch the buffer did not take in time (slow, restarting or dead buffer) is
appended to this replica's spill file, an append-only JSON-lines file; while the spill holds anything, new
events go behind it, and the task re-delivers it in order, oldest first, then truncates it. Delivery is
at-least-once (a timed-out send may still land, and a spill is re-sent from its last confirmed line); the
buffer ignores re-sent events by event id.

Durability: the spill survives the replica's process (it is flushed to the OS after every write; not
fsynced, so a power loss can take its tail). Each live shipper holds an exclusive `flock` on its own file;
a new shipper adopts the files of shippers that are gone (their lock is free), so a crashed replica's spill
is delivered by the next one. What is lost when a replica process dies: events still in its memory queue
(those submitted within the last send, usually milliseconds). A replica that shuts down cleanly spills its
queue (`close`).

Ordering: per replica, events reach the buffer in submission order, except when the memory queue is full:
then `submit` writes straight to the spill, ahead of events still queued.

No Ray here: the send function is any `async (list[dict]) -> Any`, so this is unit-tested without Ray.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Send = Callable[[list[dict[str, Any]]], Awaitable[Any]]


class DecisionShipper:
    """Bounded, non-blocking delivery of events to the buffer with a local spill (see module docstring).

    send        async function that delivers one batch (raises or hangs on failure)
    spill_path  this shipper's spill file; its folder is scanned for orphaned spills to adopt
    timeout_s   how long one send may take before its batch is spilled
    max_queue   events held in memory; beyond it `submit` writes to the spill
    batch_size  events per send
    retry_s     pause after a failed send before the spill is tried again
    on_stats    called with `stats()` whenever the spill changes (metrics)
    """

    def __init__(
        self,
        send: Send,
        spill_path: str | Path,
        *,
        timeout_s: float = 2.0,
        max_queue: int = 10_000,
        batch_size: int = 256,
        retry_s: float = 0.5,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.send, self.timeout_s, self.max_queue = send, timeout_s, max_queue
        self.batch_size, self.retry_s, self.on_stats = batch_size, retry_s, on_stats
        self.spill_path = Path(spill_path)
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._spill = open(self.spill_path, "ab")  # noqa: SIM115 (held open, and locked, for the shipper's life)
        fcntl.flock(self._spill.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._delivered = 0  # bytes of the spill already delivered
        self._pending_spill = 0  # events in the spill not delivered yet
        if self.spill_path.stat().st_size:  # our own file from an earlier life (same path): deliver it
            self._pending_spill = _count_lines(self.spill_path)
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._task: asyncio.Task | None = None
        self._idle: asyncio.Event | None = None
        self._inflight: list[dict[str, Any]] = []
        self._closed = False
        self.counts = {"submitted": 0, "sent": 0, "spilled": 0, "redelivered": 0, "failed_sends": 0, "adopted": 0}
        self.last_error: str | None = None
        self._adopt_orphans()

    # -- the response path ------------------------------------------------------------------------------------
    def submit(self, event: dict[str, Any], *more: dict[str, Any]) -> None:
        """Queue events for the buffer, together: all go to the queue or all to the spill, so a decision and
        its outcome event are never split (an outcome delivered before its decision would find nothing to
        join). Never waits, never raises: the caller is answering a request."""
        events = [event, *more]
        self.counts["submitted"] += len(events)
        try:
            self.start()
            assert self._queue is not None
            if self._queue.maxsize and self._queue.maxsize - self._queue.qsize() < len(events):
                raise asyncio.QueueFull
            for e in events:
                self._queue.put_nowait(e)
        except asyncio.QueueFull:
            self._write_spill(events)
        except Exception as e:  # no running loop, or a closed shipper: keep the events on disk if we can
            self.last_error = f"submit: {e!r}"
            try:
                self._write_spill(events)
            except Exception:  # closed: its spill is handed over; nothing left to write to
                self.counts["lost"] = self.counts.get("lost", 0) + len(events)
                logger.error("decision shipper is closed; dropped events %s", [x.get("event_id") for x in events])

    def start(self) -> None:
        """Start (or restart) the background task on the running loop. Called by `submit`; call it also when
        a replica is idle, so an adopted spill is delivered without traffic."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("shipper is closed")
        if self._queue is None or self._task is None or self._task.done() or self._task.get_loop() is not loop:
            old = self._queue
            self._queue = asyncio.Queue(self.max_queue)
            self._idle = asyncio.Event()
            if old is not None:  # events queued on a loop that is gone: keep them, in order
                self._write_spill(_drain(old))
            self._task = loop.create_task(self._run(), name="decision-shipper")

    # -- the background task ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._queue is not None and self._idle is not None
        queue, idle = self._queue, self._idle
        while True:
            try:
                if self._pending_spill:
                    self._write_spill(_drain(queue))  # new events go behind the spill: order is kept
                    if not await self._deliver_spill():
                        await asyncio.sleep(self.retry_s)
                    continue
                if queue.empty():
                    idle.set()
                    batch = [await queue.get()]
                    idle.clear()
                else:
                    batch = []
                batch += _drain(queue, self.batch_size - len(batch))
                self._inflight = batch  # out of the queue, not yet confirmed: `close` spills it
                if await self._send(batch):
                    self.counts["sent"] += len(batch)
                else:
                    self._write_spill(batch)
                self._inflight = []
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never die: a broken spill file must not stop delivery of the queue
                self.last_error = f"shipper: {e!r}"
                logger.exception("decision shipper step failed")
                await asyncio.sleep(self.retry_s)

    async def _send(self, batch: list[dict[str, Any]]) -> bool:
        try:
            await asyncio.wait_for(self.send(batch), timeout=self.timeout_s)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # TimeoutError included: the buffer is slow, restarting or gone
            self.counts["failed_sends"] += 1
            self.last_error = f"send: {e!r}"[:500]
            return False

    async def _deliver_spill(self) -> bool:
        """Send the spill from its first undelivered line, a batch at a time; truncate it once all is in."""
        while True:
            batch, end = self._read_spill(self._delivered, self.batch_size)
            if not batch:
                break
            if not await self._send(batch):
                return False
            self._delivered = end
            self._pending_spill = max(0, self._pending_spill - len(batch))
            self.counts["redelivered"] += len(batch)
        self._spill.truncate(0)
        self._delivered = self._pending_spill = 0
        self._changed()
        return True

    # -- the spill file -----------------------------------------------------------------------------------------
    def _write_spill(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        self._spill.write(b"".join(json.dumps(e).encode() + b"\n" for e in events))
        self._spill.flush()
        self._pending_spill += len(events)
        self.counts["spilled"] += len(events)
        self._changed()

    def _read_spill(self, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Up to `limit` complete lines from byte `offset`; a torn last line (a crash mid-write) is skipped."""
        events: list[dict[str, Any]] = []
        with open(self.spill_path, "rb") as fh:
            fh.seek(offset)
            while len(events) < limit:
                line = fh.readline()
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                try:
                    events.append(json.loads(line))
                except ValueError:
                    self.last_error = "spill: skipped a corrupt line"
        return events, offset

    def _adopt_orphans(self) -> None:
        """Move the spills of shippers that are gone (their lock is free) into ours, oldest file first."""
        others = sorted(
            (p for p in self.spill_path.parent.glob("*.jsonl") if p != self.spill_path), key=lambda p: p.stat().st_mtime
        )
        for path in others:
            try:
                fh = open(path, "r+b")  # noqa: SIM115
            except FileNotFoundError:
                continue  # another shipper adopted it first
            with fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its shipper is alive
                data = fh.read()
                lines = [ln + b"\n" for ln in data.split(b"\n")[:-1]]  # complete lines only
                if lines:
                    self._spill.write(b"".join(lines))
                    self._spill.flush()
                    self._pending_spill += len(lines)
                    self.counts["adopted"] += len(lines)
                fh.truncate(0)  # before unlinking: a shipper that opened it meanwhile finds it empty
                path.unlink(missing_ok=True)
        if self.counts["adopted"]:
            logger.info("adopted %d spilled events from replicas that are gone", self.counts["adopted"])
            self._changed()

    # -- shutdown, tests, metrics ----------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until the queue and the spill are empty; True if they are."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._queue is not None and self._queue.empty() and not self._pending_spill and self._idle.is_set():
                return True
            await asyncio.sleep(0.01)
        return False

    def close(self) -> None:
        """Stop delivering; whatever is still queued goes to the spill (the next shipper adopts it)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        # the batch being sent may or may not land: spill it too (at-least-once; the buffer dedupes)
        self._write_spill(self._inflight + (_drain(self._queue) if self._queue is not None else []))
        self._inflight = []
        if self._pending_spill == 0:
            self._spill.truncate(0)
        self._spill.close()  # releases the lock: the spill, if any, is now adoptable
        if self._pending_spill == 0:
            self.spill_path.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        return {
            "queued": self._queue.qsize() if self._queue is not None else 0,
            "spill_pending": self._pending_spill,
            "spill_path": str(self.spill_path),
            **self.counts,
            "last_error": self.last_error,
        }

    def _changed(self) -> None:
        if self.on_stats is not None:
            try:
                self.on_stats(self.stats())
            except Exception:  # metrics must never break delivery
                pass


def _drain(queue: asyncio.Queue, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while not queue.empty() and (limit is None or len(out) < limit):
        out.append(queue.get_nowait())
    return out


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n"))


def spill_file(spill_dir: str | Path, replica: str) -> Path:
    """The spill file of one router replica: its id made safe as a file name, plus the process id (a
    restarted replica process gets a file of its own and adopts the old one)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in replica)[:120]
    return Path(spill_dir) / f"{safe}-{os.getpid()}.jsonl"
