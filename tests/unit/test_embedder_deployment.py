"""The embedder deployment's batching: where the encode runs (the replica's event loop, or a worker thread)
and what batches form under concurrent calls. No Ray: the deployment class is driven on a plain event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from banditrouter.config import EmbedderConfig
from deployments.embedder import EmbedderDeployment, loop_max_chars


class _Histogram:
    def __init__(self):
        self.values: list[float] = []

    def observe(self, v: float) -> None:
        self.values.append(v)


@pytest.fixture(autouse=True)
def _replica_context(monkeypatch):
    """`serve.batch` reads the replica's max_ongoing_requests; outside Serve there is no replica to ask."""
    import ray.serve.batching

    ctx = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
    monkeypatch.setattr(ray.serve.batching.serve, "get_replica_context", lambda: ctx)
    # the batch queue belongs to the decorated method (one per replica process) and to the loop it was made
    # on: each test's asyncio.run needs a fresh one
    queue_holder = EmbedderDeployment.func_or_class.embed_batch.set_max_batch_size.__self__
    monkeypatch.setattr(queue_holder, "_queue", None)  # raises if Serve renames it


def _replica(loop_max_chars: int, encode_s: float = 0.05):
    """The deployment object without its model: `encode` records its thread and sleeps like a model would."""
    dep = object.__new__(EmbedderDeployment.func_or_class)
    calls: list[tuple[int, list[str]]] = []

    def encode(texts):
        calls.append((threading.get_ident(), list(texts)))
        time.sleep(encode_s)
        return np.stack([np.full(4, len(t), dtype=np.float32) for t in texts])

    dep._encode = encode
    dep.loop_max_chars = loop_max_chars
    dep.metrics = SimpleNamespace(batch_size=_Histogram(), batch_s=_Histogram())
    dep.batches = dep.prompts = dep.calls = 0
    dep.busy_s = 0.0
    return dep, calls


async def _burst(dep, texts):
    """One call, then the rest while the first one encodes. (The batch queue is made here, on the running loop,
    as Serve makes it on the replica's.)"""
    dep._init_batching(32, 0.0)
    first = asyncio.ensure_future(dep(texts[0]))
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(dep(t)) for t in texts[1:]]
    return await asyncio.wait_for(asyncio.gather(first, *rest), 10), threading.get_ident()


async def _trickle(dep, texts, every_s=0.005):
    """Calls that arrive one by one, every `every_s`, from another thread, as requests reach a replica while
    it encodes: on the loop they queue and form one batch; in a thread each finds the loop free."""
    dep._init_batching(32, 0.0)
    loop = asyncio.get_running_loop()

    def send():
        out = []
        for t in texts:
            out.append(asyncio.run_coroutine_threadsafe(dep(t), loop))
            time.sleep(every_s)
        return out

    futures = await asyncio.to_thread(send)
    return await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), 10)


def test_the_setting_defaults_to_512_characters_and_refuses_negatives():
    assert EmbedderConfig().encode_on_loop_max_chars == 512
    with pytest.raises(ValueError):
        EmbedderConfig(encode_on_loop_max_chars=-1)


@pytest.mark.parametrize(
    ("settings", "device", "expected"),
    [
        ({}, "cpu", 512),
        ({"encode_on_loop_max_chars": 2000}, "cpu", 2000),
        ({}, "cuda", 0),  # a GPU encode releases the GIL: the thread stays
        ({"backend": "onnx"}, "cpu", 0),  # so does ONNX Runtime's
        ({"cache": True}, "cpu", 0),  # the cache's SQLite reads and writes must not block the loop
    ],
)
def test_the_loop_is_used_only_where_it_was_measured(settings, device, expected):
    assert loop_max_chars(EmbedderConfig(**settings), device) == expected


@pytest.mark.parametrize(
    ("loop_max_chars", "texts", "on_loop"),
    [
        (512, ["a", "bb", "ccc", "dddd", "eeeee"], True),
        (0, ["a", "bb", "ccc", "dddd", "eeeee"], False),
        (512, ["x" * 600, "y" * 700, "z" * 800], False),  # long prompts: a thread, whatever the setting allows
    ],
)
def test_encode_runs_where_the_prompt_length_says_and_answers_each_caller(loop_max_chars, texts, on_loop):
    dep, calls = _replica(loop_max_chars)
    vecs, loop_thread = asyncio.run(_burst(dep, texts))
    # each caller gets its own prompt's vector, whatever batch it rode in
    assert [int(v[0]) for v in vecs] == [len(t) for t in texts]
    threads = {t for t, _ in calls}
    assert (threads == {loop_thread}) is on_loop
    assert loop_thread not in threads or on_loop
    assert dep.prompts == len(texts) and dep.batches == len(calls)
    assert dep.metrics.batch_size.values == [float(len(b)) for _, b in calls]


def test_the_longest_prompt_in_the_batch_decides():
    dep, calls = _replica(loop_max_chars=10)
    texts = ["a", "b", "x" * 11]
    _, loop_thread = asyncio.run(_burst(dep, texts))
    assert [b for _, b in calls] == [["a"], ["b", "x" * 11]]
    assert calls[0][0] == loop_thread and calls[1][0] != loop_thread


def test_zero_means_always_a_thread_even_for_empty_prompts():
    dep, calls = _replica(loop_max_chars=0)
    _, loop_thread = asyncio.run(_burst(dep, ["", ""]))
    assert loop_thread not in {t for t, _ in calls}


@pytest.mark.parametrize("on_loop", [True, False])
def test_calls_that_arrive_during_an_encode_on_the_loop_form_the_next_batch(on_loop):
    dep, calls = _replica(loop_max_chars=512 if on_loop else 0, encode_s=0.3)
    texts = [f"prompt {i}" for i in range(8)]
    asyncio.run(_trickle(dep, texts, every_s=0.005))
    batches = [b for _, b in calls]
    assert [t for b in batches for t in b] == texts
    if on_loop:
        # the first encode blocks the loop while the other seven arrive: they come through as one batch
        assert batches == [texts[:1], texts[1:]]
    else:
        assert len(batches) > 2


def test_a_list_encodes_at_once_without_the_batch_wait_and_counts_as_one_call():
    """`embed_many` (router.coalesce_embeds): the list is one batch, encoded at once, whatever
    `batch_wait_timeout_s` says (it was a minute here: a list that joined `serve.batch`'s queue waited for it)."""
    dep, calls = _replica(loop_max_chars=512, encode_s=0.0)

    async def main():
        dep._init_batching(32, 60.0)
        return await asyncio.wait_for(dep.embed_many(["a", "bbb", "cc"]), 5)

    many = asyncio.run(main())
    assert many.shape == (3, 4) and many[:, 0].tolist() == [1.0, 3.0, 2.0]
    assert [b for _, b in calls] == [["a", "bbb", "cc"]]
    assert dep.stats()["calls"] == 1 and dep.stats()["prompts"] == 3 and dep.stats()["batches"] == 1


def _gated(dep, calls):
    """The replica's encode, holding its first batch until `gate` is set (the test's other calls are then
    submitted, whether that encode blocks the loop or a thread), and counting encodes that overlap."""
    gate, running, overlaps = threading.Event(), [0], []
    encode = dep._encode

    def gated(texts):
        running[0] += 1
        overlaps.append(running[0])
        try:
            if len(calls) == 0:
                assert gate.wait(5)
            return encode(texts)
        finally:
            running[0] -= 1

    dep._encode = gated
    return gate, overlaps


def _submit_during_first_encode(loop, gate, overlaps, make_coros):
    """From another thread, as Ray hands a replica its calls (they wait while the loop encodes): once the first
    encode has begun, submit the calls, give them a moment to reach the replica's queues, then open the gate."""
    deadline = time.monotonic() + 5
    while not overlaps and time.monotonic() < deadline:
        time.sleep(0.001)
    futures = [asyncio.run_coroutine_threadsafe(c, loop) for c in make_coros()]
    time.sleep(0.05)
    gate.set()
    return futures


@pytest.mark.parametrize("on_loop", [True, False])
def test_lists_that_arrive_during_an_encode_encode_together_next(on_loop):
    """Lists that arrive while one encodes (a router's second call slot, other routers) go together as the next
    batch: one call in flight. On the thread path a single call (`__call__`, serve.batch) may encode meanwhile
    only behind the lock: never two encodes at once. (On the loop an encode blocks everything anyway.)"""
    dep, calls = _replica(loop_max_chars=512 if on_loop else 0, encode_s=0.0)
    gate, overlaps = _gated(dep, calls)

    async def main():
        dep._init_batching(32, 0.0)
        loop = asyncio.get_running_loop()

        def make_coros():
            return dep.embed_many(["ccc"]), dep.embed_many(["dddd", "eeeee"]), dep("ffffff")

        sender = asyncio.ensure_future(asyncio.to_thread(_submit_during_first_encode, loop, gate, overlaps, make_coros))
        first = await asyncio.wait_for(dep.embed_many(["a", "bb"]), 10)
        rest = await asyncio.wait_for(sender, 10)
        return first, *await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, rest)), 10)

    a, c, d, f = asyncio.run(main())
    assert a[:, 0].tolist() == [1.0, 2.0] and c[:, 0].tolist() == [3.0] and d[:, 0].tolist() == [4.0, 5.0]
    assert f[0] == 6.0
    batches = [b for _, b in calls]
    assert batches[0] == ["a", "bb"]
    assert ["ccc", "dddd", "eeeee"] in batches  # the two lists that waited: one batch
    assert sorted(t for b in batches for t in b) == ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    assert max(overlaps) == 1  # one encode at a time
    assert dep.stats()["calls"] == 4


def test_a_list_whose_caller_left_is_not_encoded_and_an_error_fails_only_its_batch():
    """A router that cancels its call (timeout, client gone) takes its prompts out of the next batch; an encode
    that raises fails the callers of that batch, and the replica goes on."""
    dep, calls = _replica(loop_max_chars=0, encode_s=0.0)
    gate, overlaps = _gated(dep, calls)
    encode = dep._encode

    def failing(texts):
        if "boom" in texts:
            raise ValueError("encode failed")
        return encode(texts)

    dep._encode = failing

    async def main():
        dep._init_batching(32, 0.0)
        first = asyncio.ensure_future(dep.embed_many(["a"]))  # encodes in a thread, held by the gate
        while not overlaps:
            await asyncio.sleep(0.001)
        left = asyncio.ensure_future(dep.embed_many(["cancelled"]))
        await asyncio.sleep(0.01)
        left.cancel()
        boom = asyncio.ensure_future(dep.embed_many(["boom"]))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.wait_for(first, 5)
        with pytest.raises(ValueError, match="encode failed"):
            await asyncio.wait_for(boom, 5)
        return await asyncio.wait_for(dep.embed_many(["after"]), 5)

    after = asyncio.run(main())
    assert after[:, 0].tolist() == [5.0]
    assert "cancelled" not in [t for _, b in calls for t in b]
    assert dep._lists.stats()["items"] == 3  # a, boom, after: the list whose caller left was never sent


def test_an_empty_list_embeds_to_no_rows():
    dep, calls = _replica(loop_max_chars=512, encode_s=0.0)
    out = asyncio.run(dep.embed_many([]))
    assert out.shape == (0, 384) and out.dtype == np.float32 and calls == []
