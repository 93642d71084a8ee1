"""The one in-memory form of a routing log: prompts x models -> (score, cost, response, latency)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RoutingLog:
    """Outcomes of K models on N prompts. Missing cells are NaN (scores/costs) or None (responses).

    Every loader returns this; policies never see it directly during bandit training (they only get the
    outcome of the arm they chose, through `banditrouter.training.BanditFeedback`).
    """

    name: str
    prompt_ids: tuple[str, ...]
    prompts: tuple[str, ...]
    models: tuple[str, ...]
    scores: np.ndarray
    """(N, K) float64 in [0, 1]; NaN where the outcome is unknown."""
    costs: np.ndarray
    """(N, K) float64, USD per call; NaN where unknown."""
    tasks: tuple[str | None, ...] = ()
    responses: tuple[tuple[str | None, ...], ...] | None = None
    """Per prompt, per model: the logged answer text, when the source has it."""
    latency_s: np.ndarray | None = None
    """(N, K) float64 seconds, when the source has it."""
    notes: tuple[str, ...] = field(default=())
    """Assumptions the loader made (e.g. how cost was estimated); shown in reports."""

    def __post_init__(self) -> None:
        n, k = len(self.prompts), len(self.models)
        if len(self.prompt_ids) != n:
            raise ValueError(f"{self.name}: {len(self.prompt_ids)} prompt ids for {n} prompts")
        if len(set(self.models)) != k:
            raise ValueError(f"{self.name}: duplicate model names in {self.models}")
        if not self.tasks:
            object.__setattr__(self, "tasks", (None,) * n)
        for what, arr in (("scores", self.scores), ("costs", self.costs), ("latency_s", self.latency_s)):
            if arr is None:
                continue
            if arr.shape != (n, k):
                raise ValueError(f"{self.name}: {what} has shape {arr.shape}, expected ({n}, {k})")
        s = self.scores[~np.isnan(self.scores)]
        if s.size and (s.min() < 0 or s.max() > 1):
            raise ValueError(f"{self.name}: scores must lie in [0, 1], got range [{s.min()}, {s.max()}]")
        c = self.costs[~np.isnan(self.costs)]
        if c.size and c.min() < 0:
            raise ValueError(f"{self.name}: costs must be >= 0, got {c.min()}")
        if self.responses is not None and len(self.responses) != n:
            raise ValueError(f"{self.name}: {len(self.responses)} response rows for {n} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_models(self) -> int:
        return len(self.models)

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> RoutingLog:
        idx = np.asarray(index, dtype=np.int64)
        pick = lambda seq: tuple(seq[i] for i in idx)  # noqa: E731
        return RoutingLog(
            name=name or self.name,
            prompt_ids=pick(self.prompt_ids),
            prompts=pick(self.prompts),
            models=self.models,
            scores=self.scores[idx],
            costs=self.costs[idx],
            tasks=pick(self.tasks),
            responses=pick(self.responses) if self.responses is not None else None,
            latency_s=self.latency_s[idx] if self.latency_s is not None else None,
            notes=self.notes,
        )

    def with_models(self, models: Sequence[str]) -> RoutingLog:
        """The same log with its model columns in the given order (arm k of a policy trained on another
        split must mean the same model here). Raises if a model is missing."""
        models = tuple(models)
        if models == self.models:
            return self
        missing = [m for m in models if m not in self.models]
        if missing:
            raise ValueError(f"{self.name}: no outcomes for models {missing}")
        cols = [self.models.index(m) for m in models]
        return RoutingLog(
            name=self.name,
            prompt_ids=self.prompt_ids,
            prompts=self.prompts,
            models=models,
            scores=self.scores[:, cols],
            costs=self.costs[:, cols],
            tasks=self.tasks,
            responses=tuple(tuple(r[c] for c in cols) for r in self.responses) if self.responses is not None else None,
            latency_s=self.latency_s[:, cols] if self.latency_s is not None else None,
            notes=self.notes,
        )

    def head(self, n: int) -> RoutingLog:
        return self.subset(np.arange(min(n, len(self))))

    def single_model_stats(self) -> dict[str, dict[str, float]]:
        """Mean score and mean cost of always choosing each model (missing cells skipped)."""
        out = {}
        for k, m in enumerate(self.models):
            out[m] = {
                "accuracy": float(np.nanmean(self.scores[:, k])),
                "cost": float(np.nanmean(self.costs[:, k])),
            }
        return out
