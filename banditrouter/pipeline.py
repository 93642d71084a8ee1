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
from banditrouter.policies import POLICIES, Policy, load_checkpoint, make_policy, save_checkpoint, takes_features
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


def check_features(features: str, features_dim: int) -> None:
    from banditrouter.features import FEATURE_KINDS

    if features not in FEATURE_KINDS:
        raise ValueError(f"unknown features {features!r}; choose one of {list(FEATURE_KINDS)}")
    if features_dim < 1:
        raise ValueError(f"features dim must be >= 1, got {features_dim}")


def train_features(
    dataset: str, train: Split, *, split: str = "train", seed: int = 0, out_dim: int = 64, progress: bool = True, log_fn=None
):
    """The learned projection (banditrouter.features) for this train split: cached, else trained. Full
    information: it reads every model's outcome on every train prompt; any split but "train" is refused."""
    from banditrouter.features import load_or_train_projection

    return load_or_train_projection(
        train, dataset, split_name=split, seed=seed, out_dim=out_dim, progress=progress, log_fn=log_fn
    )


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
    features=None,
    **config,
) -> Policy:
    """`features`: a banditrouter.features.Projection the policy learns on (None: the raw embedding). PILOT
    first trains its preference prior on `train` (full information, banditrouter.policies.pilot.build_pilot);
    its default epochs of bandit pretraining on top are 0."""
    tau = cost_scale(train.log.costs, tau_quantile) if tau is None else tau
    if features is not None:
        config["features"] = features
    if name == "pilot":
        from banditrouter.policies.pilot import build_pilot

        if features is not None:
            raise ValueError("policy 'pilot' takes no learned features: its query projection is part of its prior")
        policy = build_pilot(train.log, train.contexts, tau, seed=seed, progress=progress, **config)
    else:
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
    features: str = "none",
    features_dim: int = 64,
    progress: bool = True,
    log_fn=print,
) -> dict:
    """Train every requested policy on the train split with bandit feedback (the supervised one with full
    information) unless a checkpoint is given for it, evaluate all on `split`, write results.json and the
    figures into `out_dir`. `features="projection"`: every policy that uses the context learns on the learned
    projection (trained on the train split with full information, banditrouter.features); "none": the raw
    embedding. A checkpoint carries its own features."""
    from banditrouter.evaluation.plots import plot_pareto, plot_preference_sweep

    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    check_features(features, features_dim)
    if features != "none" and checkpoints:
        raise ValueError("--features applies to policies trained here; a checkpoint carries its own features")
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
    projection = None
    if features == "projection" and train is not None:
        t = time.perf_counter()
        projection = train_features(dataset, train, seed=seed, out_dim=features_dim, progress=progress, log_fn=log_fn)
        timings["features"] = round(time.perf_counter() - t, 2)
    for name in to_train:
        t = time.perf_counter()
        use = projection if projection is not None and takes_features(name) else None
        if projection is not None and use is None:
            log_fn(f"{name} does not use the context: trained without features")
        trained[name] = train_one(
            name,
            train,
            seed=seed,
            epochs=epochs,
            tau=tau,
            preference_sampler=preference_sampler,
            progress=progress,
            features=use,
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
        "features": _features_report(projection, test) if projection is not None else None,
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
            "features": f"projection {pol.projection.in_dim}->{pol.projection.out_dim}" if pol.projection else "none",
        }
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_pareto(results, out_dir / "pareto.png")
    plot_preference_sweep(results, out_dir / "preference_sweep.png")
    return results


def _features_report(projection, test: Split) -> dict:
    """The projection's metadata, and how well each representation separates the evaluated split's prompts by
    success pattern (banditrouter.features.success_pattern_auc; 0.5 = no separation): the raw embedding, a
    random orthogonal projection of the same width (training's starting point) and the trained projection.
    The evaluated split's outcomes are only measured here, never trained on."""
    from banditrouter.features import random_projection, success_pattern_auc

    x, scores = test.contexts, test.log.scores
    try:
        auc = {
            "embedding": success_pattern_auc(x, scores),
            "random_projection": success_pattern_auc(
                random_projection(projection.in_dim, projection.out_dim, int(projection.meta.get("seed", 0))).apply(x), scores
            ),
            "projection": success_pattern_auc(projection.apply(x), scores),
        }
    except ValueError:  # too few prompts to have both same- and different-pattern pairs
        auc = None
    return {**projection.meta, "success_pattern_auc": auc}


def pacing_calibration(policy: Policy, tuning: Split, preference: tuple[float, float] | None = None, quantiles=None) -> dict:
    """What the live router needs to pace a key (`pacing: zcl`) with this policy: L and U (`ratio_bounds`: the
    1% / 99% quantiles of the positive ratios of the policy's value estimate, `values(explore=False)`, to the
    estimated cost, over the tuning split's prompts at `preference`, default the config schema's default
    preference) and the cost estimator fit on the tuning log (the replay models' weights)."""
    from banditrouter.config import Preference
    from banditrouter.pacing import DEFAULT_LU_QUANTILES, CostEstimator, ratio_bounds

    pref = tuple(preference) if preference is not None else Preference().as_tuple()
    est = CostEstimator.fit(tuning.log)
    order = [est.models.index(m) for m in policy.models]
    weights = est([len(q) for q in tuning.log.prompts])[:, order]
    values = policy.values(tuning.contexts, np.tile(np.asarray(pref, dtype=np.float64), (len(tuning.contexts), 1)))
    try:
        L, U = ratio_bounds(values, weights, tuple(quantiles or DEFAULT_LU_QUANTILES))
    except ValueError as e:  # no positive value anywhere (random, cheapest, an untrained linear policy)
        import logging

        logging.getLogger(__name__).warning("pacing calibration: %s; the router will estimate L and U live", e)
        L = U = None
    return {"L": L, "U": U, "preference": list(pref), "cost_estimator": est.to_dict()}


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
    features: str = "none",
    features_dim: int = 64,
    options: dict | None = None,
    progress: bool = True,
    log_fn=None,
) -> Policy:
    """Train one policy on `split` and save its checkpoint; with `features="projection"` the policy learns on
    the learned projection (trained on this split, which must be "train"), and the checkpoint carries it.
    `options` are the policy's own config fields (e.g. ACQB's c, v, update_rule), saved in the checkpoint."""
    check_features(features, features_dim)
    if features == "projection" and split != "train":
        raise ValueError(f"the projection is trained on the train split only; --split is {split!r}")
    if features == "projection" and not takes_features(policy):
        raise ValueError(f"policy {policy!r} does not use the context: --features projection does not apply")
    if policy == "pilot" and split != "train":
        raise ValueError(f"pilot's preference prior is trained on the train split only; --split is {split!r}")
    train = load_split(dataset, split, data_dir=data_dir, test_fraction=test_fraction, seed=seed, limit=limit, progress=progress)
    projection = None
    if features == "projection":
        projection = train_features(
            dataset, train, split=split, seed=seed, out_dim=features_dim, progress=progress, log_fn=log_fn
        )
    pol = train_one(
        policy,
        train,
        seed=seed,
        epochs=epochs,
        tau_quantile=tau_quantile,
        preference_sampler=preference_sampler,
        progress=progress,
        features=projection,
        **(options or {}),
    )
    pacing = {**pacing_calibration(pol, train), "tuning": f"{dataset}/{split}"}
    extra = {"dataset": dataset, "split": split, "n_train": len(train.log), "seed": seed, "pacing": pacing}
    save_checkpoint(pol, out, extra=extra)
    return pol
