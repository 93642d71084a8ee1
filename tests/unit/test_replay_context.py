"""The replay backend answers a prompt it has not logged from its nearest logged prompt, by the embedding the
router sends in `CompletionRequest.context` (a list of floats; an array works the same) without embedding the
prompt again."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from banditrouter.config import ReplayBackendConfig
from deployments.backends.base import CompletionRequest
from deployments.backends.replay import ReplayBackend

PROMPTS = ("one", "two", "three")


class _OneHot:
    """Embeds the log's prompts as one-hot vectors; refuses anything else (the context must be used)."""

    def embed(self, texts):
        return np.stack([np.eye(3, dtype=np.float32)[PROMPTS.index(t)] for t in texts])


@pytest.fixture
def backend(tmp_path):
    path = tmp_path / "log.jsonl"
    with path.open("w") as fh:
        for i, p in enumerate(PROMPTS):
            row = {"id": f"p{i}", "prompt": p, "outcomes": {"a": {"score": 1, "cost": 0.1, "response": f"A{i}"}}}
            fh.write(json.dumps(row) + "\n")
    return ReplayBackend("a", ReplayBackendConfig(dataset=str(path), simulate_latency=False), embedder=_OneHot())


@pytest.mark.parametrize("as_array", [True, False])
def test_an_unlogged_prompt_is_answered_from_the_nearest_by_the_routers_embedding(backend, as_array):
    x = np.array([0.1, 0.2, 0.9], dtype=np.float32)  # nearest: "three"
    req = CompletionRequest("r", [{"role": "user", "content": "unseen"}], "unseen", context=x if as_array else x.tolist())
    out = asyncio.run(backend.complete(req))
    assert out.text == "A2"


def _log(tmp_path, prompts=PROMPTS):
    path = tmp_path / "log.jsonl"
    with path.open("w") as fh:
        for i, p in enumerate(prompts):
            outcomes = {m: {"score": 1, "cost": 0.1, "response": f"{m}{i}"} for m in ("a", "b")}
            fh.write(json.dumps({"id": f"p{i}", "prompt": p, "outcomes": outcomes}) + "\n")
    return path


def test_replay_indexes_are_embedded_once_beforehand_and_replicas_read_them_from_the_cache(tmp_path, monkeypatch):
    """A cold embedding cache made every replay replica load the embedder and embed the whole log at its first
    unlogged prompt, all at once (`banditrouter bench` timed out in its warm-up on a fresh machine).
    `warm_replay_indexes` embeds each log once, in the caller's process; a replica then computes nothing."""
    from banditrouter.config import ModelConfig
    from banditrouter.data.paths import CACHE_DIR_ENV
    from banditrouter.embeddings import Embedder
    from deployments.backends.replay import warm_replay_indexes

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    encoded: list[str] = []

    def fake_encode(self, texts, progress=False):
        encoded.extend(texts)
        self.n_computed += len(texts)
        return np.stack([np.eye(3, dtype=np.float32)[PROMPTS.index(t)] for t in texts])

    monkeypatch.setattr(Embedder, "encode", fake_encode)
    replay = {"dataset": str(_log(tmp_path)), "simulate_latency": False}
    models = [ModelConfig(name=m, replay=replay) for m in ("a", "b")] + [
        ModelConfig(
            name="up",
            backend="openai",
            openai={"base_url": "http://127.0.0.1:9/v1"},
            input_price_per_mtok=1.0,
            output_price_per_mtok=2.0,
        )
    ]
    assert warm_replay_indexes(models, progress=False) == 3  # two models on one log: embedded once
    assert sorted(encoded) == sorted(PROMPTS)
    assert warm_replay_indexes(models, progress=False) == 0  # a second start finds them cached
    backend = ReplayBackend("b", ReplayBackendConfig(**replay))  # its own Embedder, as in a replica
    out = asyncio.run(backend.complete(CompletionRequest("r", [], "unseen", context=[0.0, 0.9, 0.1])))
    assert out.text == "b1" and backend._embedder.n_computed == 0 and len(encoded) == 3


def test_warming_refuses_a_model_the_log_cannot_replay_before_embedding_anything(tmp_path, monkeypatch):
    from banditrouter.config import ModelConfig
    from banditrouter.data.paths import CACHE_DIR_ENV
    from banditrouter.embeddings import Embedder
    from deployments.backends import BackendError
    from deployments.backends.replay import warm_replay_indexes

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(Embedder, "encode", lambda *a, **k: pytest.fail("embedded before the check"))
    replay = {"dataset": str(_log(tmp_path)), "simulate_latency": False}
    with pytest.raises(BackendError, match="'nobody' is not in"):
        warm_replay_indexes([ModelConfig(name="a", replay=replay), ModelConfig(name="nobody", replay=replay)])
