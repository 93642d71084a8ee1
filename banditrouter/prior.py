"""PILOT's offline preference prior: a shared embedding of prompts and models learned from pairwise preferences.

Paper (PILOT, arXiv 2508.21141, as summarised in ../shared/papers/ALGORITHMS.md): prompts and LLMs live in one
space. Phase 1 learns a query projection psi(x) = W phi(x) + b with a cosine triplet loss (hard negatives);
phase 2 freezes psi and learns one vector theta_a per model with a Bradley-Terry-style objective over cosine
scores and BCE. The expected reward of model a on prompt x is cos(psi(x), theta_a).

**Full information.** The prior is trained on every model's outcome for every train prompt (the offline log's
full table), not on bandit feedback: what PILOT later learns online starts from a prior built from outcomes it
never had to explore for. `train_prior` refuses any split but "train".

Ours (the summary gives the two phases, not these details):

- Preference pairs [ours]: on prompt x, model a beats b when score_a > score_b; ties and missing cells are
  dropped (`preference_pairs`).
- Triplets [ours] (`_triplet_loss`): a prompt's *preference profile* is its score vector centred on each
  model's train mean and normalised (banditrouter.features.success_directions; a prompt on which every model
  scores its mean has no profile and is never an anchor, positive or negative). In a mini-batch, for each
  anchor i with a profile: the positive is a random batch prompt j != i whose profile is alike,
  cos(u_i, u_j) >= `positive_min`; the negative is a batch prompt whose profile differs, cos(u_i, u_k) <=
  `negative_max`: with `semi_hard` (the default) [ours, the paper's summary says hard negatives] the one with the
  highest cos(psi(x_i), psi(x_k)) that is still below the positive's, else (or with semi_hard off) the hardest:
  the highest cos(psi(x_i), psi(x_k)) under the current psi (semi-hard scored ~2 points better on RouterBench).
  Loss: mean over anchors with both of relu(margin - cos(psi_i, psi_j) + cos(psi_i, psi_k)).
  W starts as a seeded random orthogonal projection (banditrouter.features.random_projection), b = 0.
- Bradley-Terry [paper's form, our constants]: P(a beats b | x) = sigmoid(s (cos(psi(x), theta_a) -
  cos(psi(x), theta_b))) with a fixed scale s (`bt_scale`), BCE over all train pairs, Adam, full batch.
- Calibration [ours]: raw cosines live in [-1, 1], but PILOT's LinUCB regresses scores in [0, 1]. So the prior
  predicts score_a(x) ~ scale * cos(psi(x), theta_a) + offset_a, with one scale and a per-model offset fitted
  by least squares on the train split's observed cells (scale floored at 0: a prior that orders pairs
  backwards on its own train split falls back to the per-model means). Ranking within a prompt is then the
  cosine ranking shifted by the per-model offsets; `pairwise_accuracy` measures either.
- Cost prior [ours]: each model's mean normalised cost min(c / tau, 1) on the train split (`cost_mean`), with
  the count of cells it averages (`cost_count`); PILOT starts its running cost means from it.

Training is torch on CPU, seeded and single-threaded (a few seconds for RouterBench's 2218 x 11 train log).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from banditrouter.data.log import RoutingLog
from banditrouter.policies.base import StateError
from banditrouter.reward import normalised_cost

PRIOR_PARAMS = ("prior.W", "prior.b", "prior.theta", "prior.scale", "prior.offset", "prior.cost_mean", "prior.cost_count")
"""Where the prior's arrays sit among a PILOT policy's params (safetensors-compatible float arrays)."""


@dataclass(frozen=True)
class PriorConfig:
    """How `train_prior` trains (all constants ours)."""

    dim: int = 64
    """d': width of psi(x) and of each model vector theta_a."""
    triplet_epochs: int = 10
    """Phase 1: passes over the train prompts with the triplet loss (0: psi stays the random projection). A short
    phase 1 [ours]: chosen among 0, 5, 10, 30 on a validation split carved from train (seeded 80/20): on
    RouterBench 0.702, 0.708, 0.708, 0.695 held-out pairwise accuracy, on llmrouter 0.822, 0.821, 0.828, 0.822;
    longer training fits the train prompts' profiles and generalises worse."""
    triplet_batch: int = 256
    """Prompts per phase-1 mini-batch (positives and hard negatives are found within it)."""
    margin: float = 0.2
    """Phase 1: the triplet margin on cosines."""
    positive_min: float = 0.5
    """Phase 1: a positive's preference profile has cosine >= this with the anchor's."""
    negative_max: float = 0.0
    """Phase 1: a negative's preference profile has cosine <= this with the anchor's."""
    bt_epochs: int = 300
    """Phase 2: full-batch Adam steps over all train pairs."""
    bt_scale: float = 10.0
    """s: the Bradley-Terry logit is s * (cos_a - cos_b)."""
    lr: float = 1e-2
    """Phase 2: Adam learning rate (phase 1 has `triplet_lr`)."""
    weight_decay: float = 0.0
    """Phase 1: L2 on W (Adam's weight_decay)."""
    semi_hard: bool = True
    """Phase 1: take the hardest negative less similar than the positive (FaceNet's semi-hard), else the hardest."""
    triplet_lr: float = 1e-2
    """Phase 1: Adam learning rate."""

    def __post_init__(self) -> None:
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"prior dim must be an integer >= 1, got {self.dim!r}")
        for name in ("triplet_epochs", "bt_epochs"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"prior {name} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.triplet_batch, int) and self.triplet_batch >= 3):
            raise ValueError(f"prior triplet_batch must be an integer >= 3, got {self.triplet_batch!r}")
        for name in ("margin", "bt_scale", "lr", "triplet_lr"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"prior {name} must be a positive number, got {v!r}")
        if not (isinstance(self.weight_decay, int | float) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"prior weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (-1 <= self.negative_max < self.positive_min <= 1):
            raise ValueError(
                f"prior needs -1 <= negative_max < positive_min <= 1, got {self.negative_max!r}, {self.positive_min!r}"
            )


PRIOR_CONFIG_FIELDS = tuple(f.name for f in fields(PriorConfig))


@dataclass
class PreferencePrior:
    """psi(x) = W x + b, one vector theta_a per model, the calibration and the cost prior.

    W: (dim, in_dim), b: (dim,), theta: (K, dim), scale: (1,), offset: (K,), cost_mean: (K,), cost_count: (K,)."""

    models: tuple[str, ...]
    W: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    cost_mean: np.ndarray
    cost_count: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-able: trained or not, dataset, split, seed, n_train, n_pairs, settings, losses, train pairwise accuracy."""

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        k = len(self.models)
        arrays = {n: np.asarray(getattr(self, n)) for n in ("W", "b", "theta", "scale", "offset", "cost_mean", "cost_count")}
        for name, arr in arrays.items():
            if arr.dtype.kind not in "fiu":
                raise StateError(f"prior {name} must be a numeric array")
            if not np.isfinite(arr).all():
                raise StateError(f"prior {name} holds non-finite values")
        W = arrays["W"]
        if W.ndim != 2 or min(W.shape) < 1:
            raise StateError(f"prior W must be a 2-D (dim, in_dim) array, got shape {W.shape}")
        dim = W.shape[0]
        expected = {"b": (dim,), "theta": (k, dim), "scale": (1,), "offset": (k,), "cost_mean": (k,), "cost_count": (k,)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise StateError(f"prior {name} has shape {arrays[name].shape}, expected {shape}")
        if arrays["scale"][0] < 0 or (arrays["cost_count"] < 0).any() or (arrays["cost_mean"] < 0).any():
            raise StateError("prior scale, cost_mean and cost_count must be >= 0")
        if not isinstance(self.meta, dict):
            raise StateError(f"prior metadata must be a dict, got {type(self.meta).__name__}")
        for name, arr in arrays.items():  # the embedding's arrays in float32, the calibration in float64
            wide = name in ("scale", "offset", "cost_mean", "cost_count")
            setattr(self, name, np.ascontiguousarray(arr, dtype=np.float64 if wide else np.float32))

    @property
    def dim(self) -> int:
        return int(self.W.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.W.shape[1])

    @property
    def trained(self) -> bool:
        return bool(self.meta.get("trained", False))

    # -- the model ------------------------------------------------------------------------------------------
    def embed(self, contexts: np.ndarray) -> np.ndarray:
        """(n, in_dim) raw embeddings -> (n, dim) psi(x) / |psi(x)|: the unit query vectors."""
        from banditrouter.features import unit_affine

        return unit_affine(contexts, self.W, self.b, "the prior")

    def unit_theta(self) -> np.ndarray:
        """(K, dim) theta_a / |theta_a| (a zero vector stays zero)."""
        t = self.theta.astype(np.float64)
        return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)

    def cosines(self, contexts: np.ndarray) -> np.ndarray:
        """(n, K) cos(psi(x), theta_a): the paper's expected reward."""
        return self.embed(contexts).astype(np.float64) @ self.unit_theta().T

    def linear_weights(self) -> np.ndarray:
        """(K, dim + 1): the calibrated prior as a linear model over phi = [psi/|psi| ; 1], i.e.
        predict(x) = phi(x) @ linear_weights().T (PILOT's theta0_a)."""
        return np.hstack([self.scale[0] * self.unit_theta(), self.offset[:, None]])

    def predict(self, contexts: np.ndarray) -> np.ndarray:
        """(n, K) the calibrated predicted score: scale * cos(psi(x), theta_a) + offset_a."""
        return self.scale[0] * self.cosines(contexts) + self.offset

    # -- state ------------------------------------------------------------------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        return {f"prior.{n}": getattr(self, n).copy() for n in ("W", "b", "theta", "scale", "offset", "cost_mean", "cost_count")}

    @classmethod
    def from_params(cls, models, params: dict[str, Any], meta: dict[str, Any] | None) -> PreferencePrior:
        missing = set(PRIOR_PARAMS) - set(params)
        if missing:
            raise StateError(f"state holds no prior arrays {sorted(missing)}")
        return cls(models, *(np.asarray(params[k]) for k in PRIOR_PARAMS), meta=dict(meta or {}))

    def copy(self) -> PreferencePrior:
        return PreferencePrior.from_params(self.models, self.params(), json.loads(json.dumps(self.meta)))


def untrained_prior(models, in_dim: int, dim: int = 64, seed: int = 0) -> PreferencePrior:
    """The starting point: psi a seeded random orthogonal projection, theta_a seeded random vectors, and a
    calibration with scale 0 and offsets 0 (predicts 0 for every model: no prior knowledge), no cost prior."""
    from banditrouter.features import random_projection

    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"prior dim must be an integer >= 1, got {dim!r}")
    models = tuple(models)
    proj = random_projection(in_dim, dim, seed)
    theta = np.random.default_rng(seed).standard_normal((len(models), dim))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    k = len(models)
    return PreferencePrior(
        models, proj.W, proj.b, theta, np.zeros(1), np.zeros(k), np.zeros(k), np.zeros(k), {"trained": False, "seed": seed}
    )


# ========================================================================================================
# ALGO LOGIC: preference pairs, the triplet loss (phase 1), Bradley-Terry (phase 2), calibration
# ========================================================================================================
def preference_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, winners, losers): every (prompt, a, b) with score_a > score_b, both observed (ties dropped)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be an (n, K) table, got shape {s.shape}")
    ok = np.isfinite(s)
    beats = (s[:, :, None] > s[:, None, :]) & ok[:, :, None] & ok[:, None, :]
    rows, a, b = np.nonzero(beats)
    return rows, a, b


def _triplet_loss(z, u, has_profile, margin, positive_min, negative_max, g, semi_hard=False):
    """Batch-hard cosine triplet loss [ours] (module docstring). z: (m, d) unit psi; u: (m, K) unit profiles."""
    import torch

    m = len(z)
    prof = u @ u.T
    eye = torch.eye(m, dtype=torch.bool)
    valid = has_profile[:, None] & has_profile[None, :] & ~eye
    pos_ok = valid & (prof >= positive_min)
    neg_ok = valid & (prof <= negative_max)
    anchors = pos_ok.any(dim=1) & neg_ok.any(dim=1)
    if not anchors.any():
        return None
    # a random alike prompt as the positive: random keys where allowed, -inf elsewhere
    keys = torch.rand(m, m, generator=g).masked_fill(~pos_ok, -1.0)
    pos = keys.argmax(dim=1)
    sim = z @ z.T
    idx = torch.arange(m)
    s = sim.detach()
    hardest = s.masked_fill(~neg_ok, -float("inf")).argmax(dim=1)
    if semi_hard:  # the most similar negative that is still less similar than the positive, when there is one
        semi = neg_ok & (s < s[idx, pos][:, None])
        hardest = torch.where(semi.any(dim=1), s.masked_fill(~semi, -float("inf")).argmax(dim=1), hardest)
    loss = torch.relu(margin - sim[idx, pos] + sim[idx, hardest])
    return loss[anchors].mean()


def _fit_psi(x, u, has_profile, start_W, cfg: PriorConfig, seed: int, progress: bool, desc: str):
    import torch
    from tqdm import tqdm

    n = len(x)
    g = torch.Generator().manual_seed(seed)
    W = torch.from_numpy(start_W.copy()).requires_grad_()
    b = torch.zeros(W.shape[0], requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=cfg.triplet_lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    for _ in tqdm(range(cfg.triplet_epochs), desc=f"{desc} psi", unit="epoch", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=g)
        total, steps = 0.0, 0
        for s in range(0, n, cfg.triplet_batch):
            idx = perm[s : s + cfg.triplet_batch]
            if len(idx) < 3:
                continue
            z = torch.nn.functional.normalize(x[idx] @ W.T + b, dim=1)
            loss = _triplet_loss(z, u[idx], has_profile[idx], cfg.margin, cfg.positive_min, cfg.negative_max, g, cfg.semi_hard)
            if loss is None:
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
    return W.detach().numpy(), b.detach().numpy(), losses


def _fit_theta(z, rows, win, lose, k, cfg: PriorConfig, seed: int, progress: bool, desc: str):
    """Phase 2: psi frozen (z = unit psi of every train prompt), theta by BCE on sigmoid(s (cos_w - cos_l))."""
    import torch
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed + 1)
    theta = (torch.randn(k, z.shape[1], generator=g) * 0.1).requires_grad_()
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    losses: list[float] = []
    for _ in tqdm(range(cfg.bt_epochs), desc=f"{desc} theta", unit="step", disable=not progress, leave=False):
        cos = z @ torch.nn.functional.normalize(theta, dim=1).T  # (n, K): every prompt once, then gathered per pair
        # target 1 for every (winner, loser) pair: BCE(sigmoid(logit), 1) = softplus(-logit)
        loss = torch.nn.functional.softplus(-cfg.bt_scale * (cos[rows, win] - cos[rows, lose])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return theta.detach().numpy(), losses


def calibrate(cosines: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Least squares score_ia ~ scale * cos_ia + offset_a over the observed cells [ours]: one scale, a
    per-model offset (scale floored at 0). Returns (scale, offsets)."""
    c, s = np.asarray(cosines, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    k = s.shape[1]
    cm = np.array([c[ok[:, a], a].mean() if ok[:, a].any() else 0.0 for a in range(k)])
    sm = np.array([s[ok[:, a], a].mean() if ok[:, a].any() else 0.0 for a in range(k)])
    dc, ds = np.where(ok, c - cm, 0.0), np.where(ok, np.nan_to_num(s) - sm, 0.0)
    var = float((dc**2).sum())
    scale = max(float((dc * ds).sum()) / var, 0.0) if var > 1e-12 else 0.0
    return scale, sm - scale * cm


def cost_prior(costs: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per model: (mean of min(c / tau, 1) over its observed cells, count of those cells)."""
    c = np.asarray(costs, dtype=np.float64)
    ok = np.isfinite(c)
    nc = np.where(ok, normalised_cost(np.nan_to_num(c), tau), 0.0)
    count = ok.sum(axis=0).astype(np.float64)
    return nc.sum(axis=0) / np.maximum(count, 1.0), count


def train_prior(
    log: RoutingLog,
    contexts: np.ndarray,
    tau: float,
    *,
    config: PriorConfig = PriorConfig(),
    seed: int = 0,
    split_name: str = "train",
    dataset: str | None = None,
    progress: bool = False,
) -> PreferencePrior:
    """Both phases, the calibration and the cost prior, on `log` (full information: every observed cell).
    Refuses any split but the train split."""
    import torch

    from banditrouter.features import success_directions

    if split_name != "train":
        raise ValueError(f"the preference prior is trained on the train split only, not {split_name!r}")
    x = np.asarray(contexts, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(log):
        raise ValueError(f"contexts of shape {x.shape} do not match a log of {len(log)} prompts")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")
    rows, win, lose = preference_pairs(log.scores)
    if len(rows) == 0:
        raise ValueError(f"{log.name}: no preference pairs (no prompt where one model scored above another)")
    t0 = time.perf_counter()
    start = untrained_prior(log.models, x.shape[1], config.dim, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: extra threads only contend on a busy machine
    try:
        torch.manual_seed(seed)
        u = success_directions(log.scores)
        has_profile = np.linalg.norm(u, axis=1) > 0.5
        desc = f"prior {dataset or log.name}"
        W, b, triplet_losses = _fit_psi(
            torch.from_numpy(x), torch.from_numpy(u).float(), torch.from_numpy(has_profile), start.W, config, seed, progress, desc
        )
        z = torch.nn.functional.normalize(torch.from_numpy(x) @ torch.from_numpy(W).T + torch.from_numpy(b), dim=1)
        theta, bt_losses = _fit_theta(
            z, torch.from_numpy(rows), torch.from_numpy(win), torch.from_numpy(lose), log.n_models, config, seed, progress, desc
        )
    finally:
        torch.set_num_threads(threads)
    k = log.n_models
    prior = PreferencePrior(log.models, W, b, theta, np.zeros(1), np.zeros(k), np.zeros(k), np.zeros(k))
    scale, offset = calibrate(prior.cosines(x), log.scores)
    cost_mean, cost_count = cost_prior(log.costs, tau)
    prior = PreferencePrior(log.models, W, b, theta, np.array([scale]), offset, cost_mean, cost_count)
    prior.meta = {
        "trained": True,
        "dataset": dataset or log.name.split("/")[0],
        "split": split_name,
        "seed": seed,
        "n_train": len(log),
        "n_pairs": int(len(rows)),
        "prompts_with_profile": int(has_profile.sum()),
        "tau": float(tau),
        "full_information": True,
        "config": asdict(config),
        "triplet_loss_first": round(triplet_losses[0], 6) if triplet_losses else None,
        "triplet_loss_last": round(triplet_losses[-1], 6) if triplet_losses else None,
        "bt_loss_first": round(bt_losses[0], 6) if bt_losses else None,
        "bt_loss_last": round(bt_losses[-1], 6) if bt_losses else None,
        "train_pairwise_accuracy": round(pairwise_accuracy(prior, log, x), 6),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    return prior


# ========================================================================================================
# measurement
# ========================================================================================================
def pairwise_accuracy(prior: PreferencePrior, log: RoutingLog, contexts: np.ndarray, *, calibrated: bool = True) -> float:
    """The fraction of (x, a, b) preference pairs of `log` (a beat b on x) that the prior orders right:
    predicted score of a > that of b (ties count 1/2). `calibrated=False` ranks by the raw cosine instead.
    Use a held-out log: on the train split this measures fit, not generalisation."""
    try:
        log = log.with_models(prior.models)
    except ValueError as e:
        raise ValueError(f"the log cannot be scored in the prior's model order: {e}") from None
    x = np.asarray(contexts)
    if len(x) != len(log):
        raise ValueError(f"{len(x)} contexts for a log of {len(log)} prompts")
    rows, win, lose = preference_pairs(log.scores)
    if len(rows) == 0:
        raise ValueError(f"{log.name}: no preference pairs to measure")
    pred = prior.predict(x) if calibrated else prior.cosines(x)
    diff = pred[rows, win] - pred[rows, lose]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / len(diff))


def mean_order_accuracy(train: RoutingLog, test: RoutingLog) -> float:
    """The context-free reference: pairwise accuracy of ranking every prompt's models by their train mean score."""
    test = test.with_models(train.models)
    means = np.nanmean(np.where(np.isfinite(train.scores), train.scores, np.nan), axis=0)
    rows, win, lose = preference_pairs(test.scores)
    if len(rows) == 0:
        raise ValueError(f"{test.name}: no preference pairs to measure")
    diff = means[win] - means[lose]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / len(diff))
