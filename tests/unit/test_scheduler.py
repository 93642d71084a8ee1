"""Admission in a router replica without Ray (deployments/scheduler.py): the waiting pool a queue-aware
policy schedules (bounded, slots never exceeded, the policy's pairs are what the requests get, a released
slot dispatches, a cancelled waiter leaves), and the per-model FIFO path the other policies keep."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from factories import FakeHandle, settle

from banditrouter.policies.base import Assignment, deterministic
from deployments.scheduler import AdmissionQueue, Grant, PoolScheduler, QueueFull, SchedulingError

D = 4


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def greedy(version: int = 7):
    """Work-conserving: oldest job first, to the free arm with the lowest index; records every call."""
    calls = []

    def schedule(contexts, preferences, free):
        calls.append((contexts.copy(), preferences.copy(), free.copy()))
        free, out = free.copy(), []
        for j in range(len(contexts)):
            arms = np.flatnonzero(free > 0)
            if not len(arms):
                break
            free[arms[0]] -= 1
            out.append(Assignment(j, int(arms[0]), 0.5, version))
        return out

    schedule.calls = calls
    return schedule


def ctx(i: int) -> np.ndarray:
    x = np.zeros(D, dtype=np.float32)
    x[i % D] = 1.0
    return x


def test_pool_is_bounded_and_the_refusal_carries_a_retry_hint():
    async def main():
        s = PoolScheduler(1, 1, capacity=2, schedule=greedy())
        first = await s.acquire(ctx(0), (1.0, 0.0))  # takes the only slot
        waiting = [asyncio.create_task(s.acquire(ctx(i), (1.0, 0.0))) for i in (1, 2)]
        await settle()
        assert s.waiting == 2
        with pytest.raises(QueueFull) as e:
            await s.acquire(ctx(3), (1.0, 0.0))
        assert e.value.retry_after_s >= 1 and "full" in str(e.value)
        assert s.counts["refused"] == 1 and s.waiting == 2
        s.release(first.arm)
        s.release((await waiting[0]).arm)
        await waiting[1]

    asyncio.run(main())


def test_queue_full_survives_pickling_with_its_retry_hint():
    import pickle

    e = pickle.loads(pickle.dumps(QueueFull("pool full", 7)))
    assert isinstance(e, QueueFull) and e.retry_after_s == 7 and str(e) == "pool full"


def test_requests_get_the_pairs_the_policy_chose_with_wait_and_queue_length():
    clock = Clock()
    chosen = {"pairs": []}

    def schedule(contexts, preferences, free):
        return chosen["pairs"]

    async def main():
        s = PoolScheduler(3, 1, capacity=10, schedule=schedule, clock=clock)
        tasks = [asyncio.create_task(s.acquire(ctx(i), (1.0 - 0.1 * i, 0.1 * i))) for i in range(3)]
        await settle()  # the policy served nobody yet (not work-conserving here, on purpose)
        assert s.waiting == 3 and not any(t.done() for t in tasks)
        clock.t += 2.5
        chosen["pairs"] = [Assignment(2, 0, 0.9, 11), Assignment(0, 2, 0.4, 11)]
        s._dispatch()
        await settle()
        assert tasks[2].result() == Grant(0, 0.9, 11, 2.5, 2)  # two others were waiting
        assert tasks[0].result() == Grant(2, 0.4, 11, 2.5, 2)
        assert not tasks[1].done() and s.waiting == 1
        assert s.in_flight.tolist() == [1, 0, 1]
        chosen["pairs"] = [Assignment(0, 1, 1.0, 12)]
        s._dispatch()
        assert (await tasks[1]) == Grant(1, 1.0, 12, 2.5, 0)

    asyncio.run(main())


def test_the_policy_sees_the_pool_in_arrival_order_and_the_free_slots():
    sched = greedy()

    async def main():
        s = PoolScheduler(2, 1, capacity=10, schedule=sched)
        g0, g1 = await s.acquire(ctx(0), (1.0, 0.0)), await s.acquire(ctx(1), (0.5, 0.5))
        assert (g0.arm, g1.arm) == (0, 1)
        waiting = [asyncio.create_task(s.acquire(ctx(i), (0.2, 0.8))) for i in (2, 3)]
        await settle()
        assert len(sched.calls) == 2  # arrivals with no free slot do not call the policy
        s.release(1)
        contexts, prefs, free = sched.calls[-1]
        np.testing.assert_array_equal(contexts, np.stack([ctx(2), ctx(3)]))
        np.testing.assert_allclose(prefs, [[0.2, 0.8], [0.2, 0.8]])
        assert free.tolist() == [0, 1]
        assert (await waiting[0]).arm == 1 and not waiting[1].done()
        s.release(0)
        assert (await waiting[1]).arm == 0

    asyncio.run(main())


def test_slots_are_never_exceeded_under_random_arrivals_and_releases():
    rng = np.random.default_rng(0)
    sched = greedy()

    async def main():
        s = PoolScheduler(3, 2, capacity=50, schedule=sched)
        held: list[Grant] = []
        tasks: list[asyncio.Task] = []
        peak = 0
        for step in range(400):
            if rng.random() < 0.55:
                tasks.append(asyncio.create_task(s.acquire(ctx(step), (1.0, 0.0))))
            if held and rng.random() < 0.5:
                s.release(held.pop(int(rng.integers(len(held)))).arm)
            assert (s.in_flight <= 2).all() and (s.in_flight >= 0).all()
            await settle()
            for t in [t for t in tasks if t.done()]:
                tasks.remove(t)
                held.append(t.result())
            assert s.in_flight.sum() == len(held)  # every slot taken is held by a granted request
            if s.waiting:  # work-conserving policy: nobody waits while a slot is free
                assert (s.free() == 0).all()
            peak = max(peak, s.waiting)
        assert peak > 0 and s.counts["scheduled"] > 100
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def test_a_release_dispatches_the_next_waiting_request():
    async def main():
        s = PoolScheduler(1, 1, capacity=5, schedule=greedy())
        g = await s.acquire(ctx(0), (1.0, 0.0))
        nxt = asyncio.create_task(s.acquire(ctx(1), (1.0, 0.0)))
        await settle()
        assert not nxt.done()
        async with s.slot(g):
            pass  # the call is over: leaving the slot releases it
        await settle()
        assert nxt.done() and nxt.result().arm == 0 and s.waiting == 0
        assert s.counts["released"] == 1
        with pytest.raises(RuntimeError):
            s.release(0)
            s.release(0)  # more releases than calls

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_pool_and_a_cancelled_grant_frees_its_slot():
    async def main():
        s = PoolScheduler(1, 1, capacity=5, schedule=greedy())
        g = await s.acquire(ctx(0), (1.0, 0.0))
        gone = asyncio.create_task(s.acquire(ctx(1), (1.0, 0.0)))
        stays = asyncio.create_task(s.acquire(ctx(2), (1.0, 0.0)))
        await settle()
        assert s.waiting == 2
        gone.cancel()  # client went away while waiting
        await settle()
        assert gone.cancelled() and s.waiting == 1 and s.counts["cancelled"] == 1
        s.release(g.arm)
        await settle()
        assert stays.result().arm == 0  # the slot went to the one still waiting, not the cancelled one
        # granted (future resolved) but cancelled before it resumed: its slot must not leak
        late = asyncio.create_task(s.acquire(ctx(3), (1.0, 0.0)))
        await settle()
        s.release(0)  # grants `late` its slot ...
        late.cancel()  # ... and its client leaves before it runs
        await settle()
        assert late.cancelled() and s.in_flight.tolist() == [0]

    asyncio.run(main())


def test_a_waiter_cancelled_just_before_a_release_is_never_granted_the_slot():
    """cancel() marks the waiter's future done at once, but its task leaves the pool only when it runs again:
    a release in between must not grant it a slot (nobody would ever release it) nor fail the others."""

    async def main():
        s = PoolScheduler(1, 1, capacity=5, schedule=greedy())
        g = await s.acquire(ctx(0), (1.0, 0.0))
        gone = asyncio.create_task(s.acquire(ctx(1), (1.0, 0.0)))
        stays = asyncio.create_task(s.acquire(ctx(2), (1.0, 0.0)))
        await settle()
        gone.cancel()
        s.release(g.arm)  # before the cancelled task has run
        await settle()
        assert gone.cancelled() and stays.done() and stays.result().arm == 0
        assert s.in_flight.tolist() == [1] and s.waiting == 0 and s.counts["cancelled"] == 1
        s.release(0)
        assert s.in_flight.tolist() == [0]

    asyncio.run(main())


def test_a_broken_schedule_fails_the_waiting_requests_instead_of_hanging_them():
    def twice(contexts, preferences, free):
        return [Assignment(0, 0, 1.0, 1)] * 2  # the same job twice: contract broken

    def boom(contexts, preferences, free):
        raise ValueError("nan in theta")

    def overbook(contexts, preferences, free):
        return [Assignment(j, 0, 1.0, 1) for j in range(len(contexts))]

    async def main():
        for fn in (twice, boom):
            s = PoolScheduler(2, 1, capacity=5, schedule=fn)
            with pytest.raises(SchedulingError):
                await asyncio.wait_for(s.acquire(ctx(0), (1.0, 0.0)), 2)
            assert s.waiting == 0 and s.in_flight.sum() == 0 and s.counts["schedule_errors"] == 1
        s = PoolScheduler(2, 1, capacity=5, schedule=overbook)
        s.in_flight[:] = [1, 1]  # both slots busy: the two arrivals wait
        tasks = [asyncio.create_task(s.acquire(ctx(i), (1.0, 0.0))) for i in range(2)]
        await settle()
        s.release(0)  # one free slot, and the policy puts both jobs on it
        for t in tasks:
            with pytest.raises(SchedulingError):
                await asyncio.wait_for(t, 2)
        assert s.in_flight.tolist() == [0, 1] and s.waiting == 0

    asyncio.run(main())


def test_the_queue_length_gauge_follows_every_change():
    seen = []

    async def main():
        s = PoolScheduler(1, 1, capacity=5, schedule=greedy(), on_change=seen.append)
        g = await s.acquire(ctx(0), (1.0, 0.0))
        w = asyncio.create_task(s.acquire(ctx(1), (1.0, 0.0)))
        await settle()
        s.release(g.arm)
        await w

    asyncio.run(main())
    assert seen == [1, 0, 1, 0]


def test_fifo_admission_queue_serves_in_arrival_order_and_is_bounded():
    """Non-queue-aware policies keep per-model FIFO admission: waiters get the slot in arrival order."""

    async def main():
        q = AdmissionQueue(max_in_flight=1, capacity=2)
        order = []

        async def call(i):
            async with q:
                order.append(i)
                await asyncio.sleep(0.01)

        first = asyncio.create_task(call(0))
        await settle()
        rest = [asyncio.create_task(call(i)) for i in (1, 2)]
        await settle()
        assert q.waiting == 2
        with pytest.raises(QueueFull) as e:
            await call(3)
        assert e.value.retry_after_s >= 1
        await asyncio.gather(first, *rest)
        assert order == [0, 1, 2] and q.in_flight == 0 and q.service.mean_s < 1.0

    asyncio.run(main())


# -- the router replica with fake handles: which admission a policy gets --------------------------------------
MODELS = ("cheap", "strong")


def _router(tmp_path, policy: str, gate: asyncio.Event | None = None, **router_cfg):
    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.backends import CompletionResult
    from deployments.router import Router

    ckpt = save_checkpoint(make_policy(policy, MODELS, D, tau=0.01), tmp_path / f"{policy}.pt")
    cfg = load_config(
        {
            "policy": {"name": policy, "checkpoint": str(ckpt), "explore": True},
            "router": router_cfg,
            "models": [{"name": m} for m in MODELS],
        }
    )

    async def embed(prompt):
        return ctx(len(prompt))

    async def answer(req):
        if gate is not None:
            await gate.wait()
        return CompletionResult(text="ok", cost_usd=0.001, input_tokens=1, output_tokens=1, latency_s=0.01)

    return Router.func_or_class(cfg, FakeHandle(__call__=embed), {m: FakeHandle(complete=answer) for m in MODELS})


def _req(i: int):
    from deployments.router import RouteRequest

    text = "q" * i
    return RouteRequest(request_id=f"r{i}", messages=[{"role": "user", "content": text}], prompt=text, preference=(1.0, 0.0))


def test_a_queue_aware_policy_gets_the_pool_and_the_others_fifo_queues(tmp_path):
    acqb = _router(tmp_path, "acqb")
    linucb = _router(tmp_path, "linucb")
    assert acqb.pool is not None and not acqb.queues and acqb.info()["pool"]["capacity"] == 256
    assert linucb.pool is None and set(linucb.queues) == set(MODELS) and linucb.info()["pool"] is None
    assert all(isinstance(q, AdmissionQueue) for q in linucb.queues.values())


def test_router_pool_bounds_schedules_and_records_queue_wait_and_length(tmp_path):
    """Two models x one slot, a pool of two: four requests fill slots and pool, the fifth is refused; the
    waiting ones are decided by the policy when a slot frees, and their decision events say how long they
    waited and how many others were waiting."""

    async def main():
        gate = asyncio.Event()
        router = _router(tmp_path, "acqb", gate, max_in_flight_per_model=1, queue_capacity=2)
        tasks = [asyncio.create_task(router.route(_req(i + 1))) for i in range(4)]
        await settle()
        info = router.info()["pool"]
        assert info["waiting"] == 2 and info["in_flight"] == {"cheap": 1, "strong": 1}
        assert info["free"] == {"cheap": 0, "strong": 0}
        with pytest.raises(QueueFull) as e:
            await router.route(_req(9))
        assert e.value.retry_after_s >= 1
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        routings = [o["routing"] for o in outs]
        assert sorted(r["queue_length"] for r in routings) == [0, 0, 0, 1]  # arrivals 3 and 4 waited together
        waited = [r["queue_wait_s"] for r in routings]
        assert sum(w >= 0.05 for w in waited) == 2 and sum(w < 0.05 for w in waited) == 2
        events = [e for e in router.recent_events(10) if e["kind"] == "decision"]
        assert len(events) == 4 and all(e["queue_wait_s"] is not None and e["queue_length"] is not None for e in events)
        assert router.info()["pool"]["scheduled"] == 4 and router.info()["pool"]["refused"] == 1
        assert router.pool.in_flight.tolist() == [0, 0]

    asyncio.run(main())


def test_fifo_router_records_queue_wait_and_length_too(tmp_path):
    async def main():
        gate = asyncio.Event()
        router = _router(tmp_path, "linucb", gate, max_in_flight_per_model=1, queue_capacity=4)
        # every request to "cheap": one runs, two wait in its FIFO queue
        router.policy.select = lambda x, p, explore=False: deterministic(np.zeros(len(x), dtype=np.int64), 0)
        tasks = [asyncio.create_task(router.route(_req(i + 1))) for i in range(3)]
        await settle()
        assert router.info()["queues"]["cheap"] == {"waiting": 2, "in_flight": 1}
        gate.set()
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert [o["routing"]["queue_length"] for o in outs] == [0, 0, 1]
        assert all(o["routing"]["model"] == "cheap" for o in outs)

    asyncio.run(main())
