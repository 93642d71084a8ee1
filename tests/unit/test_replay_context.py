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
