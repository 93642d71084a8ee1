"""Coalesced embedder calls (issue 13, `router.coalesce_embeds`): the first item goes at once, items that arrive
while calls are in flight leave together, each caller gets its own result, failures reach only their batch.
No Ray: `deployments/coalesce.py` and the router with fake handles."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from factories import FakeHandle, settle

from deployments.coalesce import Coalescer

MODELS = ("cheap", "strong")
D = 8  # the router test's eight prompts get eight different one-hot embeddings


class Callee:
    """Records each call's items; a call returns (items doubled) when the test releases it."""

    def __init__(self):
        self.calls: list[list] = []
        self.slots: list[asyncio.Task] = []  # the call slot (task) that made each call
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def __call__(self, items):
        self.calls.append(list(items))
        self.slots.append(asyncio.current_task())
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        return [2 * i for i in items]

    def release(self, k: int) -> None:
        self.gates[k].set()


def test_the_first_item_goes_at_once_and_the_rest_wait_for_the_call_in_flight():
    async def main():
        callee = Callee()
        c = Coalescer(callee, max_batch=32, max_in_flight=1)
        first = asyncio.create_task(c(1))
        await settle()
        assert callee.calls == [[1]]  # idle: no waiting for company
        rest = [asyncio.create_task(c(i)) for i in (2, 3, 4)]
        await settle()
        assert callee.calls == [[1]]  # the one slot is busy: they wait here
        callee.release(0)
        await settle()
        assert callee.calls == [[1], [2, 3, 4]]  # one call for all three
        callee.release(1)
        assert await first == 2 and await asyncio.gather(*rest) == [4, 6, 8]
        assert c.stats() == {"calls": 2, "items": 4, "mean_batch": 2.0}

    asyncio.run(main())


def test_calls_in_flight_and_the_batch_size_are_bounded():
    async def main():
        callee = Callee()
        c = Coalescer(callee, max_batch=2, max_in_flight=2)
        tasks = [asyncio.create_task(c(i)) for i in range(7)]
        await settle()
        assert callee.calls == [[0], [1]] or callee.calls == [[0, 1], [2, 3]]
        assert len(callee.calls) == 2  # two slots, both busy
        for k in range(6):
            if k < len(callee.gates):
                callee.release(k)
            await settle()
        assert all(len(b) <= 2 for b in callee.calls)
        assert sorted(i for b in callee.calls for i in b) == list(range(7))  # each item sent once
        assert await asyncio.gather(*tasks) == [2 * i for i in range(7)]

    asyncio.run(main())


def test_a_failed_call_fails_its_own_batch_only():
    async def main():
        callee = Callee()
        c = Coalescer(callee, max_batch=32, max_in_flight=1)
        first = asyncio.create_task(c(1))
        await settle()
        waiting = [asyncio.create_task(c(i)) for i in (2, 3)]
        await settle()
        callee.fail = ConnectionError("embedder replica died")
        callee.release(0)
        with pytest.raises(ConnectionError, match="died"):
            await first
        await settle()
        callee.fail = None
        callee.release(1)
        assert await asyncio.gather(*waiting) == [4, 6]  # the next batch went out and answered

    asyncio.run(main())


def test_a_cancelled_caller_leaves_the_others_their_results():
    async def main():
        callee = Callee()
        c = Coalescer(callee, max_batch=32, max_in_flight=1)
        a = asyncio.create_task(c(1))
        await settle()
        b = asyncio.create_task(c(2))
        await settle()
        b.cancel()  # b waits here behind a's call; then a's call returns
        callee.release(0)
        assert await a == 2
        with pytest.raises(asyncio.CancelledError):
            await b
        await settle()
        assert callee.calls == [[1]]  # b's prompt was not sent: nobody waits for it
        assert c._in_flight == 0 and not c._pending

    asyncio.run(main())


def test_a_call_that_returns_the_wrong_number_of_results_is_an_error_for_its_callers():
    async def short(items):
        return items[:-1]

    async def main():
        c = Coalescer(short, max_in_flight=1)
        with pytest.raises(RuntimeError, match="1 results for 2 items"):
            await asyncio.gather(c("a"), c("b"))

    asyncio.run(main())


def test_bounds_are_checked():
    async def send(items):
        return items

    with pytest.raises(ValueError):
        Coalescer(send, max_batch=0)
    with pytest.raises(ValueError):
        Coalescer(send, max_in_flight=0)


def _router(tmp_path, embedder: FakeHandle, embedder_replicas: int = 1, **router_cfg):
    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.backends import CompletionResult
    from deployments.router import Router

    ckpt = save_checkpoint(make_policy("linucb", MODELS, D, tau=0.01, seed=0), tmp_path / "linucb.pt")
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt)},
            "router": router_cfg,
            "embedder": {"num_replicas": embedder_replicas},
            "models": [{"name": m} for m in MODELS],
        }
    )

    async def answer(req):
        return CompletionResult(text="ok", cost_usd=0.001, input_tokens=1, output_tokens=1, latency_s=0.01)

    return Router.func_or_class(cfg, embedder, {m: FakeHandle(complete=answer) for m in MODELS})


def _vec(text: str) -> np.ndarray:
    x = np.zeros(D, dtype=np.float32)
    x[len(text) % D] = 1.0
    return x


def _req(text: str):
    from deployments.router import RouteRequest

    return RouteRequest(request_id=text, messages=[{"role": "user", "content": text}], prompt=text, preference=(1.0, 0.0))


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_router_sends_concurrent_prompts_in_few_embedder_calls_and_each_request_gets_its_own(tmp_path, coalesce):
    singles: list[str] = []
    lists: list[list[str]] = []

    async def one(text):
        singles.append(text)
        await asyncio.sleep(0.01)
        return _vec(text)

    async def many(texts):
        lists.append(list(texts))
        await asyncio.sleep(0.01)  # the embedder is busy: what arrives meanwhile waits in the router
        return np.stack([_vec(t) for t in texts])

    router = _router(tmp_path, FakeHandle(__call__=one, embed_many=many), coalesce_embeds=coalesce)
    prompts = ["q" * n for n in range(1, 9)]

    async def main():
        return await asyncio.gather(*(router.route(_req(p)) for p in prompts))

    asyncio.run(main())
    events = {e["request_id"]: e for e in router.recent_events(20) if e["kind"] == "decision"}
    for p in prompts:  # every decision was made on its own prompt's embedding
        assert events[p]["context"] == _vec(p).tolist()
    if coalesce:
        assert singles == [] and sorted(t for b in lists for t in b) == sorted(prompts)
        assert len(lists) < len(prompts)  # fewer calls than requests: the first alone, the rest together
        assert router.info()["embedder_calls"] == {"calls": len(lists), "items": 8, "mean_batch": 8 / len(lists)}
    else:
        assert lists == [] and sorted(singles) == sorted(prompts)
        assert router.info()["embedder_calls"] is None


def test_calls_in_flight_default_to_two_per_embedder_replica(tmp_path):
    async def one(text):
        return _vec(text)

    assert _router(tmp_path, FakeHandle(__call__=one)).coalescer.max_in_flight == 2
    assert _router(tmp_path, FakeHandle(__call__=one), embedder_replicas=3).coalescer.max_in_flight == 6
    assert _router(tmp_path, FakeHandle(__call__=one), embed_calls_in_flight=5).coalescer.max_in_flight == 5
    assert _router(tmp_path, FakeHandle(__call__=one), embed_timeout_s=2.5).coalescer.timeout_s == 2.5


def test_a_cancelled_call_slot_fails_its_batch_and_what_waits_behind_it():
    """The replica shuts down mid-call: nobody is left waiting for an answer that will never come."""

    async def main():
        callee = Callee()
        c = Coalescer(callee, max_batch=32, max_in_flight=1)
        first = asyncio.create_task(c(1))
        await settle()
        waiting = asyncio.create_task(c(2))
        await settle()
        for task in list(c._tasks):
            task.cancel()
        await settle()
        for t in (first, waiting):
            with pytest.raises(RuntimeError, match="cancelled"):
                await asyncio.wait_for(t, 1)
        assert c._in_flight == 0 and not c._pending

    asyncio.run(main())


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_a_call_slot_does_not_carry_the_context_of_the_request_that_started_it(timeout_s):
    """A slot sends many requests' prompts. Started in one request's context it carried that request's Serve
    context, and Serve cancels a request's child calls when the request is cancelled (its client left): one
    client's disconnect would have failed everyone's prompts in the call."""
    import contextvars

    request = contextvars.ContextVar("request", default=None)
    seen: list = []

    async def send(items):
        seen.append(request.get())
        await asyncio.sleep(0.01)
        return items

    async def caller(c, name, item):
        request.set(name)
        return await c(item)

    async def main():
        c = Coalescer(send, max_in_flight=1, timeout_s=timeout_s)
        return await asyncio.gather(*(caller(c, f"r{i}", i) for i in range(6)))

    assert asyncio.run(main()) == list(range(6))
    assert seen and all(v is None for v in seen)


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_a_call_the_callee_cancels_fails_its_own_batch_and_the_same_slot_sends_the_next(timeout_s):
    calls: list[tuple[list, asyncio.Task]] = []

    async def send(items):
        calls.append((list(items), asyncio.current_task()))
        await asyncio.sleep(0.01)
        if len(calls) == 1:
            raise asyncio.CancelledError()  # the callee's side cancelled this call, not the slot
        return items

    async def main():
        c = Coalescer(send, max_in_flight=1, timeout_s=timeout_s)
        first = asyncio.create_task(c("a"))
        await settle()
        second = asyncio.create_task(c("b"))  # queued behind "a", in the one slot
        await settle()
        with pytest.raises(RuntimeError, match="cancelled by its callee"):
            await first
        assert await asyncio.wait_for(second, 1) == "b"
        assert [items for items, _ in calls] == [["a"], ["b"]] and len(c._tasks) == 0 and c._in_flight == 0

    asyncio.run(main())


def test_calls_one_after_another_each_find_a_free_slot():
    """A slot is freed in the step that finds nothing waiting: a caller arriving right after must not wait on a
    slot that is about to end (an earlier version failed every other such call as cancelled)."""

    async def send(items):
        return items

    async def main():
        c = Coalescer(send, max_in_flight=1, timeout_s=5.0)
        return [await c(i) for i in range(6)]  # awaited directly: no extra task, no extra loop turn between

    assert asyncio.run(main()) == list(range(6))


def test_a_slot_cancelled_before_its_first_step_frees_itself_and_fails_its_callers():
    """Cancelled before it ran, a slot's `finally` never runs: the slot must still be freed, or every later
    call waits for a slot that will never come back."""

    async def send(items):
        return items

    async def main():
        c = Coalescer(send, max_in_flight=1)
        first = asyncio.create_task(c("a"))
        await asyncio.sleep(0)  # first has queued its item and started a slot task, which has not run yet
        (slot,) = c._tasks
        slot.cancel()
        with pytest.raises(RuntimeError, match="cancelled"):
            await asyncio.wait_for(first, 1)
        assert c._in_flight == 0 and not c._pending
        assert await asyncio.wait_for(c("b"), 1) == "b"  # a new slot serves later calls

    asyncio.run(main())


def test_a_call_with_no_answer_times_out_for_its_batch_only_and_its_slot_sends_what_waits():
    hang = asyncio.Event()
    cancelled: list[list] = []

    async def send(items):
        if "stuck" in items:
            try:
                await hang.wait()
            except asyncio.CancelledError:
                cancelled.append(list(items))  # the call itself is cancelled (the router then cancels its handle call)
                raise
        return items

    async def main():
        c = Coalescer(send, max_in_flight=1, timeout_s=0.1)
        stuck = asyncio.create_task(c("stuck"))
        await settle()
        behind = asyncio.create_task(c("behind"))  # waits behind the stuck call, in the one slot
        with pytest.raises(TimeoutError, match="within 0.1 s"):
            await asyncio.wait_for(stuck, 2)
        assert await asyncio.wait_for(behind, 1) == "behind"
        await settle()
        assert cancelled == [["stuck"]] and c._in_flight == 0

    asyncio.run(main())


def test_an_error_the_call_raises_reaches_its_callers_as_it_is():
    async def send(items):
        raise TimeoutError("the handle's own timeout")

    async def main():
        c = Coalescer(send, max_in_flight=1, timeout_s=5.0)
        with pytest.raises(TimeoutError, match="the handle's own timeout"):
            await c("a")

    asyncio.run(main())


def test_one_of_two_slots_cancelled_leaves_the_waiting_prompts_to_the_other():
    async def main():
        callee = Callee()
        c = Coalescer(callee, max_batch=32, max_in_flight=2)
        a = asyncio.create_task(c(1))
        await settle()
        b = asyncio.create_task(c(2))
        await settle()
        assert callee.calls == [[1], [2]]  # both slots busy
        waiting = asyncio.create_task(c(3))
        await settle()
        callee.slots[0].cancel()  # the slot that carries [1]
        with pytest.raises(RuntimeError, match="cancelled"):
            await asyncio.wait_for(a, 1)
        callee.release(1)
        await settle()
        assert callee.calls[-1] == [3]  # the surviving slot sent what waited
        callee.release(2)
        assert await asyncio.wait_for(b, 1) == 4 and await asyncio.wait_for(waiting, 1) == 6

    asyncio.run(main())


def test_the_coalescer_refuses_a_non_positive_timeout():
    async def send(items):
        return items

    with pytest.raises(ValueError, match="timeout_s"):
        Coalescer(send, timeout_s=0)


def test_the_router_gives_up_on_a_silent_embedder_and_cancels_its_call(tmp_path):
    """router.embed_timeout_s: the request fails, and the embedder's call is cancelled, not left queued there."""
    cancelled = []

    async def one(text):
        return _vec(text)

    async def silent(texts):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(list(texts))
            raise

    class Response:
        """Like Serve's DeploymentResponse: cancelling the task that awaits it does not cancel the call; only
        its own cancel() does."""

        def __init__(self, coro):
            self.task = asyncio.ensure_future(coro)

        def __await__(self):
            return asyncio.shield(self.task).__await__()

        def cancel(self):
            self.task.cancel()

    embedder = FakeHandle(__call__=one)
    embedder.embed_many = SimpleNamespace(remote=lambda texts: Response(silent(texts)))
    router = _router(tmp_path, embedder, embed_timeout_s=0.1)

    async def main():
        with pytest.raises(TimeoutError, match="no answer within 0.1 s"):
            await asyncio.wait_for(router.route(_req("q")), 5)
        await settle()
        assert cancelled == [["q"]]  # here, not after asyncio.run, which cancels every task left anyway
        assert router.coalescer._in_flight == 0

    asyncio.run(main())


def test_a_send_that_fails_before_it_returns_or_answers_no_rows_fails_its_callers_and_nothing_hangs():
    def refuses(items):  # a plain function that raises instead of returning an awaitable
        raise RuntimeError("handle refused the call")

    async def shapeless(items):
        return np.float32(1.0)  # no rows to hand out

    async def main():
        for send, match in ((refuses, "refused"), (shapeless, "not one result per item")):
            c = Coalescer(send, max_in_flight=1, timeout_s=5.0)
            first = asyncio.create_task(c("a"))
            await settle()
            behind = asyncio.create_task(c("b"))
            for t in (first, behind):
                with pytest.raises(RuntimeError, match=match):
                    await asyncio.wait_for(t, 1)
            assert c._in_flight == 0 and not c._pending and not c._tasks

    asyncio.run(main())
