from __future__ import annotations

import numpy as np

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
