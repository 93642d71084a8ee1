"""Coalescing a replica's calls to another deployment (`router.coalesce_embeds`: the embedder).

Concurrent requests each need one item (a prompt's embedding). Instead of one handle call per item, the
caller sends a list per call, with at most `max_in_flight` calls outstanding: the first item goes out at once
(no wait when idle), and the items that arrive while calls are in flight wait here and leave together when one
returns. So under load a batch grows for as long as the callee is busy, and the callee handles a few calls
instead of one per request (README, "Routing overhead").

`serve.batch` does not do this: it forms its next batch as soon as one item waits, and queues that batch behind
its concurrency limit, so its batches stay at about one item under steady load."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class Coalescer:
    """`await coalescer(item)` → that item's result, from `send(items)`, which returns one result per item in
    order. An exception from `send`, or no answer within `timeout_s`, reaches every caller of that batch and no
    other; a caller that leaves takes its item out of the next batch. Must be awaited on one event loop (the
    replica's).

    The call slots run as tasks in an empty context, not the context of the request that happened to start
    one: a slot sends many requests' items, so it must not carry one request's Serve context, whose
    cancellation (a client that disconnects) Serve passes on to that request's child calls, nor name it in
    the callee's logs (`serve.batch` unsets the request context for the same reason)."""

    def __init__(
        self,
        send: Callable[[list], Awaitable[Sequence[Any]]],
        max_batch: int = 32,
        max_in_flight: int = 2,
        timeout_s: float | None = None,
    ):
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError(f"max_batch and max_in_flight must be >= 1, got {max_batch}, {max_in_flight}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.send, self.max_batch, self.max_in_flight, self.timeout_s = send, max_batch, max_in_flight, timeout_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self.calls = self.items = 0  # for stats: the mean batch is items / calls

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((item, fut))
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = contextvars.Context().run(loop.create_task, self._drain())  # no request's context: see above
            self._tasks.add(task)  # a reference, so the task is not collected mid-call
            task.add_done_callback(self._slot_done)
        return await fut

    def _slot_done(self, task: asyncio.Task) -> None:
        """A call slot ended, however it ended (also cancelled before its first step, where no `finally` in
        `_drain` would run): free the slot, and when none is left while items wait, fail them, not hang them."""
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._in_flight == 0 and self._pending:
            waiting, self._pending = self._pending, []
            _settle(waiting, error=RuntimeError("coalesced call cancelled"))

    async def _drain(self) -> None:
        """One call slot: send what waits, then again while anything waits."""
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # callers that left: not sent
            if not batch:
                continue
            self.calls, self.items = self.calls + 1, self.items + len(batch)
            try:
                results = await asyncio.wait_for(self.send([item for item, _ in batch]), self.timeout_s)
                if len(results) != len(batch):
                    raise RuntimeError(f"coalesced call returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                if _cancelling(asyncio.current_task()):  # this slot cancelled (replica shutting down)
                    _settle(batch, error=RuntimeError("coalesced call cancelled"))
                    raise
                _settle(batch, error=RuntimeError("coalesced call was cancelled by its callee"))  # this batch only
                continue
            except asyncio.TimeoutError:
                _settle(batch, error=TimeoutError(f"coalesced call gave no answer within {self.timeout_s} s"))
                continue
            except Exception as e:
                _settle(batch, error=e)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    def stats(self) -> dict:
        return {"calls": self.calls, "items": self.items, "mean_batch": self.items / self.calls if self.calls else None}


def _cancelling(task: asyncio.Task | None) -> bool:
    """Whether `task` itself is being cancelled (Python >= 3.11 knows; before that, take it as so)."""
    cancelling = getattr(task, "cancelling", None)
    return True if cancelling is None else cancelling() > 0


def _settle(batch: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():  # a caller that was cancelled meanwhile has its answer already
            fut.set_exception(error)
