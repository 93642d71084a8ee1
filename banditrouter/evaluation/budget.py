"""`banditrouter budget-eval`: routing under a budget, offline (issue 12, PILOT's evaluation).

Budgets are fractions of the *reference spend*: what the reference model alone costs over the test stream
(RouterBench: gpt-4-1106-preview; other datasets: `reference_model`, default the model with the best train
accuracy). Every (policy, budget, seed) run serves the test prompts once, in the seed's random order (the same
order for every policy and budget at that seed), with the preference w = (1, 0): quality only, since keeping
to the budget is the knapsack's job, not the reward's.

Policies:
    pilot      PILOT (banditrouter.policies.pilot): the preference prior trained on the train split with full
               information (`build_pilot`), LinUCB statistics started at it
    linucb     LinUCB without a prior: cold, A_a = I, b_a = 0
    barp       BaRP trained on the train split with bandit feedback (`banditrouter.pipeline.train_one`)
        each of the three learns online from bandit feedback as it goes (only the chosen arm's score and
        cost, `update_batch` samples per `policy.update`), and each is paced by the same ZCL cost policy
        (`banditrouter.pacing.pace`, below)
    cheapest   cheapest-first: every prompt to the arm with the lowest estimated cost
    greedy     greedy-until-broke: every prompt to the model with the best train accuracy, refused once the
               remaining budget cannot pay for it

The cost policy (the same for the three learners):
    weights    w_a(x): the estimated cost, `CostEstimator.fit(train log)` (known before the model answers)
    z          the fraction of the current bin's budget spent: bins of `bin_size` queries, budget B / N each,
               unspent budget rolling over to the next bin and overspend taken from it (`CountBins`)
    values     `values(explore=True)` [ours, `value_mode="optimistic"`]: what the learner maximises while it
               learns (PILOT, LinUCB: predicted score + UCB bonus; BaRP: pi of its live parameters); a cold
               LinUCB's greedy values are 0 for every untried arm, so greedy eligibility would pin it to the
               cheapest arm forever. `value_mode="greedy"` uses `values(explore=False)` (the live router's).
    L, U       `ratio_bounds` (1% / 99% quantiles of the positive value-to-weight ratios) of the policy's own
               values, in the same value mode, on the train split's prompts, taken from the policy as it stands
               when the test stream starts: PILOT's from its prior-initialised statistics (the calibrated
               prior's predicted scores, plus the initial bonus in optimistic mode); BaRP's from pi after its
               bandit training; cold LinUCB's from its optimistic values alone, alpha * width, the same for
               every arm (it knows nothing yet), so its L and U come from the spread of the costs. In greedy
               mode a cold LinUCB has no positive value and L, U cannot be estimated (an error).
    choice     among the eligible arms, the policy's own exploring behaviour (`fallback_probabilities`); none
               eligible: the cheapest allowed arm

The budget invariant (every policy, baselines included): a prompt may only go to an arm whose *estimated* cost
fits the remaining budget (the allowed set); when even the cheapest arm does not fit, the prompt is refused
(score 0, no spend), and the stream goes on (a shorter prompt later may still fit). The first refusal's
position is `exhausted_at` (None: never refused). Since the actual cost exceeds the estimate by less than one
request's maximum cost, spend <= budget + max_request_cost_usd, always; `run_stream` checks it after every run
(`BudgetInvariantError`).

Accuracy: the mean score over the whole stream, a refused prompt counting 0; a served prompt whose chosen cell
is missing in the log (RouterBench has a few) is left out of the mean, as in `banditrouter eval`, and
charged its logged cost (its estimate when the cost is missing too); the learners get no sample from it.

Trained policies (PILOT's prior, BaRP) are trained once, with `train_seed`, and cached in `<out>/checkpoints`;
every run starts from a copy. The seeds vary the stream's order and the runs' exploration draws.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from banditrouter.pacing import CostEstimator, CountBins, pace, ratio_bounds

BUDGET_POLICIES = ("pilot", "linucb", "barp", "cheapest", "greedy")
LEARNERS = ("pilot", "linucb", "barp")
TRAINED = ("pilot", "barp")
"""Learners trained on the train split before the stream (cached in <out>/checkpoints)."""
VALUE_MODES = ("optimistic", "greedy")
DEFAULT_BUDGETS = (0.1, 0.25, 0.5, 1.0)
DEFAULT_BIN_SIZE = 50
"""S: queries per bin (about 20 bins over RouterBench's 952 test prompts) [ours: the summary gives no S]."""
DEFAULT_UPDATE_BATCH = 8
"""Samples per online `policy.update` (the same for every learner; BaRP's leave-one-out baseline needs >= 2)."""
DEFAULT_CURVE_BUCKET = 50
"""Learning curves: accuracy per this many consecutive queries of the stream."""
REFERENCE_MODELS = {"routerbench": "gpt-4-1106-preview"}
PREFERENCE = (1.0, 0.0)
INVARIANT_SLACK = 1e-12


class BudgetInvariantError(RuntimeError):
    """A run spent more than its budget plus one request's maximum cost (a bug, never expected)."""


# ========================================================================================================
# Input parsing (the CLI's edge)
# ========================================================================================================
def parse_budgets(spec: str | Sequence[float]) -> list[float]:
    """Budget fractions from "0.1,0.25,0.5,1.0" (or a sequence): finite, > 0, distinct, at least one."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    parts = [p for p in parts if p != ""]
    if not parts:
        raise ValueError("budgets: give at least one fraction of the reference spend, e.g. '0.1,0.25,0.5,1.0'")
    try:
        out = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"budgets must be numbers (fractions of the reference spend), got {spec!r}") from None
    bad = [b for b in out if not (math.isfinite(b) and b > 0)]
    if bad:
        raise ValueError(f"budgets must be finite fractions > 0 of the reference spend, got {bad}")
    if len(set(out)) != len(out):
        raise ValueError(f"budgets are listed twice: {out}")
    return sorted(out)


def check_policies(policies: Sequence[str]) -> list[str]:
    policies = [p.strip() for p in policies if p.strip()]
    unknown = [p for p in policies if p not in BUDGET_POLICIES]
    if unknown or not policies:
        raise ValueError(f"unknown budget-eval policies {unknown}; choose from {list(BUDGET_POLICIES)}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"policies are listed twice: {policies}")
    return policies


# ========================================================================================================
# The stream and one run
# ========================================================================================================
@dataclass(frozen=True)
class Stream:
    """The test prompts as the runs see them: contexts, the logged outcome table (read one chosen cell at a
    time) and each (prompt, arm)'s estimated cost, all in the policies' arm order."""

    contexts: np.ndarray
    scores: np.ndarray
    costs: np.ndarray
    weights: np.ndarray
    models: tuple[str, ...]

    def __post_init__(self) -> None:
        n, k = self.scores.shape
        if self.costs.shape != (n, k) or self.weights.shape != (n, k) or len(self.contexts) != n or len(self.models) != k:
            raise ValueError("stream arrays disagree in shape")
        if n < 1:
            raise ValueError("the stream holds no prompt")
        if not (np.isfinite(self.weights).all() and (self.weights > 0).all()):
            raise ValueError("estimated costs (weights) must be finite and > 0")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def max_request_cost(self) -> float:
        """The largest logged cost of any (prompt, model) cell: the bound on one request's overshoot."""
        return float(np.nanmax(self.costs))


@dataclass(frozen=True)
class Pacing:
    """The ZCL settings one learner is paced with."""

    L: float
    U: float
    bin_size: int = DEFAULT_BIN_SIZE
    optimistic: bool = True


def run_stream(
    stream: Stream,
    budget_usd: float,
    order: np.ndarray,
    *,
    kind: str,
    policy=None,
    pacing: Pacing | None = None,
    fixed_arm: int | None = None,
    update_batch: int = DEFAULT_UPDATE_BATCH,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Serve `stream` in `order` under `budget_usd`. `kind`: "paced" (a learner `policy` with `pacing`),
    "cheapest" or "fixed" (always `fixed_arm`: greedy-until-broke). Returns the run's totals and its per-query
    outcome arrays (stream positions): `score` (refused 0, missing cell NaN), `cost` (charged), `arm` (-1 when
    refused). Raises BudgetInvariantError if the spend ever passes budget + the stream's max request cost."""
    from banditrouter.policies.base import BanditBatch

    if not (math.isfinite(budget_usd) and budget_usd > 0):
        raise ValueError(f"budget must be a positive number of USD, got {budget_usd!r}")
    if kind == "paced" and (policy is None or pacing is None):
        raise ValueError("a paced run needs a policy and its pacing")
    if kind == "fixed" and fixed_arm is None:
        raise ValueError("a fixed-arm run needs fixed_arm")
    if kind not in ("paced", "cheapest", "fixed"):
        raise ValueError(f"unknown run kind {kind!r}")
    if update_batch < 1:
        raise ValueError("update_batch must be >= 1")
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    rng = rng or np.random.default_rng()
    bins = CountBins(budget_usd, n, pacing.bin_size if pacing else n)
    pref = np.asarray(PREFERENCE, dtype=np.float64)
    score = np.zeros(n)
    charged = np.zeros(n)
    arms = np.full(n, -1, dtype=np.int64)
    exhausted_at: int | None = None
    n_fallback = 0
    max_over_estimate = 0.0
    pending: list[tuple[int, int, float]] = []
    for i, row in enumerate(order):
        z = bins.z(i)  # every position, in order: a bin starts where its first query is
        w = stream.weights[row]
        allowed = w <= bins.remaining()
        if kind == "fixed":
            allowed = allowed & (np.arange(len(w)) == fixed_arm)
        if not allowed.any():
            exhausted_at = i if exhausted_at is None else exhausted_at
            continue  # refused: score 0, no spend
        if kind == "paced":
            d = pace(
                policy,
                stream.contexts[row],
                pref,
                w,
                z,
                pacing.L,
                pacing.U,
                allowed=allowed,
                explore=True,
                rng=rng,
                optimistic=pacing.optimistic,
            )
            arm, propensity = d.arm, d.propensity
            n_fallback += int(d.fallback_cheapest)
        elif kind == "cheapest":
            arm, propensity = int(np.flatnonzero(allowed)[np.argmin(w[allowed])]), 1.0
        else:
            arm, propensity = int(fixed_arm), 1.0
        if not allowed[arm]:  # the allowed set is the invariant: never serve outside it
            raise BudgetInvariantError(f"query {i}: arm {arm} served although its estimated cost does not fit")
        s, c = stream.scores[row, arm], stream.costs[row, arm]
        cost = float(c) if np.isfinite(c) else float(w[arm])
        bins.charge(cost)
        max_over_estimate = max(max_over_estimate, cost - float(w[arm]))
        charged[i], arms[i], score[i] = cost, arm, s
        if policy is not None and np.isfinite(s) and np.isfinite(c):
            pending.append((i, arm, propensity))
            if len(pending) >= update_batch:
                _update(policy, stream, order, pending, BanditBatch)
                pending = []
    spend = float(charged.sum())
    bound = budget_usd + stream.max_request_cost
    if spend > bound + INVARIANT_SLACK or spend > budget_usd + max(max_over_estimate, 0.0) + INVARIANT_SLACK:
        raise BudgetInvariantError(
            f"spent {spend:.6g} USD on a budget of {budget_usd:.6g} (max request cost {stream.max_request_cost:.6g}, "
            f"largest cost over its estimate {max_over_estimate:.6g})"
        )
    served = arms >= 0
    return {
        "spend_usd": spend,
        "accuracy": float(np.nanmean(score)),
        "exhausted_at": exhausted_at,
        "exhausted_at_fraction": None if exhausted_at is None else exhausted_at / n,
        "n_refused": int((~served).sum()),
        "n_fallback_cheapest": n_fallback,
        "max_cost_over_estimate_usd": max_over_estimate,
        "arm_counts": np.bincount(arms[served], minlength=len(stream.models)).tolist(),
        "score": score,
        "cost": charged,
        "arm": arms,
    }


def _update(policy, stream: Stream, order: np.ndarray, pending: list[tuple[int, int, float]], batch_cls) -> None:
    pos = np.array([p[0] for p in pending], dtype=np.int64)
    rows = order[pos]
    arm = np.array([p[1] for p in pending], dtype=np.int64)
    policy.update(
        batch_cls(
            contexts=stream.contexts[rows],
            preferences=np.tile(PREFERENCE, (len(rows), 1)),
            arms=arm,
            propensities=np.clip([p[2] for p in pending], 1e-12, 1.0),
            scores=stream.scores[rows, arm],
            costs=stream.costs[rows, arm],
        )
    )


def policy_ratio_bounds(policy, contexts: np.ndarray, weights: np.ndarray, optimistic: bool) -> tuple[float, float]:
    """(L, U) from the policy's values on tuning prompts (the train split), in the mode pacing uses."""
    prefs = np.tile(PREFERENCE, (len(contexts), 1))
    values = policy.values(contexts, prefs, explore=optimistic)
    try:
        return ratio_bounds(values, weights)
    except ValueError as e:
        raise ValueError(
            f"{policy.name}: {e} (its {'optimistic' if optimistic else 'greedy'} values on the train split are never "
            "positive; a cold learner needs value mode 'optimistic')"
        ) from None


# ========================================================================================================
# Aggregation and figures
# ========================================================================================================
def bucket_means(values: np.ndarray, bucket: int) -> np.ndarray:
    """Mean (NaN-aware) of consecutive blocks of `bucket` entries (the last may be shorter)."""
    edges = list(range(0, len(values), bucket)) + [len(values)]
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        block = values[a:b]
        out.append(float(np.nanmean(block)) if np.isfinite(block).any() else float("nan"))
    return np.array(out)


def summarise(runs: list[dict[str, Any]], policies: Sequence[str], budgets: Sequence[float]) -> dict[str, dict[str, dict]]:
    """Per policy, per budget fraction: mean and sd over seeds of accuracy, spend / budget and exhausted_at."""
    out: dict[str, dict[str, dict]] = {}
    for p in policies:
        out[p] = {}
        for b in budgets:
            rs = [r for r in runs if r["policy"] == p and r["budget_fraction"] == b]
            if not rs:
                continue
            acc = np.array([r["accuracy"] for r in rs])
            used = np.array([r["spend_usd"] / r["budget_usd"] for r in rs])
            ex = [r["exhausted_at_fraction"] for r in rs if r["exhausted_at_fraction"] is not None]
            out[p][str(b)] = {
                "accuracy_mean": float(acc.mean()),
                "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "spend_over_budget_mean": float(used.mean()),
                "max_overspend_usd": float(max(r["spend_usd"] - r["budget_usd"] for r in rs)),
                "runs_exhausted": len(ex),
                "exhausted_at_fraction_mean": float(np.mean(ex)) if ex else None,
            }
    return out


STYLE = {
    "pilot": dict(color="tab:red", lw=2.4, marker="o", zorder=6),
    "linucb": dict(color="tab:blue", lw=1.8, marker="^"),
    "barp": dict(color="tab:purple", lw=1.6, marker="s"),
    "cheapest": dict(color="tab:brown", lw=1.2, marker="+", ls="--"),
    "greedy": dict(color="tab:olive", lw=1.2, marker="x", ls="--"),
}


def plot_frontier(results: dict, summary: dict, path: Path, dpi: int = 120) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for name, per in summary.items():
        b = sorted(per, key=float)
        x = [float(v) for v in b]
        st = STYLE.get(name, {})
        axes[0].errorbar(
            x, [per[v]["accuracy_mean"] for v in b], yerr=[per[v]["accuracy_sd"] for v in b], label=name, capsize=3, **st
        )
        axes[1].plot(x, [per[v]["spend_over_budget_mean"] for v in b], label=name, **st)
    ref = results["reference_model"]
    acc = results["reference_accuracy"]
    axes[0].axhline(acc, color="0.4", ls=":", lw=1)
    axes[0].scatter([1.0], [acc], marker="*", s=260, color="gold", edgecolor="black", zorder=7, label=f"{ref} alone")
    axes[1].axhline(1.0, color="0.4", ls=":", lw=1)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(results["budget_fractions"])
        ax.set_xticklabels([f"{v:g}" for v in results["budget_fractions"]])
        ax.set_xlabel("budget (fraction of the reference model's spend alone over the test stream)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("accuracy (refused prompts count 0), mean ± sd over seeds")
    axes[1].set_ylabel("spend / budget (mean over seeds)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"{results['dataset']}: accuracy under a budget, {len(results['seeds'])} seeds, n_test = {results['n_test']}, "
        f"bins of {results['bin_size']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_learning_curves(results: dict, path: Path, budget: float, dpi: int = 120) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lc = results["learning_curves"]
    bucket = lc["bucket"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6))
    key = str(budget)
    for name in LEARNERS:
        c = lc["policies"].get(name, {}).get(key)
        if c is None:
            continue
        mean, sd = np.array(c["accuracy_mean"]), np.array(c["accuracy_sd"])
        x = np.minimum(np.arange(1, len(mean) + 1) * bucket, results["n_test"])
        keep = x - (np.arange(len(x)) * bucket) >= bucket / 2  # a last bucket of a few queries is noise: not drawn
        x, mean, sd = x[keep], mean[keep], sd[keep]
        st = {k: v for k, v in STYLE[name].items() if k != "marker"}
        if name == "barp":
            st.update(alpha=0.6, lw=1.2)
        axes[0].plot(x, mean, label=name, **st)
        axes[0].fill_between(x, mean - sd, mean + sd, color=st["color"], alpha=0.12)
        axes[1].plot(x, np.asarray(c["spend_fraction_mean"])[keep], label=name, **st)
    axes[1].plot([0, results["n_test"]], [0, 1], color="0.4", ls=":", lw=1, label="straight line to the budget")
    axes[0].axhline(results["reference_accuracy"], color="0.4", ls=":", lw=1, label=f"{results['reference_model']} alone")
    axes[0].set_ylabel(f"accuracy per {bucket} queries (mean ± sd over seeds)")
    axes[1].set_ylabel("cumulative spend / budget (mean over seeds)")
    for ax in axes:
        ax.set_xlabel("queries served so far (stream position)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['dataset']}: online learning at {budget:g} x the reference spend ({len(results['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ========================================================================================================
# The whole evaluation
# ========================================================================================================
@dataclass
class BudgetEvalResult:
    results: dict
    summary: dict
    seconds: float


def pick_reference(dataset: str, models: Sequence[str], train_scores: np.ndarray, reference_model: str | None) -> tuple[str, str]:
    """(model, how it was chosen)."""
    if reference_model is not None:
        if reference_model not in models:
            raise ValueError(f"reference model {reference_model!r} is not in the pool {list(models)}")
        return reference_model, "given"
    if dataset in REFERENCE_MODELS and REFERENCE_MODELS[dataset] in models:
        return REFERENCE_MODELS[dataset], "the issue's reference for this dataset"
    best = int(np.nanargmax(np.nanmean(train_scores, axis=0)))
    return models[best], "the best train accuracy"


def _trained_policy(
    name: str, train, *, seed: int, tau: float, cache: Path, epochs: int | None, retrain: bool, progress: bool, log_fn
):
    """Train (or load from `cache`) the policy `name` on the train split."""
    from banditrouter.pipeline import train_one
    from banditrouter.policies import load_checkpoint, make_policy, save_checkpoint

    # the policy's settings as this code builds it (defaults included): a checkpoint cached under other settings
    # (e.g. before a default changed) is trained again, not loaded silently
    settings = make_policy(name, train.log.models, train.contexts.shape[1], tau, seed=seed)._config()
    meta = {
        "policy": name,
        "config": json.loads(json.dumps(settings, default=str)),
        "n_train": len(train.log),
        "models": list(train.log.models),
        "seed": seed,
        "epochs": epochs,
        "tau": tau,
        "first_prompt_ids": list(train.log.prompt_ids[:5]),
    }
    ckpt, side = cache / f"{name}-seed{seed}.pt", cache / f"{name}-seed{seed}.json"
    if not retrain and ckpt.exists() and side.exists():
        try:
            if json.loads(side.read_text()) == meta:
                log_fn(f"{name}: loaded the policy trained earlier from {ckpt}")
                return load_checkpoint(ckpt, seed=seed, expect=name)
        except (ValueError, OSError) as e:
            log_fn(f"{name}: cached {ckpt} unusable ({e}); training again")
    t = time.perf_counter()
    policy = train_one(name, train, seed=seed, epochs=epochs, tau=tau, progress=progress)
    save_checkpoint(policy, ckpt)
    side.write_text(json.dumps(meta))
    log_fn(f"{name}: trained on the train split in {time.perf_counter() - t:.0f}s (cached in {ckpt})")
    return policy


def run_budget_eval(
    dataset: str,
    out_dir: Path,
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    policies: Sequence[str] = BUDGET_POLICIES,
    bin_size: int = DEFAULT_BIN_SIZE,
    update_batch: int = DEFAULT_UPDATE_BATCH,
    value_mode: str = "optimistic",
    reference_model: str | None = None,
    train_seed: int = 0,
    barp_epochs: int | None = None,
    retrain: bool = False,
    curve_bucket: int = DEFAULT_CURVE_BUCKET,
    curve_budget: float = 0.25,
    data_dir=None,
    test_fraction: float = 0.3,
    train=None,
    test=None,
    progress: bool = True,
    log_fn=print,
) -> BudgetEvalResult:
    """Load the splits (or take `train` / `test`, banditrouter.pipeline.Split), train what needs training,
    run every (policy, budget, seed) over the test stream, write budget.json, budget_frontier.png and
    learning_curves.png into `out_dir`."""
    from tqdm import tqdm

    from banditrouter.pipeline import Split, load_split
    from banditrouter.reward import cost_scale

    budgets = parse_budgets(budgets)
    policies = check_policies(policies)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    if value_mode not in VALUE_MODES:
        raise ValueError(f"value mode must be one of {VALUE_MODES}, got {value_mode!r}")
    if bin_size < 1 or update_batch < 1 or curve_bucket < 1:
        raise ValueError("bin_size, update_batch and curve_bucket must be >= 1")
    if barp_epochs is not None and barp_epochs < 0:
        raise ValueError("barp_epochs must be >= 0")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "barp" in policies:
        import torch

        torch.set_num_threads(1)  # one-row forward passes and small batches: thread hand-offs cost more than they save
    if train is None or test is None:
        from banditrouter.embeddings import Embedder

        embedder = Embedder()
        kw = dict(data_dir=data_dir, test_fraction=test_fraction, embedder=embedder, progress=progress)
        train = train or load_split(dataset, "train", **kw)
        test = test or load_split(dataset, "test", **kw)
    models = tuple(train.log.models)
    try:
        test = Split(test.log.with_models(models), test.contexts)
    except ValueError as e:
        raise ValueError(f"the test split cannot be scored in the train split's arm order: {e}") from None
    tau = cost_scale(train.log.costs)
    estimator = CostEstimator.fit(train.log)
    stream = Stream(
        contexts=np.asarray(test.contexts, dtype=np.float32),
        scores=test.log.scores,
        costs=test.log.costs,
        weights=estimator([len(p) for p in test.log.prompts]),
        models=models,
    )
    train_weights = estimator([len(p) for p in train.log.prompts])
    ref, ref_how = pick_reference(dataset, models, train.log.scores, reference_model)
    k_ref = models.index(ref)
    ref_spend = float(np.nansum(test.log.costs[:, k_ref]))
    if not ref_spend > 0:
        raise ValueError(f"the reference model {ref!r} costs nothing over the test split: budgets cannot be fractions of it")
    train_acc = np.nanmean(train.log.scores, axis=0)
    greedy_arm = int(np.nanargmax(train_acc))
    optimistic = value_mode == "optimistic"

    # -- the learners as they stand when the stream starts, and their pacing ---------------------------
    templates: dict[str, Any] = {}
    pacing: dict[str, Pacing] = {}
    policy_info: dict[str, dict] = {}
    for name in policies:
        if name in TRAINED:
            templates[name] = _trained_policy(
                name,
                train,
                seed=train_seed,
                tau=tau,
                cache=out_dir / "checkpoints",
                epochs=barp_epochs if name == "barp" else None,
                retrain=retrain,
                progress=progress,
                log_fn=log_fn,
            )
        elif name == "linucb":
            from banditrouter.policies import make_policy

            templates[name] = make_policy("linucb", models, stream.contexts.shape[1], tau, seed=train_seed)
        if name in templates:
            L, U = policy_ratio_bounds(templates[name], train.contexts, train_weights, optimistic)
            pacing[name] = Pacing(L, U, bin_size, optimistic)
            policy_info[name] = {"L": L, "U": U, "values": value_mode, "config": templates[name]._config()}
    if "cheapest" in policies:
        policy_info["cheapest"] = {"arm": "the lowest estimated cost per prompt"}
    if "greedy" in policies:
        policy_info["greedy"] = {"arm": models[greedy_arm], "train_accuracy": float(train_acc[greedy_arm])}

    # -- the runs -------------------------------------------------------------------------------------
    n = len(stream)
    runs: list[dict[str, Any]] = []
    traces: dict[tuple[str, float], list[tuple[np.ndarray, np.ndarray]]] = {}
    tasks = [(s, b, p) for s in seeds for b in budgets for p in policies]
    with tqdm(total=len(tasks) * n, desc="budget-eval", unit="query", disable=not progress, smoothing=0.05) as bar:
        for seed, frac, name in tasks:
            order = np.random.default_rng(seed).permutation(n)
            budget_usd = frac * ref_spend
            t = time.perf_counter()
            # keyed by the budget's value, not its place in --budgets: a run does not depend on the other budgets
            rng = np.random.default_rng([seed, BUDGET_POLICIES.index(name), int(round(frac * 1e6))])
            if name in templates:
                policy = copy.deepcopy(templates[name])
                policy.rng = np.random.default_rng([seed, 1 + BUDGET_POLICIES.index(name)])
                r = run_stream(
                    stream,
                    budget_usd,
                    order,
                    kind="paced",
                    policy=policy,
                    pacing=pacing[name],
                    update_batch=update_batch,
                    rng=rng,
                )
            elif name == "cheapest":
                r = run_stream(stream, budget_usd, order, kind="cheapest")
            else:
                r = run_stream(stream, budget_usd, order, kind="fixed", fixed_arm=greedy_arm)
            traces.setdefault((name, frac), []).append((r.pop("score"), r.pop("cost")))
            r.pop("arm")
            runs.append(
                {
                    "policy": name,
                    "budget_fraction": frac,
                    "budget_usd": budget_usd,
                    "seed": seed,
                    "spend_usd": r.pop("spend_usd"),
                    "accuracy": r.pop("accuracy"),
                    "exhausted_at": r.pop("exhausted_at"),
                    **r,
                    "seconds": round(time.perf_counter() - t, 2),
                }
            )
            bar.update(n)

    # -- results --------------------------------------------------------------------------------------
    curves: dict[str, dict[str, dict]] = {}
    for (name, frac), tr in traces.items():
        acc = np.array([bucket_means(s, curve_bucket) for s, _ in tr])
        ends = np.minimum(np.arange(1, acc.shape[1] + 1) * curve_bucket, n) - 1
        spent = np.array([np.cumsum(c)[ends] / (frac * ref_spend) for _, c in tr])
        curves.setdefault(name, {})[str(frac)] = {
            "accuracy_mean": np.nanmean(acc, axis=0).tolist(),
            "accuracy_sd": (np.nanstd(acc, axis=0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])).tolist(),
            "spend_fraction_mean": spent.mean(axis=0).tolist(),
        }
    summary = summarise(runs, policies, budgets)
    max_cost = stream.max_request_cost
    overspend = max(r["spend_usd"] - r["budget_usd"] for r in runs)
    checks: dict[str, Any] = {
        "max_overspend_usd": overspend,
        "max_request_cost_usd": max_cost,
        "spend_within_budget_plus_max_request": bool(overspend <= max_cost + INVARIANT_SLACK),
    }
    if "pilot" in summary and "linucb" in summary:
        checks["pilot_vs_linucb"] = {
            b: {
                "pilot": summary["pilot"][b]["accuracy_mean"],
                "linucb": summary["linucb"][b]["accuracy_mean"],
                "difference": summary["pilot"][b]["accuracy_mean"] - summary["linucb"][b]["accuracy_mean"],
            }
            for b in summary["pilot"]
        }
    ref_acc = float(np.nanmean(test.log.scores[:, k_ref]))
    checks["share_of_reference_accuracy"] = {
        name: {b: v["accuracy_mean"] / ref_acc for b, v in per.items()} for name, per in summary.items()
    }
    seconds = time.perf_counter() - t0
    results = {
        "dataset": dataset,
        "seeds": seeds,
        "reference_spend_usd": ref_spend,
        "max_request_cost_usd": max_cost,
        "runs": runs,
        "reference_model": ref,
        "reference_model_chosen_by": ref_how,
        "reference_accuracy": ref_acc,
        "budget_fractions": budgets,
        "n_train": len(train.log),
        "n_test": n,
        "models": list(models),
        "bin_size": bin_size,
        "update_batch": update_batch,
        "preference": list(PREFERENCE),
        "train_seed": train_seed,
        "tau": tau,
        "cost_estimator": estimator.to_dict(),
        "policies": policy_info,
        "accuracy_note": "mean score over the whole test stream; refused prompts count 0, served prompts whose logged "
        "score is missing are left out",
        "summary": summary,
        "checks": checks,
        "learning_curves": {"bucket": curve_bucket, "policies": curves},
        "wall_seconds": round(seconds, 1),
    }
    (out_dir / "budget.json").write_text(json.dumps(results, indent=1))
    plot_frontier(results, summary, out_dir / "budget_frontier.png")
    if curve_budget in budgets:
        plot_learning_curves(results, out_dir / "learning_curves.png", curve_budget)
    else:
        log_fn(f"no learning_curves.png: the curve budget {curve_budget} is not among the budgets {budgets}")
    return BudgetEvalResult(results, summary, seconds)
