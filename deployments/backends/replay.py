"""Replay backend: answers with the real logged response and cost of this model for this prompt.

A prompt found in the log (same text) gets that row's answer; any other prompt gets the answer logged for
the nearest logged prompt by embedding cosine, flagged `{"match": "nearest", "similarity": s}`. Optional
simulated latency (time to first token + output tokens / speed) lets load and queues behave realistically.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from banditrouter.config import ModelConfig, ReplayBackendConfig
from banditrouter.embeddings import text_key
from deployments.backends.base import BackendError, CompletionRequest, CompletionResult, estimate_tokens, stream_text


def answerable_rows(log, name: str) -> list[int]:
    """Rows of a routing log the replay backend answers `name` from: a logged response and a finite cost."""
    k = log.models.index(name)
    return [i for i in range(len(log)) if log.responses[i][k] is not None and np.isfinite(log.costs[i, k])]


def replay_rows(log, name: str) -> list[int]:
    """The rows a replay model answers from, or a BackendError saying why it cannot replay from this log."""
    if name not in log.models:
        raise BackendError(f"replay: model {name!r} is not in {log.name} (it has {list(log.models)})")
    if log.responses is None:
        raise BackendError(f"replay: {log.name} has no logged responses to replay")
    if not (keep := answerable_rows(log, name)):
        raise BackendError(f"replay: {log.name} has no logged answers of {name!r}")
    return keep


def max_logged_cost(log, name: str) -> float:
    """Pricing for budgets: the most this replay model can charge one request is the largest logged cost among
    the rows it answers from (every answer, exact or nearest match, is one of those rows, at its logged cost)."""
    rows = replay_rows(log, name)  # the same refusals as the replay backend's, with its messages
    return float(np.max(log.costs[rows, log.models.index(name)]))


def warm_replay_indexes(models: Sequence[ModelConfig], embedder=None, progress: bool = True) -> int:
    """Embed, once and in this process, the logged prompts that the replay models' nearest-prompt indexes hold,
    into the on-disk embedding cache, so every replay replica reads its index from the cache. Without it, on a
    machine whose cache lacks them, each replica loads its own embedder on its first unlogged prompt and embeds
    the log itself, all at once: 11 replicas of `configs/local.yaml` took minutes on 2 cores and a model's memory
    each, and `banditrouter bench` timed out in its warm-up. `banditrouter serve` and `bench` call this before
    they deploy. Returns how many prompts were embedded (0 when the cache had them all)."""
    from banditrouter.data import load_dataset
    from banditrouter.embeddings import Embedder

    by_log: dict[tuple, list[str]] = {}
    for m in models:
        if m.backend == "replay" and m.replay:
            by_log.setdefault((m.replay.dataset, m.replay.split, m.replay.data_dir), []).append(m.name)
    if not by_log:
        return 0
    logs = []
    for (dataset, split, data_dir), names in sorted(by_log.items(), key=str):
        log = load_dataset(dataset, split, data_dir=data_dir)
        for name in names:  # what a replica would refuse, refused before minutes of embedding, not after
            replay_rows(log, name)
        logs.append((log, split))
    embedder = embedder if embedder is not None else Embedder()
    before = embedder.n_computed
    for log, split in logs:
        embedder.embed(list(log.prompts), progress=progress, desc=f"replay index {log.name}/{split}")
    return embedder.n_computed - before


class ReplayBackend:
    def __init__(self, name: str, cfg: ReplayBackendConfig, embedder=None):
        from banditrouter.data import load_dataset

        self.name, self.cfg = name, cfg
        log = load_dataset(cfg.dataset, cfg.split, data_dir=cfg.data_dir)
        keep = replay_rows(log, name)
        k = log.models.index(name)
        self.prompts = [log.prompts[i] for i in keep]
        self.prompt_ids = [log.prompt_ids[i] for i in keep]
        self.responses = [log.responses[i][k] for i in keep]
        self.costs = log.costs[keep, k]
        self.by_key = {text_key(p): j for j, p in enumerate(self.prompts)}
        self._embedder = embedder
        self._index: np.ndarray | None = None  # log prompt embeddings, built on the first miss

    def _nearest(self, request: CompletionRequest) -> tuple[int, float]:
        from banditrouter.embeddings import Embedder

        if self._embedder is None:
            self._embedder = Embedder()
        if self._index is None:
            self._index = self._embedder.embed(self.prompts)
        x = (
            np.asarray(request.context, dtype=np.float32)
            if request.context is not None
            else self._embedder.embed([request.prompt])[0]
        )
        sims = self._index @ x
        j = int(sims.argmax())
        return j, float(sims[j])

    def lookup(self, request: CompletionRequest) -> tuple[int, dict]:
        j = self.by_key.get(text_key(request.prompt))
        if j is not None:
            return j, {"match": "exact", "prompt_id": self.prompt_ids[j]}
        j, sim = self._nearest(request)
        return j, {"match": "nearest", "prompt_id": self.prompt_ids[j], "similarity": round(sim, 4)}

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        t0 = time.perf_counter()
        if text_key(request.prompt) in self.by_key:
            j, info = self.lookup(request)
        else:  # nearest-prompt search may have to build the index: off the event loop
            j, info = await asyncio.to_thread(self.lookup, request)
        text = self.responses[j]
        n_out = estimate_tokens(text)
        if self.cfg.simulate_latency:
            await asyncio.sleep(self.cfg.base_latency_s + n_out / self.cfg.tokens_per_s)
        return CompletionResult(
            text=text,
            cost_usd=float(self.costs[j]),
            input_tokens=estimate_tokens(request.prompt),
            output_tokens=n_out,
            latency_s=time.perf_counter() - t0,
            info={"backend": "replay", **info},
        )

    async def stream(self, request: CompletionRequest):
        result = await self.complete(request)
        async for piece in stream_text(result):
            yield piece

    def check_health(self) -> None:
        if not self.responses:
            raise BackendError("replay backend holds no answers")
