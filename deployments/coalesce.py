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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class Coalescer:
    """`await coalescer(item)` → that item's result, from `send(items)`, which returns one result per item in
    order. An exception from `send` reaches every caller of that batch; a cancelled caller leaves the others
    alone. Must be awaited on one event loop (the replica's)."""

    def __init__(self, send: Callable[[list], Awaitable[Sequence[Any]]], max_batch: int = 32, max_in_flight: int = 2):
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError(f"max_batch and max_in_flight must be >= 1, got {max_batch}, {max_in_flight}")
        self.send, self.max_batch, self.max_in_flight = send, max_batch, max_in_flight
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
            task = loop.create_task(self._drain())
            self._tasks.add(task)  # a reference, so the task is not collected mid-call
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self) -> None:
        """One call slot: send what waits, then again while anything waits."""
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                batch = [(item, fut) for item, fut in batch if not fut.done()]  # callers that left: not sent
                if not batch:
                    continue
                self.calls, self.items = self.calls + 1, self.items + len(batch)
                try:
                    results = await self.send([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"coalesced call returned {len(results)} results for {len(batch)} items")
                except Exception as e:
                    _settle(batch, error=e)
                    continue
                except BaseException:  # this task cancelled (replica shutting down): its callers must not hang,
                    cancelled = RuntimeError("coalesced call cancelled")
                    _settle(batch, error=cancelled)
                    if self._in_flight == 1:  # nor those waiting here when no other call slot will send them
                        _settle(self._pending, error=cancelled)
                        self._pending = []
                    raise
                for (_, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self._in_flight -= 1

    def stats(self) -> dict:
        return {"calls": self.calls, "items": self.items, "mean_batch": self.items / self.calls if self.calls else None}


def _settle(batch: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():  # a caller that was cancelled meanwhile has its answer already
            fut.set_exception(error)
