"""Admission in a router replica, Ray-free: the per-model FIFO queue (`AdmissionQueue`) for policies that
decide at arrival, and one waiting pool scheduled by the policy (`PoolScheduler`) for queue-aware ones (ACQB).

FIFO (BaRP, LinUCB, ...): the policy picks the model when the request arrives; the request then waits for
one of that model's `max_in_flight` slots, in arrival order, with at most `capacity` waiting per model.

Pool (ACQB; the paper's joint routing and scheduling, arXiv 2602.02061): an arriving request (already
embedded) joins one pool of at most `capacity` waiting requests; whenever a model has a free slot, the
policy's `schedule(contexts, preferences, free)` picks which waiting requests go to which free models. The
scheduler dispatches on every arrival and every slot release, synchronously on the replica's event loop
(no await between reading the pool and resolving the chosen requests' futures, so no two dispatches race).
What is ours, not the paper's: the pool is per router replica (replicas do not share one queue), the
policy sees the whole pool (bounded by `capacity`) on each dispatch, and a request whose client went away
(its task cancelled) leaves the pool; if it had already been given a slot, the slot is released at once.

Both refuse with `QueueFull` beyond their bound; the ingress answers 503 with a `Retry-After` header from
`QueueFull.retry_after_s`: an estimate of when a slot frees up [ours]: waiting requests ahead per slot times
the mean service time (an exponential moving average of the time slots were held), at least 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from banditrouter.policies.base import Assignment

logger = logging.getLogger(__name__)

ScheduleFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Sequence[Assignment]]
"""`(contexts (n, d), preferences (n, 2), free (K,)) -> assignments`: `Policy.schedule` with its options bound."""


class QueueFull(RuntimeError):
    """The request cannot wait: the pool (or the chosen model's queue) is at capacity. `retry_after_s` is
    the whole number of seconds the ingress puts in its 503's Retry-After header."""

    def __init__(self, message: str = "queue full", retry_after_s: int = 1):
        super().__init__(message)
        self.message, self.retry_after_s = message, int(retry_after_s)

    def __reduce__(self):  # crosses Ray's process boundary with its retry hint
        return (type(self), (self.message, self.retry_after_s))


class SchedulingError(RuntimeError):
    """The policy's `schedule` raised or broke its contract (a job twice, a job out of range, more pairs
    on an arm than it had free slots); the waiting requests fail with it rather than wait forever."""


class _ServiceTime:
    """Exponential moving average of how long a slot is held (seconds)."""

    def __init__(self, alpha: float = 0.1, initial_s: float = 1.0):
        self.alpha, self.mean_s = alpha, initial_s

    def observe(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self.mean_s += self.alpha * (seconds - self.mean_s)

    def retry_after(self, waiting: int, slots: int) -> int:
        return max(1, math.ceil(self.mean_s * (waiting + 1) / max(1, slots)))


# -- FIFO: decide at arrival, wait for that model -------------------------------------------------------------
class AdmissionQueue:
    """One model's slots (`max_in_flight`) and FIFO wait (asyncio.Semaphore wakes waiters in order), with at
    most `capacity` waiting."""

    def __init__(self, max_in_flight: int, capacity: int, clock: Callable[[], float] = time.monotonic):
        self.slots = asyncio.Semaphore(max_in_flight)
        self.max_in_flight, self.capacity, self.clock = max_in_flight, capacity, clock
        self.waiting = 0
        self.in_flight = 0
        self.service = _ServiceTime()
        self._started: dict[asyncio.Task | None, float] = {}  # enter and exit run in the caller's task

    async def __aenter__(self):
        if self.slots.locked():
            if self.waiting >= self.capacity:
                raise QueueFull(
                    f"the chosen model's queue is full ({self.waiting} waiting); retry later",
                    self.service.retry_after(self.waiting, self.max_in_flight),
                )
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.slots.acquire()
        self.in_flight += 1
        self._started[asyncio.current_task()] = self.clock()
        return self

    async def __aexit__(self, *exc):
        self.in_flight -= 1
        started = self._started.pop(asyncio.current_task(), None)
        if started is not None:
            self.service.observe(self.clock() - started)
        self.slots.release()


# -- pool: the policy schedules (waiting request, free model) pairs -------------------------------------------
@dataclass(frozen=True)
class Grant:
    """What a waiting request gets: its model (arm), the probability the policy gave that pair, the policy
    version that decided, how long it waited in the pool, and how many other requests were waiting when it
    was scheduled. Duck-types `banditrouter.policies.Decision` (arm, propensity, policy_version)."""

    arm: int
    propensity: float
    policy_version: int
    queue_wait_s: float
    queue_length: int


class _Waiter:
    __slots__ = ("context", "preference", "arrived", "future")

    def __init__(self, context: np.ndarray, preference: np.ndarray, arrived: float, future: asyncio.Future):
        self.context, self.preference, self.arrived, self.future = context, preference, arrived, future


class PoolScheduler:
    """One bounded waiting pool over `n_arms` models with `max_in_flight` slots each (module docstring).

    schedule   the policy's joint decision (`ScheduleFn`), called with the whole pool in arrival order
    on_change  called with the number waiting after every change (the queue-length gauge)
    clock      monotonic seconds (tests inject one)
    """

    def __init__(
        self,
        n_arms: int,
        max_in_flight: int,
        capacity: int,
        schedule: ScheduleFn,
        *,
        on_change: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if n_arms < 1 or max_in_flight < 1 or capacity < 1:
            raise ValueError(f"need n_arms, max_in_flight and capacity >= 1, got {n_arms}, {max_in_flight}, {capacity}")
        self.n_arms, self.max_in_flight, self.capacity = n_arms, max_in_flight, capacity
        self.schedule, self.on_change, self.clock = schedule, on_change, clock
        self.in_flight = np.zeros(n_arms, dtype=np.int64)
        self.pool: list[_Waiter] = []  # arrival order
        self.service = _ServiceTime()
        self.counts = {"admitted": 0, "scheduled": 0, "refused": 0, "cancelled": 0, "released": 0, "schedule_errors": 0}

    @property
    def waiting(self) -> int:
        return len(self.pool)

    def free(self) -> np.ndarray:
        return self.max_in_flight - self.in_flight

    async def acquire(self, context: np.ndarray, preference: Sequence[float]) -> Grant:
        """Wait in the pool until the policy gives this request a model; the caller must `release(arm)`
        when the call is over (or use `slot`). QueueFull when the pool is at capacity."""
        if len(self.pool) >= self.capacity:
            self.counts["refused"] += 1
            raise QueueFull(
                f"the router's waiting pool is full ({len(self.pool)} waiting); retry later",
                self.service.retry_after(len(self.pool), self.n_arms * self.max_in_flight),
            )
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(np.asarray(context, dtype=np.float32), np.asarray(preference, dtype=np.float64), self.clock(), fut)
        self.pool.append(waiter)
        self.counts["admitted"] += 1
        self._changed()
        self._dispatch()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result().arm)  # granted, but its client is gone: the slot goes to the next one
            elif waiter in self.pool:  # not yet pruned by a dispatch (which counts the ones it prunes)
                self.pool.remove(waiter)
                self.counts["cancelled"] += 1
                self._changed()
            raise

    def release(self, arm: int, held_s: float | None = None) -> None:
        """A call on `arm` is over: free its slot and let the policy schedule the pool again."""
        if self.in_flight[arm] <= 0:
            raise RuntimeError(f"release of arm {arm} with no call in flight")
        self.in_flight[arm] -= 1
        self.counts["released"] += 1
        if held_s is not None:
            self.service.observe(held_s)
        self._dispatch()

    def slot(self, grant: Grant) -> _Slot:
        """`async with scheduler.slot(grant):` releases the granted slot however the call ends."""
        return _Slot(self, grant.arm)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self.pool))

    def _dispatch(self) -> None:
        # A waiter whose task was cancelled has a done future but leaves the pool only when its task runs
        # again: drop it here, or a release in between would grant it a slot nobody would ever release.
        gone = [w for w in self.pool if w.future.done()]
        if gone:
            self.pool = [w for w in self.pool if not w.future.done()]
            self.counts["cancelled"] += len(gone)
            self._changed()
        free = self.free()
        if not self.pool or not (free > 0).any():
            return
        pool, n = list(self.pool), len(self.pool)
        try:
            assignments = list(
                self.schedule(np.stack([w.context for w in pool]), np.stack([w.preference for w in pool]), free.copy())
            )
            self._check(assignments, n, free)
        except Exception as e:  # a broken policy must not leave requests waiting forever
            self.counts["schedule_errors"] += 1
            logger.exception("schedule failed; failing %d waiting requests", n)
            err = e if isinstance(e, SchedulingError) else SchedulingError(f"schedule failed: {e!r}")
            for w in pool:
                if not w.future.done():
                    w.future.set_exception(err)
            self.pool.clear()
            self._changed()
            return
        now = self.clock()
        granted = set()
        for a in assignments:
            w = pool[a.job]
            self.in_flight[a.arm] += 1
            granted.add(a.job)
            w.future.set_result(Grant(int(a.arm), float(a.propensity), int(a.policy_version), now - w.arrived, n - 1))
        if granted:
            self.pool = [w for j, w in enumerate(pool) if j not in granted]
            self.counts["scheduled"] += len(granted)
            self._changed()

    def _check(self, assignments: list[Assignment], n: int, free: np.ndarray) -> None:
        jobs = [a.job for a in assignments]
        if len(set(jobs)) != len(jobs) or any(not 0 <= j < n for j in jobs):
            raise SchedulingError(f"schedule returned jobs {jobs} for a pool of {n} (each at most once)")
        used = np.zeros(self.n_arms, dtype=np.int64)
        for a in assignments:
            if not 0 <= a.arm < self.n_arms:
                raise SchedulingError(f"schedule returned arm {a.arm} of {self.n_arms}")
            used[a.arm] += 1
        if (used > free).any():
            raise SchedulingError(f"schedule used {used.tolist()} slots with {free.tolist()} free")

    def stats(self) -> dict:
        return {
            "waiting": len(self.pool),
            "capacity": self.capacity,
            "in_flight": self.in_flight.tolist(),
            "free": self.free().tolist(),
            "oldest_wait_s": (self.clock() - self.pool[0].arrived) if self.pool else 0.0,
            "mean_service_s": self.service.mean_s,
            **self.counts,
        }


class _Slot:
    def __init__(self, scheduler: PoolScheduler, arm: int):
        self.scheduler, self.arm = scheduler, arm

    async def __aenter__(self):
        self.t0 = self.scheduler.clock()
        return self

    async def __aexit__(self, *exc):
        self.scheduler.release(self.arm, self.scheduler.clock() - self.t0)
