"""The response path never waits on, or loses to, the learning path (without Ray): the router's
`DecisionShipper` (bounded queue, bounded sends, local spill, in-order re-delivery, adoption of a dead
replica's spill), and the router itself with fake handles: it answers while the buffer hangs, and a model
call that fails or times out is logged as a decision with that outcome before the error goes out."""

from __future__ import annotations

import asyncio
import fcntl
import json
import time

import numpy as np
import pytest
from factories import FakeHandle

from banditrouter.schemas import DecisionEvent
from deployments.backends import BackendError, CompletionResult
from deployments.delivery import DecisionShipper

WAIT_S = 10.0  # every wait below is bounded by this


def event(i: int) -> dict:
    return {"event_id": f"e{i}", "kind": "decision", "decision_id": f"d{i}", "n": i}


async def until(pred, timeout_s: float = WAIT_S) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


class FakeBuffer:
    """An async send function whose behaviour the test switches: ok, failing, or hanging."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.received: list[dict] = []
        self.calls = 0

    async def send(self, batch: list[dict]) -> int:
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            raise ConnectionError("buffer restarting")
        self.received.extend(batch)
        return len(batch)

    def ids(self) -> list[str]:
        seen: dict[str, None] = {}  # at-least-once: the buffer dedupes by event id; keep first-seen order
        for e in self.received:
            seen.setdefault(e["event_id"])
        return list(seen)


def spill_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_submit_never_waits_and_a_hung_buffer_gets_spilled(tmp_path):
    async def main():
        buf = FakeBuffer("hang")
        sh = DecisionShipper(buf.send, tmp_path / "r1.jsonl", timeout_s=0.2, retry_s=0.05)
        t0 = time.perf_counter()
        for i in range(3):
            sh.submit(event(i))
        assert time.perf_counter() - t0 < 0.05  # the response path only enqueues
        assert await until(lambda: sh.stats()["spill_pending"] == 3)
        assert [e["event_id"] for e in spill_lines(sh.spill_path)] == ["e0", "e1", "e2"]
        assert sh.stats()["failed_sends"] >= 1 and "Timeout" in sh.stats()["last_error"]
        sh.close()

    asyncio.run(main())


def test_spill_is_redelivered_in_order_then_truncated(tmp_path):
    async def main():
        buf = FakeBuffer("fail")
        seen = []
        sh = DecisionShipper(buf.send, tmp_path / "r1.jsonl", timeout_s=0.2, retry_s=0.02, batch_size=4, on_stats=seen.append)
        for i in range(10):
            sh.submit(event(i))
        assert await until(lambda: sh.stats()["spill_pending"] == 10)
        for i in range(10, 15):  # while the spill waits, new events queue behind it
            sh.submit(event(i))
        await asyncio.sleep(0.05)
        buf.mode = "ok"
        assert await sh.drain(WAIT_S)
        assert buf.ids() == [f"e{i}" for i in range(15)]  # every event, in submission order
        assert sh.spill_path.stat().st_size == 0 and sh.stats()["spill_pending"] == 0
        assert seen[-1]["spill_pending"] == 0 and max(s["spill_pending"] for s in seen) >= 10
        sh.submit(event(15))  # and the normal path works again
        assert await sh.drain(WAIT_S) and buf.ids()[-1] == "e15"
        sh.close()
        assert not sh.spill_path.exists()  # an empty spill is removed on close

    asyncio.run(main())


def test_a_full_queue_spills_instead_of_blocking(tmp_path):
    async def main():
        buf = FakeBuffer("hang")
        sh = DecisionShipper(buf.send, tmp_path / "r1.jsonl", timeout_s=0.2, max_queue=2)
        for i in range(5):  # no await in between: the background task has not taken anything yet
            sh.submit(event(i))
        assert sh.stats()["queued"] == 2 and sh.stats()["spill_pending"] == 3
        sh.close()
        assert len(spill_lines(sh.spill_path)) == 5  # close spills what was queued

    asyncio.run(main())


def test_a_decision_and_its_outcome_are_never_split(tmp_path):
    """With one free slot left, a decision and its error outcome go to the spill together (in order), not
    the decision to the queue and the outcome ahead of it to the spill."""

    async def main():
        buf = FakeBuffer("hang")
        sh = DecisionShipper(buf.send, tmp_path / "r1.jsonl", timeout_s=0.2, max_queue=2)
        sh.submit(event(0))
        sh.submit(event(1), event(2))  # one slot left for two events
        assert sh.stats()["queued"] == 1 and sh.stats()["spill_pending"] == 2
        assert [e["event_id"] for e in spill_lines(sh.spill_path)] == [event(1)["event_id"], event(2)["event_id"]]
        sh.close()

    asyncio.run(main())


def test_a_dead_replicas_spill_is_adopted_and_delivered(tmp_path):
    """A replica that died with a spill leaves an unlocked file: the next shipper delivers it (a torn last
    line from a crash mid-write is skipped); a live replica's locked file is left alone."""

    async def main():
        dead = tmp_path / "dead.jsonl"
        dead.write_bytes(b"".join(json.dumps(event(i)).encode() + b"\n" for i in range(3)) + b'{"event_id": "e9", "tor')
        alive = tmp_path / "alive.jsonl"
        alive.write_bytes(json.dumps(event(7)).encode() + b"\n")
        with open(alive, "ab") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            buf = FakeBuffer("ok")
            sh = DecisionShipper(buf.send, tmp_path / "new.jsonl", timeout_s=0.5)
            assert sh.stats()["adopted"] == 3 and not dead.exists() and alive.exists()
            sh.start()  # what the router's health check does on an idle replica
            assert await sh.drain(WAIT_S)
            assert buf.ids() == ["e0", "e1", "e2"]
            sh.close()

    asyncio.run(main())


def test_close_hands_queued_events_to_the_next_shipper(tmp_path):
    async def main():
        hung = FakeBuffer("hang")
        first = DecisionShipper(hung.send, tmp_path / "a.jsonl", timeout_s=5)
        for i in range(4):
            first.submit(event(i))
        await asyncio.sleep(0.05)  # one batch is in flight (hanging), the rest queued
        first.close()  # replica shutdown: nothing may be lost
        ok = FakeBuffer("ok")
        second = DecisionShipper(ok.send, tmp_path / "b.jsonl", timeout_s=0.5)
        second.start()
        assert await second.drain(WAIT_S)
        assert set(ok.ids()) == {f"e{i}" for i in range(4)}
        second.close()

    asyncio.run(main())


# -- the router, with fake handles --------------------------------------------------------------------------------
MODELS = ("cheap", "strong")


def _router(tmp_path, monkeypatch, model_call, buffer_send, timeout_s: float = 120.0):
    import learner.actors
    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.router import Router

    ckpt = save_checkpoint(make_policy("linucb", MODELS, 8, tau=0.01), tmp_path / "p.pt")
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt), "explore": True},
            "router": {"model_timeout_s": timeout_s},
            "learning": {"enabled": True, "state_dir": str(tmp_path / "state"), "delivery_timeout_s": 0.2},
            "models": [{"name": m} for m in MODELS],
        }
    )

    async def wait_for_weights(known, timeout_s):
        await asyncio.sleep(min(timeout_s, 0.05))

    async def noop(*_):
        return None

    buffer = FakeHandle(append_decisions=buffer_send)
    monkeypatch.setattr(learner.actors, "get_or_create_buffer", lambda cfg: buffer)
    monkeypatch.setattr(
        learner.actors, "get_or_create_learner", lambda cfg: FakeHandle(wait_for_weights=wait_for_weights, report_install=noop)
    )

    async def embed(prompt):
        return np.ones(8, dtype=np.float32) / np.sqrt(8)

    embedder = FakeHandle(__call__=embed)
    models = {m: FakeHandle(complete=model_call) for m in MODELS}
    return Router.func_or_class(cfg, embedder, models)


def _request():
    from deployments.router import RouteRequest

    return RouteRequest(
        request_id="r1", messages=[{"role": "user", "content": "hi"}], prompt="hi", preference=(0.5, 0.5), user="u"
    )


async def _answer(req):
    return CompletionResult(text="hello", cost_usd=0.002, input_tokens=1, output_tokens=1, latency_s=0.01)


def test_router_answers_while_the_buffer_hangs(tmp_path, monkeypatch):
    """Before: the router awaited the buffer's append with no timeout, so a hung buffer stalled every
    response after the model had answered (and been paid for)."""
    hung = FakeBuffer("hang")
    router = _router(tmp_path, monkeypatch, _answer, hung.send)

    async def main():
        out = await asyncio.wait_for(router.route(_request()), timeout=5)
        assert out["result"].text == "hello"
        shipper = router.shipper
        assert await until(lambda: shipper.stats()["spill_pending"] == 1)  # waiting on disk for the buffer
        hung.mode = "ok"
        assert await shipper.drain(WAIT_S)
        assert [e["decision_id"] for e in hung.received] == [out["routing"]["decision_id"]]
        router.__del__()

    asyncio.run(main())


@pytest.mark.parametrize("failure", ["error", "timeout"])
def test_a_failed_model_call_is_logged_as_its_outcome_then_raised(tmp_path, monkeypatch, failure):
    """The policy must see that an arm fails: the decision is logged with outcome error/timeout (cost 0)
    and followed by an outcome event of that kind with value 0, then the error goes to the ingress."""
    from deployments.router import ModelTimeout

    async def broken(req):
        raise BackendError("upstream 500")

    async def slow(req):
        await asyncio.sleep(30)

    buf = FakeBuffer("ok")
    router = _router(tmp_path, monkeypatch, broken if failure == "error" else slow, buf.send, timeout_s=0.2)

    async def main():
        t0 = time.perf_counter()
        with pytest.raises(BackendError if failure == "error" else ModelTimeout):
            await asyncio.wait_for(router.route(_request()), timeout=5)
        assert time.perf_counter() - t0 < 3
        assert await router.shipper.drain(WAIT_S)
        decision, outcome = buf.received
        assert decision["kind"] == "decision" and decision["outcome"] == failure and decision["cost_usd"] == 0.0
        assert decision["latency_s"] is not None and decision["model"] in MODELS
        assert (outcome["kind"], outcome["value"], outcome["decision_id"]) == (failure, 0.0, decision["decision_id"])
        recent = router.recent_events(10)
        assert [e.get("outcome", e["kind"]) for e in recent] == [failure, failure]
        router.models = {m: FakeHandle(complete=_answer) for m in MODELS}  # the replica keeps serving
        assert (await asyncio.wait_for(router.route(_request()), timeout=5))["result"].text == "hello"
        router.__del__()

    asyncio.run(main())


class _Stream:
    """What `handle.options(stream=True).stream.remote(req)` returns: an async iterator with cancel()."""

    def __init__(self, gen):
        self.gen, self.cancelled = gen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.gen.__anext__()

    def cancel(self):
        self.cancelled = True


class _StreamingModel:
    def __init__(self, gen_fn):
        self.gen_fn, self.calls = gen_fn, []

    def options(self, **_):
        return self

    @property
    def stream(self):
        return self

    def remote(self, req):
        self.calls.append(_Stream(self.gen_fn(req)))
        return self.calls[-1]


def test_a_stream_that_stalls_is_cut_at_the_timeout_and_logged(tmp_path, monkeypatch):
    """The timeout bounds a streamed answer too: the first chunks go out, then the stream is cancelled
    and the decision is logged with outcome timeout."""
    from deployments.router import ModelTimeout

    async def stalls(req):
        yield "Hello"
        await asyncio.sleep(30)
        yield "never"

    buf = FakeBuffer("ok")
    router = _router(tmp_path, monkeypatch, _answer, buf.send, timeout_s=0.3)
    model = _StreamingModel(stalls)
    router.models = {m: model for m in MODELS}

    async def main():
        items = []

        async def consume():
            async for item in router.route_stream(_request()):
                items.append(item)

        with pytest.raises(ModelTimeout):
            await asyncio.wait_for(consume(), timeout=5)
        assert items[0]["decision_id"] and items[1:] == ["Hello"] and model.calls[0].cancelled
        assert await router.shipper.drain(WAIT_S)
        assert [(e["kind"], e.get("outcome")) for e in buf.received] == [("decision", "timeout"), ("timeout", None)]
        router.__del__()

    asyncio.run(main())


def test_decision_event_outcome_defaults_to_ok():
    ev = DecisionEvent("d", "r", "m", 0, 1.0, "p", 0, (0.5, 0.5), None, None, 0.0, 0.1, "pool")
    assert ev.to_dict()["outcome"] == "ok"
