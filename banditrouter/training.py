"""Offline training from a routing log.

Bandit learners see the log only through `BanditFeedback.reveal(rows, arms)`: after the policy chooses an
arm for a prompt, only that cell's score and cost come back (the deployment restriction BaRP trains under).
A prompt whose chosen cell is missing in the log yields no sample. The full-information reference gets
every observed cell instead (`train_full_information`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from banditrouter.data.log import RoutingLog
from banditrouter.policies.base import BanditBatch, Policy
from banditrouter.reward import DEFAULT_PREFERENCE_SAMPLER, sample_preferences

DEFAULT_EPOCHS = {"barp": 100, "supervised": 40, "acqb": 1, "pilot": 0}
"""Epochs per policy when none is given: BaRP as in the paper's summary; the linear and static learners
have converged long before (their statistics are sufficient), so they get DEFAULT_BANDIT_EPOCHS. ACQB [ours]
pretrains on one pass: its online Newton/IRLS posterior counts every sample as new evidence, so a second pass
over the same prompts would shrink its posterior (and its anytime counter t would grow) as if twice the data
had been seen; `--epochs 0` writes a cold checkpoint (an untrained ACQB with the log's tau). PILOT: 0, its
offline training is the preference prior (`banditrouter.policies.pilot.build_pilot`, full information), and
its online statistics start at the prior; `--epochs N` adds N passes of bandit pretraining on top."""
DEFAULT_BANDIT_EPOCHS = 20


def default_epochs(policy_name: str) -> int:
    return DEFAULT_EPOCHS.get(policy_name, DEFAULT_BANDIT_EPOCHS)


class BanditFeedback:
    """Reveals the outcome of the chosen arm only."""

    def __init__(self, log: RoutingLog):
        self._scores = log.scores
        self._costs = log.costs

    def reveal(self, rows: np.ndarray, arms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._scores[rows, arms], self._costs[rows, arms]


@dataclass
class TrainHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)


def train_bandit(
    policy: Policy,
    contexts: np.ndarray,
    feedback: BanditFeedback,
    *,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    preference_sampler: str = DEFAULT_PREFERENCE_SAMPLER,
) -> TrainHistory:
    """Each epoch visits every prompt once in random order with a fresh preference w drawn by
    `preference_sampler`; the policy picks arms with its exploring behaviour and learns from the revealed
    outcomes."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    n = len(contexts)
    history = TrainHistory()
    for epoch in tqdm(range(epochs), desc=f"train {policy.name}", unit="epoch", disable=not progress, leave=False):
        perm = rng.permutation(n)
        rewards, count = 0.0, 0
        for s in range(0, n, batch_size):
            rows = perm[s : s + batch_size]
            prefs = sample_preferences(len(rows), rng, preference_sampler)
            dec = policy.select(contexts[rows], prefs, explore=True)
            scores, costs = feedback.reveal(rows, dec.arms)
            seen = np.isfinite(scores) & np.isfinite(costs)
            if not seen.any():
                continue
            batch = BanditBatch(
                contexts=contexts[rows][seen],
                preferences=prefs[seen],
                arms=dec.arms[seen],
                propensities=dec.propensities[seen],
                scores=scores[seen],
                costs=costs[seen],
            )
            policy.update(batch)
            rewards += float(batch.rewards(policy.tau).sum())
            count += len(batch)
        history.epochs.append({"epoch": epoch, "train_reward": rewards / max(count, 1)})
    return history


def train_full_information(
    policy: Policy,
    contexts: np.ndarray,
    log: RoutingLog,
    *,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> TrainHistory:
    """Every observed (prompt, model) cell is a sample; a batch holds all models of `batch_size` prompts."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    n, k = log.scores.shape
    rows_all, arms_all = np.nonzero(np.isfinite(log.scores) & np.isfinite(log.costs))
    by_row = np.split(np.arange(len(rows_all)), np.flatnonzero(np.diff(rows_all)) + 1)
    history = TrainHistory()
    for epoch in tqdm(range(epochs), desc=f"train {policy.name}", unit="epoch", disable=not progress, leave=False):
        order = rng.permutation(len(by_row))
        losses = []
        for s in range(0, len(order), batch_size):
            cells = np.concatenate([by_row[i] for i in order[s : s + batch_size]])
            r, a = rows_all[cells], arms_all[cells]
            batch = BanditBatch(
                contexts=contexts[r],
                preferences=np.tile([1.0, 0.0], (len(r), 1)),
                arms=a,
                propensities=np.ones(len(r)),
                scores=log.scores[r, a],
                costs=log.costs[r, a],
            )
            losses.append(policy.update(batch).get("loss", 0.0))
        history.epochs.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else 0.0})
    return history


def train_policy(
    policy: Policy,
    contexts: np.ndarray,
    log: RoutingLog,
    *,
    epochs: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    preference_sampler: str = DEFAULT_PREFERENCE_SAMPLER,
) -> TrainHistory:
    """Full information for the supervised reference, bandit feedback for every other policy."""
    epochs = default_epochs(policy.name) if epochs is None else epochs
    if policy.full_information:
        return train_full_information(policy, contexts, log, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)
    return train_bandit(
        policy,
        contexts,
        BanditFeedback(log),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        preference_sampler=preference_sampler,
    )
