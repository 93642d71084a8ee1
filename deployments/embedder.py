"""Embedder deployment: all-MiniLM-L6-v2, CPU here, GPU when present. A router that coalesces its calls sends
lists, each a batch that encodes at once; single calls are batched by `serve.batch`.

`embedder.backend` picks torch fp32 (default), ONNX Runtime, or ONNX Runtime int8 (CPU only); the first
replica to start exports the ONNX model into the shared cache dir, the others wait for it (file lock)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

from banditrouter.config import EmbedderConfig
from banditrouter.embeddings import EMBEDDING_DIM
from banditrouter.threads import limit_blas_threads
from deployments.coalesce import Coalescer


def loop_max_chars(cfg: EmbedderConfig, device: str) -> int:
    """The longest prompt a batch may hold and still encode on the replica's event loop (0: never).

    Only where it was measured: torch on the CPU without the embedding cache. On a GPU, or with ONNX Runtime,
    the encode releases the GIL, so a worker thread costs the loop little; with the cache, the encode also
    reads and writes SQLite, which must not block the loop."""
    if cfg.backend != "torch" or device != "cpu" or cfg.cache:
        return 0
    return cfg.encode_on_loop_max_chars


@serve.deployment(name="embedder")
class EmbedderDeployment:
    def __init__(self, cfg: EmbedderConfig):
        limit_blas_threads()  # numpy's pool; torch's is set below
        import torch

        from banditrouter.embeddings import Embedder, embedder_device

        device = embedder_device(cfg)
        threads = cfg.num_threads or max(1, int(cfg.ray_actor_options.get("num_cpus", 1) or 1))
        torch.set_num_threads(threads)
        self.embedder = Embedder(
            device=device, batch_size=cfg.batch_size, cache=cfg.cache, backend=cfg.backend, num_threads=threads
        )
        self._encode = self.embedder.embed if cfg.cache else self.embedder.encode
        self.loop_max_chars = loop_max_chars(cfg, device)
        self.embedder.encode(["warm up"])  # load the model before the first request
        self._init_batching(cfg.batch_size, cfg.batch_wait_timeout_s)
        from banditrouter.metrics import EmbedderMetrics

        self.metrics = EmbedderMetrics()
        self.batches = self.prompts = self.calls = 0  # calls: handle calls taken (a coalesced list is one)
        self.busy_s = 0.0

    def _init_batching(self, batch_size: int, batch_wait_timeout_s: float) -> None:
        """Single calls: `serve.batch` with these settings. Lists (`embed_many`): a `Coalescer` with one call in
        flight, so a list encodes at once unless another list is encoding (it may still wait on the lock behind a
        batch of single calls). One lock: one encode at a time, whichever way it came (the replica's CPUs)."""
        self.embed_batch.set_max_batch_size(batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._lists = Coalescer(self._encode_batch, max_batch=batch_size, max_in_flight=1)
        self._lock = asyncio.Lock()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Single-prompt calls (`__call__`), batched by Serve: it waits up to `batch_wait_timeout_s` for a batch
        to fill."""
        return list(await self._encode_batch(texts))

    async def _encode_batch(self, texts: list[str]) -> np.ndarray:
        async with self._lock:
            t0 = time.perf_counter()
            if self.loop_max_chars and max(map(len, texts)) <= self.loop_max_chars:
                # short prompts: encode on the loop; requests that arrive meanwhile queue and form the next batch
                # (README, "Routing overhead": +43% routed on 200-character prompts)
                vecs = self._encode(texts)
            else:
                # long prompts: in a worker thread, as before (on the loop measured slower on RouterBench prompts)
                vecs = await asyncio.to_thread(self._encode, texts)
            took = time.perf_counter() - t0
        self.batches, self.prompts, self.busy_s = self.batches + 1, self.prompts + len(texts), self.busy_s + took
        self.metrics.batch_size.observe(float(len(texts)))
        self.metrics.batch_s.observe(took)
        return vecs

    def stats(self) -> dict:
        """Batches formed, prompts embedded, their mean batch size, the seconds spent encoding and the handle
        calls taken."""
        return {
            "batches": self.batches,
            "prompts": self.prompts,
            "mean_batch_size": self.prompts / self.batches if self.batches else None,
            "busy_s": self.busy_s,
            "calls": self.calls,
        }

    async def __call__(self, text: str) -> np.ndarray:
        self.calls += 1
        return await self.embed_batch(text)

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        """Several prompts in one call (a router that coalesces its calls, `router.coalesce_embeds`). The list is
        a batch already: it encodes at once, with no `serve.batch` wait (README, "Routing overhead"). Lists that
        arrive while one encodes (a router keeps up to `router.embed_calls_in_flight` calls outstanding, and
        there may be several routers) wait and encode together when it ends (`Coalescer`, one call at a time)."""
        self.calls += 1
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack(await asyncio.gather(*map(self._lists, texts)))
