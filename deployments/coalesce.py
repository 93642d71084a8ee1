"""Coalescing a replica's calls to another deployment (`router.coalesce_embeds`: the embedder).

Concurrent requests each need one item (a prompt's embedding). Instead of one handle call per item, the
caller sends a list per call, with at most `max_in_flight` calls outstanding: while a call slot is free an item
goes out at once (no wait when idle), and the items that arrive while every slot is busy wait here and leave
together when a call returns. So under load a batch grows for as long as the callee is busy, and the callee
handles a few calls instead of one per request (README, "Routing overhead"). The embedder replica uses the same
class for its own encodes (`EmbedderDeployment.embed_many`, one call in flight): lists that arrive while it
encodes go together next.

`serve.batch` does not do this: it forms its next batch as soon as one item waits, and queues that batch behind
its concurrency limit, so its batches stay at about one item under steady load."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class Coalescer:
    """`await coalescer(item)` → that item's result, from `send(items)`, which returns one result per item in
    order. An exception from `send`, a call its callee cancels, or no answer within `timeout_s` reaches every
    caller of that batch and no other; the slot then sends what waits behind it. `max_in_flight` bounds the calls
    awaited here: a call that timed out is cancelled and no longer counted, though its callee may still be
    finishing it (Serve's cancellation is best effort). A caller that leaves takes its
    item out of the next batch. Must be awaited on one event loop (the replica's).

    The call slots run as tasks in an empty context, not the context of the request that happened to start
    one: a slot sends many requests' items, so it must not carry one request's Serve context (Serve may cancel a
    cancelled request's child calls) nor name that request in the callee's logs; `serve.batch` unsets the
    request context for the same reason. The empty context also drops tracing context, so the callee's spans
    are not linked to any one request."""

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
            slot = _Slot()
            task = contextvars.Context().run(loop.create_task, self._drain(slot))  # no request's context: above
            self._tasks.add(task)  # a reference, so the task is not collected mid-call
            task.add_done_callback(lambda t: self._slot_done(t, slot))
        return await fut

    async def _drain(self, slot: _Slot) -> None:
        """One call slot: send what waits, then again while anything waits. The slot is freed in the same step
        that finds nothing waiting, so an item queued after that always finds a free slot."""
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                batch = [(item, fut) for item, fut in batch if not fut.done()]  # callers that left: not sent
                if batch:
                    try:
                        await self._call(batch)
                    except Exception as e:  # not the call's outcome (that is read in _call): its callers, still
                        _settle(batch, error=e)  # answered, then the slot goes on
        finally:
            self._free(slot)

    async def _call(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        self.calls, self.items = self.calls + 1, self.items + len(batch)
        # the call runs as its own task: a CancelledError here then means this slot was cancelled (replica
        # shutting down), and the call's own outcome, its callee cancelling it included, is read from the task
        call = asyncio.ensure_future(self.send([item for item, _ in batch]))  # send raising here: _drain settles
        call.add_done_callback(_retrieve)  # a call cancelled here and failing otherwise logs nothing
        try:
            done, _ = await asyncio.wait({call}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            call.cancel()
            _settle(batch, error=RuntimeError("coalesced call cancelled"))
            raise
        if not done:
            call.cancel()  # the caller's send cancels its handle call (the router: the embedder's request)
            _settle(batch, error=TimeoutError(f"coalesced call gave no answer within {self.timeout_s} s"))
        elif call.cancelled():
            _settle(batch, error=RuntimeError("coalesced call was cancelled by its callee"))
        elif (error := call.exception()) is not None:
            _settle(batch, error=error)
        elif len(results := _rows(call.result())) != len(batch):
            _settle(batch, error=RuntimeError(f"coalesced call returned {len(results)} results for {len(batch)} items"))
        else:
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    def _free(self, slot: _Slot) -> None:
        if not slot.freed:
            slot.freed = True
            self._in_flight -= 1

    def _slot_done(self, task: asyncio.Task, slot: _Slot) -> None:
        """A slot's task ended. Cancelled before its first step, its `finally` never ran: free it here. Cancelled
        at all with no other slot left, the items waiting here would never be sent: fail them, not hang them."""
        self._tasks.discard(task)
        self._free(slot)
        ended_early = task.cancelled() or task.exception() is not None  # (reading the exception retrieves it)
        if ended_early and self._in_flight == 0 and self._pending:
            waiting, self._pending = self._pending, []
            _settle(waiting, error=RuntimeError("coalesced call cancelled"))

    def stats(self) -> dict:
        return {"calls": self.calls, "items": self.items, "mean_batch": self.items / self.calls if self.calls else None}


class _Slot:
    __slots__ = ("freed",)

    def __init__(self):
        self.freed = False


def _retrieve(call: asyncio.Future) -> None:
    if not call.cancelled():
        call.exception()


def _rows(results: Any) -> list:
    """One result per item, from whatever `send` returned (a list, an array's rows, an iterator)."""
    try:
        return list(results)
    except TypeError as e:
        raise RuntimeError(f"coalesced call returned {type(results).__name__}, not one result per item") from e


def _settle(batch: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():  # a caller that was cancelled meanwhile has its answer already
            fut.set_exception(error)
