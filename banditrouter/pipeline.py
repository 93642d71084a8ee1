"""The train and eval jobs behind the CLI: load a log, embed it (cached), train, evaluate, write reports."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from banditrouter.data import RoutingLog, load_dataset
from banditrouter.evaluation import evaluate_policy, policy_aiq, policy_aiq_range, references
from banditrouter.policies import POLICIES, Policy, load_checkpoint, make_policy, save_checkpoint
from banditrouter.reward import DEFAULT_PREFERENCE_SAMPLER, DEFAULT_TAU_QUANTILE, cost_scale
from banditrouter.training import train_policy

EVAL_POLICIES = ("barp", "supervised", "linucb", "lints", "epsilon_greedy", "best_single", "cheapest", "random")


@dataclass
class Split:
    log: RoutingLog
    contexts: np.ndarray


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir=None,
    test_fraction: float = 0.3,
    seed: int = 0,
    limit: int | None = None,
    embedder=None,
    progress: bool = True,
) -> Split:
    from banditrouter.embeddings import Embedder

    log = load_dataset(dataset, split, data_dir=data_dir, test_fraction=test_fraction, seed=seed)
    if limit is not None and limit < len(log):
        # a seeded sample, not the first rows: the files are grouped by task
        idx = np.sort(np.random.default_rng(seed).choice(len(log), size=limit, replace=False))
        log = log.subset(idx)
    embedder = embedder or Embedder()
    x = embedder.embed(list(log.prompts), progress=progress, desc=f"embed {log.name}")
    return Split(log, x)


def train_one(
    name: str,
    train: Split,
    *,
    seed: int = 0,
    epochs: int | None = None,
    tau: float | None = None,
    tau_quantile: float = DEFAULT_TAU_QUANTILE,
    preference_sampler: str = DEFAULT_PREFERENCE_SAMPLER,
    progress: bool = True,
    **config,
) -> Policy:
    tau = cost_scale(train.log.costs, tau_quantile) if tau is None else tau
    policy = make_policy(name, train.log.models, train.contexts.shape[1], tau, seed=seed, **config)
    train_policy(
        policy, train.contexts, train.log, epochs=epochs, seed=seed, progress=progress, preference_sampler=preference_sampler
    )
    return policy


def run_eval(
    dataset: str,
    out_dir: Path,
    *,
    split: str = "test",
    seed: int = 0,
    policies: Sequence[str] = EVAL_POLICIES,
    checkpoints: Sequence[Path] = (),
    data_dir=None,
    test_fraction: float = 0.3,
    limit_train: int | None = None,
    limit_test: int | None = None,
    epochs: int | None = None,
    tau_quantile: float = DEFAULT_TAU_QUANTILE,
    preference_sampler: str = DEFAULT_PREFERENCE_SAMPLER,
    progress: bool = True,
    log_fn=print,
) -> dict:
    """Train every requested policy on the train split with bandit feedback (the supervised one with full
    information) unless a checkpoint is given for it, evaluate all on `split`, write results.json and the
    figures into `out_dir`."""
    from banditrouter.evaluation.plots import plot_pareto, plot_preference_sweep

    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    from banditrouter.embeddings import Embedder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    embedder = Embedder()  # one model load for both splits
    test = load_split(
        dataset,
        split,
        data_dir=data_dir,
        test_fraction=test_fraction,
        seed=seed,
        limit=limit_test,
        embedder=embedder,
        progress=progress,
    )
    loaded: dict[str, Policy] = {}
    for ckpt in checkpoints:
        pol = load_checkpoint(ckpt, seed=seed)
        if pol.models != test.log.models:
            raise ValueError(f"{ckpt} routes over {list(pol.models)}, but {dataset} has {list(test.log.models)}")
        loaded[f"{pol.name}@{Path(ckpt).stem}" if pol.name in loaded else pol.name] = pol
    to_train = [p for p in policies if p not in loaded] if not checkpoints else []
    train = None
    if to_train:
        train = load_split(
            dataset,
            "train",
            data_dir=data_dir,
            test_fraction=test_fraction,
            seed=seed,
            limit=limit_train,
            embedder=embedder,
            progress=progress,
        )
        tau = cost_scale(train.log.costs, tau_quantile)
    else:
        tau = next(iter(loaded.values())).tau
    # evaluate in the policies' arm order, whatever order the test split's loader produced
    models = train.log.models if train else next(iter(loaded.values())).models
    try:
        test = Split(test.log.with_models(models), test.contexts)
    except ValueError as e:
        raise ValueError(f"the {split} split cannot be scored in the policies' arm order: {e}") from None
    trained: dict[str, Policy] = dict(loaded)
    timings: dict[str, float] = {}
    for name in to_train:
        t = time.perf_counter()
        trained[name] = train_one(
            name, train, seed=seed, epochs=epochs, tau=tau, preference_sampler=preference_sampler, progress=progress
        )
        timings[name] = round(time.perf_counter() - t, 2)
        log_fn(f"trained {name} in {timings[name]:.1f}s")
    results: dict = {
        "dataset": dataset,
        "split": split,
        "seed": seed,
        "n_train": len(train.log) if train else None,
        "n_test": len(test.log),
        "models": list(test.log.models),
        "tau": tau,
        "tau_quantile": tau_quantile if train else None,
        "preference_sampler": preference_sampler if train else None,
        "notes": list(test.log.notes),
        "references": references(test.log, tau),
        "policies": {},
        "train_seconds": timings,
    }
    for name, pol in trained.items():
        pts = evaluate_policy(pol, test.contexts, test.log, tau)
        results["policies"][name] = {
            "points": pts,
            "aiq": policy_aiq(pts, test.log),
            "aiq_range": policy_aiq_range(pts, test.log),
            "mean_reward": float(np.mean([p["reward"] for p in pts])),
            "policy_version": pol.version,
        }
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_pareto(results, out_dir / "pareto.png")
    plot_preference_sweep(results, out_dir / "preference_sweep.png")
    return results


def run_train(
    dataset: str,
    policy: str,
    out: Path,
    *,
    split: str = "train",
    seed: int = 0,
    data_dir=None,
    test_fraction: float = 0.3,
    limit: int | None = None,
    epochs: int | None = None,
    tau_quantile: float = DEFAULT_TAU_QUANTILE,
    preference_sampler: str = DEFAULT_PREFERENCE_SAMPLER,
    progress: bool = True,
) -> Policy:
    train = load_split(dataset, split, data_dir=data_dir, test_fraction=test_fraction, seed=seed, limit=limit, progress=progress)
    pol = train_one(
        policy,
        train,
        seed=seed,
        epochs=epochs,
        tau_quantile=tau_quantile,
        preference_sampler=preference_sampler,
        progress=progress,
    )
    save_checkpoint(pol, out, extra={"dataset": dataset, "split": split, "n_train": len(train.log), "seed": seed})
    return pol
