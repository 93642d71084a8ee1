from __future__ import annotations

import numpy as np
import pytest

from banditrouter.embeddings import EMBEDDING_DIM, Embedder, EmbeddingCache


def test_embeddings_are_cached_on_disk(tmp_path):
    texts = ["What is 2 + 2?", "Write a haiku about queues.", "What is 2 + 2?", "Ünïcødé ✓ prompt"]
    first = Embedder(cache=EmbeddingCache(tmp_path / "e.sqlite"))
    a = first.embed(texts)
    assert a.shape == (4, EMBEDDING_DIM) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a[0], a[2])
    assert first.n_computed == 3, "a duplicate text is embedded once"
    # a new process (new Embedder, same file) embeds nothing again, and never loads the model
    second = Embedder(cache=EmbeddingCache(tmp_path / "e.sqlite"))
    b = second.embed(texts)
    assert second.n_computed == 0 and second._model is None
    np.testing.assert_array_equal(a, b)
    # the cache is keyed by model name too
    other = EmbeddingCache(tmp_path / "e.sqlite", model="another-model")
    assert other.get_many(["x"]) == {}


def test_semantics_survive(tmp_path):
    e = Embedder(cache=EmbeddingCache(tmp_path / "e.sqlite"))
    v = e.embed(["How do I sort a list in Python?", "Python: sorting a list", "Recipe for banana bread"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def _plan_cost(plan, lengths):
    from banditrouter.embeddings import FORWARD_ROWS

    return sum(FORWARD_ROWS + len(p) * max(lengths[i] for i in p) for p in plan)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1 :]]


def test_plan_batches_keeps_short_prompts_out_of_long_batches():
    """A short prompt among full-length ones gets its own pass instead of being padded to 256 tokens, and at
    most two full-length prompts share a pass (three or more ran slower per prompt on this machine kind)."""
    from banditrouter.embeddings import plan_batches

    lengths = [256, 256, 20, 256, 256, 250]
    plan = plan_batches(lengths, max_batch=32)
    assert sorted(i for p in plan for i in p) == list(range(6))  # every text once
    assert [2] in plan, plan  # the short one alone
    assert all(len(p) <= 2 for p in plan if max(lengths[i] for i in p) > 200), plan
    padded = sum(len(p) * max(lengths[i] for i in p) for p in plan)
    assert padded < len(lengths) * 256 - 200, padded
    # short prompts batch together (one forward's fixed cost is worth about 33 token rows), within max_batch:
    # two passes (which two is a tie: every split of 50 equal-ish texts into two passes of at most 32 costs the same)
    short = plan_batches([30] * 40 + [28] * 10, max_batch=32)
    assert len(short) == 2 and max(map(len, short)) <= 32 and sorted(i for p in short for i in p) == list(range(50))
    assert plan_batches([], max_batch=8) == [] and plan_batches([5], max_batch=1) == [[0]]
    with pytest.raises(ValueError, match="max_batch"):
        plan_batches([5], max_batch=0)


def test_plan_batches_is_optimal_against_every_partition():
    """The DP's plan costs no more than the cheapest of all set partitions that keep max_batch and the
    attention cap (random small cases, every partition enumerated)."""
    from banditrouter.embeddings import ATTENTION_CAP, plan_batches

    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 8))
        lengths = [int(x) for x in rng.choice([8, 20, 30, 64, 100, 128, 181, 200, 256], size=n)]
        max_batch = int(rng.integers(1, 5))
        plan = plan_batches(lengths, max_batch)
        assert sorted(i for p in plan for i in p) == list(range(n))

        def fits(p, max_batch=max_batch, lengths=lengths):
            return len(p) <= max_batch and (len(p) == 1 or len(p) * max(lengths[i] for i in p) ** 2 <= ATTENTION_CAP)

        assert all(fits(p) for p in plan), plan
        best = min(_plan_cost(part, lengths) for part in _partitions(list(range(n))) if all(fits(p) for p in part))
        assert _plan_cost(plan, lengths) == best, (lengths, max_batch, plan)


def test_encode_runs_the_planned_passes_and_keeps_the_order(monkeypatch):
    """On the CPU, Embedder.encode runs one sentence-transformers call per planned pass (before: one padded batch
    of everything) and returns the vectors in the input order, equal to encoding each text alone."""
    e = Embedder(cache=False, batch_size=32)
    long = " Explain the difference between a process and a thread in detail." * 40  # over 256 tokens
    texts = ["A:" + long, "Hi there", "B:" + long, "C:" + long, "What is 2 + 2?", "D:" + long]
    model = e.model
    calls = []
    real = type(model).encode

    def spy(self, batch, **kw):
        calls.append(sorted(texts.index(t) for t in batch))
        return real(self, batch, **kw)

    monkeypatch.setattr(type(model), "encode", spy)
    got = e.encode(texts)
    assert [1, 4] in calls, calls  # the two short ones together, the long ones in pairs
    assert all(len(c) == 2 for c in calls), calls
    monkeypatch.setattr(type(model), "encode", real)
    alone = np.stack([e.encode([t])[0] for t in texts])
    np.testing.assert_allclose(got, alone, atol=1e-5)
    assert min(float(got[i] @ got[j]) for i in (0, 2, 3, 5) for j in (0, 2, 3, 5) if i != j) < 0.9999  # distinct texts
    assert e.n_computed == len(texts) * 2
