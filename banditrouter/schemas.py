"""The event schema that serving, the buffer, the learner and the simulator share (ARCHITECTURE.md).

Plain frozen dataclasses inside the system; pydantic lives at the HTTP and config boundaries.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class DecisionEvent:
    """One routing decision, emitted by the router for every request it routes."""

    decision_id: str
    request_id: str
    model: str
    arm: int
    propensity: float
    policy: str
    policy_version: int
    preference: tuple[float, float]
    """(w_quality, w_cost) after normalisation."""
    context: list[float] | None
    """The prompt embedding the policy saw (None when only a reference is kept)."""
    context_ref: str | None
    """sha256 of the prompt text: the embedding cache key."""
    cost_usd: float | None
    latency_s: float | None
    pool_version: str
    user: str | None = None
    time: float = field(default_factory=time.time)
    event_id: str = field(default_factory=new_id)
    kind: Literal["decision"] = "decision"
    outcome: Literal["ok", "error", "timeout"] = "ok"
    """How the model call ended: "ok", or "error" / "timeout" (then `cost_usd` is what the failed call cost,
    0.0 when unknown, and the router emits a FeedbackEvent of the same kind with value 0.0 after it)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FeedbackEvent:
    """What came back about a decision: an explicit score, a retrial, acceptance, or the model call failing
    (`error`, `timeout`: emitted by the router with value 0.0, so the policy learns that an arm fails)."""

    decision_id: str
    kind: Literal["explicit", "retrial", "accepted", "timeout", "error"]
    value: float | None = None
    time: float = field(default_factory=time.time)
    event_id: str = field(default_factory=new_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
