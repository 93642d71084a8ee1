"""Learned context features: a small linear projection of the MiniLM embedding (384 -> 64 by default).

Paper (CQB-MNL, arXiv 2602.02061, as summarised in ../shared/papers/ALGORITHMS.md): the context features are
prompt embeddings refined by contrastive learning, so that prompts the same LLMs handle well lie close.
Ours, in detail (nothing below is published):

    z = normalise(W x + b)                      x: the frozen MiniLM embedding, W: (out_dim, in_dim)
    u_i = s_i - mean(s)                         s_i: prompt i's per-model scores in the train log
    t_ij = cos(u_i, u_j)                        how alike two prompts' success patterns are
    L = mean_i CE( softmax_j(t_ij / T_t),  softmax_j(z_i . z_j / T) )   over j != i in a mini-batch

a soft-target InfoNCE: each prompt's "positives" are the other prompts of the batch, weighted by how much
their success pattern (which models succeed, which fail, relative to each model's mean) resembles its own.
Missing cells count as the model's mean (no signal). W starts as a seeded random orthogonal projection, so
an untrained `Projection` is a Johnson-Lindenstrauss style random projection (the baseline the tests compare
with); training is Adam on CPU, seeded, a few seconds on RouterBench's train split.

**Full information.** The projection is trained on every model's outcome for every train prompt (the offline
log's full table), so a policy using it is not a pure bandit learner any more: what it learns online sits on
features built from outcomes it never had to explore for. It is trained on the train split only
(`train_projection` refuses any other split), and is frozen afterwards: no policy update changes it.

A policy built with `features=Projection(...)` calls `self.project(x)` on the raw embeddings it is given and
sizes its parameters with `self.projected_dim`; the projection travels in its `state_dict` (params
`features.W`, `features.b`, and `config["features"]` with its metadata), so routers, the buffer and the
learner keep handling raw embeddings. Projections are cached as safetensors files (no pickle) under
`cache_dir()/projections/`, keyed by (dataset, split, seed, out_dim) and a hash of the training data and
settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from banditrouter.data.paths import cache_dir
from banditrouter.embeddings import EMBEDDING_DIM, MODEL_NAME
from banditrouter.policies.base import StateError

if TYPE_CHECKING:
    from banditrouter.pipeline import Split

FEATURE_KINDS = ("none", "projection")
"""What `--features` accepts: the raw embedding (unchanged behaviour) or the learned projection."""
DEFAULT_OUT_DIM = 64
_META_KEY = "banditrouter_projection"


@dataclass(frozen=True)
class ProjectionConfig:
    """How `train_projection` trains (all ours)."""

    epochs: int = 100
    """Passes over the train split."""
    batch_size: int = 512
    """Prompts per mini-batch: each prompt is contrasted with the other batch_size - 1."""
    lr: float = 1e-2
    """Adam learning rate."""
    temperature: float = 0.1
    """T: temperature of the model's similarity softmax over z_i . z_j."""
    target_temperature: float = 0.1
    """T_t: temperature of the target softmax over the success-pattern similarities t_ij."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"projection training needs epochs >= 1 and batch_size >= 2, got {self.epochs}, {self.batch_size}")
        for name in ("lr", "temperature", "target_temperature"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"projection {name} must be a positive number, got {v}")


@dataclass
class Projection:
    """z = normalise(W x + b): arrays plus what they were trained on. `W` is (out_dim, in_dim) float32."""

    W: np.ndarray
    b: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-able: dataset, split ("train"), seed, n_train, embedding_model, training settings, final loss."""

    def __post_init__(self) -> None:
        W, b = np.asarray(self.W), np.asarray(self.b)
        if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
            raise StateError(f"projection W must be a 2-D (out_dim, in_dim) array, got shape {W.shape}")
        if b.shape != (W.shape[0],):
            raise StateError(f"projection b has shape {b.shape}, expected ({W.shape[0]},)")
        if W.dtype.kind not in "fiu" or b.dtype.kind not in "fiu":
            raise StateError("projection W and b must be numeric arrays")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise StateError("projection holds non-finite values")
        if not isinstance(self.meta, dict):
            raise StateError(f"projection metadata must be a dict, got {type(self.meta).__name__}")
        for key, actual in (("in_dim", W.shape[1]), ("out_dim", W.shape[0])):
            declared = self.meta.get(key, actual)
            if not isinstance(declared, int) or declared != actual:
                raise StateError(f"projection metadata says {key}={declared!r}, but W has shape {W.shape}")
        self.W = np.ascontiguousarray(W, dtype=np.float32)
        self.b = np.ascontiguousarray(b, dtype=np.float32)
        self.meta = {**self.meta, "kind": "projection", "in_dim": self.in_dim, "out_dim": self.out_dim}

    @property
    def in_dim(self) -> int:
        return int(self.W.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.W.shape[0])

    def apply(self, contexts: np.ndarray) -> np.ndarray:
        """(n, in_dim) raw embeddings -> (n, out_dim) unit-norm float32 features."""
        return unit_affine(contexts, self.W, self.b, "the projection")

    def copy(self) -> Projection:
        return Projection(self.W.copy(), self.b.copy(), json.loads(json.dumps(self.meta)))

    # -- in a policy's state ------------------------------------------------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        """The arrays as they appear among a policy's params."""
        return {"features.W": self.W.copy(), "features.b": self.b.copy()}

    @classmethod
    def from_params(cls, params: dict[str, Any], meta: dict[str, Any] | None) -> Projection:
        """Rebuild from a policy state's params and `config["features"]`; StateError when they do not fit."""
        if not isinstance(meta, dict) or meta.get("kind") != "projection":
            raise StateError(f"checkpoint features entry {meta!r} is not a projection")
        missing = {"features.W", "features.b"} - set(params)
        if missing:
            raise StateError(f"checkpoint declares a projection but has no {sorted(missing)}")
        return cls(np.asarray(params["features.W"]), np.asarray(params["features.b"]), dict(meta))

    # -- files --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """safetensors (arrays) with the metadata as JSON in the header; written atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file({"W": self.W, "b": self.b}, str(tmp), metadata={_META_KEY: json.dumps(self.meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"projection {path} not found")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as e:  # safetensors raises several types for a corrupt or foreign file
            raise StateError(f"{path} is not a projection file: {e}") from None
        if _META_KEY not in header or set(arrays) != {"W", "b"}:
            raise StateError(f"{path} is not a banditrouter projection (arrays {sorted(arrays)})")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as e:
            raise StateError(f"{path} holds unreadable projection metadata: {e}") from None
        return cls(arrays["W"], arrays["b"], meta)


# ========================================================================================================
# ALGO LOGIC: the contrastive objective
# ========================================================================================================
def unit_affine(contexts: np.ndarray, W: np.ndarray, b: np.ndarray, what: str) -> np.ndarray:
    """normalise(W x + b) per row, float32: a learned projection's features (Projection.apply) and PILOT's
    query vectors (PreferencePrior.embed). `what` names the caller in the shape error."""
    x = np.asarray(contexts, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"{what} takes contexts of shape (n, {W.shape[1]}), got {x.shape}")
    z = x @ W.T + b
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def success_directions(scores: np.ndarray) -> np.ndarray:
    """u_i / |u_i| with u_i = s_i - mean(s): each prompt's success pattern relative to each model's mean
    (missing cells count as the mean). t_ij = their dot product. A prompt whose every score equals the
    models' means has no direction (zero row: t = 0 with everything)."""
    s = np.asarray(scores, dtype=np.float64)
    mean = np.nanmean(np.where(np.isfinite(s), s, np.nan), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)  # a model with no observed cell carries no signal
    u = np.where(np.isfinite(s), s, mean) - mean
    norm = np.linalg.norm(u, axis=1, keepdims=True)
    return np.where(norm > 1e-9, u / np.maximum(norm, 1e-9), 0.0)


def random_projection(in_dim: int = EMBEDDING_DIM, out_dim: int = DEFAULT_OUT_DIM, seed: int = 0) -> Projection:
    """The untrained starting point: a seeded random orthogonal W (rows orthonormal), b = 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    W = torch.empty(out_dim, in_dim)
    torch.nn.init.orthogonal_(W, generator=g)
    return Projection(W.numpy(), np.zeros(out_dim, np.float32), {"trained": False, "seed": seed})


def train_projection(
    split: Split,
    out_dim: int = DEFAULT_OUT_DIM,
    seed: int = 0,
    *,
    dataset: str | None = None,
    split_name: str = "train",
    config: ProjectionConfig = ProjectionConfig(),
    progress: bool = True,
) -> Projection:
    """Train z = normalise(W x + b) on `split` (contexts and the full score table of its log) with the soft
    InfoNCE above. Full information: it reads every model's outcome on every prompt. Refuses any split but
    the train split, so nothing it learns comes from the prompts a policy is evaluated on."""
    import torch

    if split_name != "train":
        raise ValueError(f"the projection is trained on the train split only, not {split_name!r}")
    x = np.asarray(split.contexts, dtype=np.float32)
    n = len(x)
    if x.ndim != 2 or n != len(split.log):
        raise ValueError(f"contexts of shape {x.shape} do not match a log of {len(split.log)} prompts")
    if n < 2:
        raise ValueError("training a projection needs at least two prompts")
    if not 1 <= out_dim <= x.shape[1]:
        raise ValueError(f"out_dim must lie in [1, {x.shape[1]}], got {out_dim}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: extra threads only contend (5x slower on a busy 2-core machine)
    try:
        return _fit(split, x, out_dim, seed, dataset, split_name, config, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(split, x, out_dim, seed, dataset, split_name, config, progress) -> Projection:
    import torch
    from tqdm import tqdm

    n = len(x)
    start = random_projection(x.shape[1], out_dim, seed)
    u = torch.from_numpy(success_directions(split.log.scores)).float()
    xt = torch.from_numpy(x)
    W = torch.from_numpy(start.W.copy()).requires_grad_()
    b = torch.zeros(out_dim, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=config.lr)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in tqdm(
        range(config.epochs), desc=f"features {dataset or split.log.name}", unit="epoch", disable=not progress, leave=False
    ):
        perm = torch.randperm(n, generator=g)
        epoch_loss, steps = 0.0, 0
        for s in range(0, n, config.batch_size):
            idx = perm[s : s + config.batch_size]
            if len(idx) < 2:
                continue
            z = torch.nn.functional.normalize(xt[idx] @ W.T + b, dim=1)
            eye = torch.eye(len(idx), dtype=torch.bool)
            logits = (z @ z.T / config.temperature).masked_fill(eye, float("-inf"))  # j != i
            target = torch.softmax((u[idx] @ u[idx].T / config.target_temperature).masked_fill(eye, float("-inf")), dim=1)
            logp = torch.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
            loss = -(target * logp).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss, steps = epoch_loss + loss.item(), steps + 1
        losses.append(epoch_loss / max(steps, 1))
    meta = {
        "trained": True,
        "dataset": dataset or split.log.name.split("/")[0],
        "split": split_name,
        "seed": seed,
        "n_train": n,
        "embedding_model": MODEL_NAME,
        "objective": "soft_infonce_success_pattern",
        "full_information": True,
        "config": asdict(config),
        "loss_first_epoch": round(losses[0], 6) if losses else None,
        "loss_last_epoch": round(losses[-1], 6) if losses else None,
    }
    return Projection(W.detach().numpy(), b.detach().numpy(), meta)


def _cache_key(split: Split, out_dim: int, seed: int, config: ProjectionConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"out_dim": out_dim, "seed": seed, "config": asdict(config), "model": MODEL_NAME}).encode())
    h.update("\x00".join(split.log.prompt_ids).encode("utf-8", errors="surrogatepass"))
    h.update("\x00".join(split.log.models).encode("utf-8", errors="surrogatepass"))
    h.update(np.ascontiguousarray(np.nan_to_num(split.log.scores, nan=-1.0)).tobytes())
    h.update(str(np.asarray(split.contexts).shape).encode())
    return h.hexdigest()[:16]


def projection_path(dataset: str, split_name: str, seed: int, out_dim: int, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)[-60:]
    return cache_dir() / "projections" / f"{safe}-{split_name}-seed{seed}-d{out_dim}-{key}.safetensors"


def load_or_train_projection(
    split: Split,
    dataset: str,
    *,
    split_name: str = "train",
    seed: int = 0,
    out_dim: int = DEFAULT_OUT_DIM,
    config: ProjectionConfig = ProjectionConfig(),
    cache: bool = True,
    progress: bool = True,
    log_fn=None,
) -> Projection:
    """The cached projection for (dataset, split, seed, out_dim) and this exact training data, else train and
    cache it. A cache file that does not load is retrained over."""
    if split_name != "train":
        raise ValueError(f"the projection is trained on the train split only, not {split_name!r}")
    path = projection_path(dataset, split_name, seed, out_dim, _cache_key(split, out_dim, seed, config))
    if cache and path.exists():
        try:
            proj = Projection.load(path)
            if proj.in_dim == np.asarray(split.contexts).shape[1] and proj.out_dim == out_dim:
                if log_fn:
                    log_fn(f"features: cached projection {path}")
                return proj
        except StateError:
            pass
    proj = train_projection(split, out_dim, seed, dataset=dataset, split_name=split_name, config=config, progress=progress)
    if cache:
        proj.save(path)
        if log_fn:
            log_fn(f"features: trained projection {proj.in_dim} -> {proj.out_dim}, cached at {path}")
    return proj


# ========================================================================================================
# measurement
# ========================================================================================================
def success_pattern_auc(features: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> float:
    """P(cos of a same-success-pattern pair > cos of a different-pattern pair), over all pairs of rows (ties
    count 1/2). A pattern is which models score above `threshold` (rows with a missing cell are left out).
    0.5 = the features say nothing about which models succeed."""
    from scipy.stats import rankdata

    z = np.asarray(features, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s).all(axis=1)
    z, pattern = z[keep], s[keep] > threshold
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    iu = np.triu_indices(len(z), 1)
    cos = (z @ z.T)[iu]
    same = (pattern[:, None, :] == pattern[None, :, :]).all(axis=2)[iu]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("need both same-pattern and different-pattern pairs to measure separation")
    ranks = rankdata(cos)
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
