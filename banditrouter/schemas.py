"""The event schema that serving, the buffer, the learner and the simulator share (ARCHITECTURE.md).

Plain frozen dataclasses inside the system; pydantic lives at the HTTP and config boundaries.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Literal


def new_id() -> str:
    return uuid.uuid4().hex


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _as_dict(event) -> dict[str, Any]:
    """`dataclasses.asdict` for these flat events: the same dict, but a list field is copied in one call
    instead of item by item through `copy.deepcopy`, which made the decision's 384-float context most of the
    cost of writing an event (scripts/bench_copies.py)."""
    out = {}
    for name in _field_names(type(event)):
        v = getattr(event, name)
        out[name] = list(v) if isinstance(v, list) else v  # the other fields are scalars and tuples of str/float
    return out


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
    """When the decision was made (wall clock, before the model call): the user saw the answer at about
    `time + latency_s` (+ any queue wait after the decision), which is where the retrial window starts."""
    event_id: str = field(default_factory=new_id)
    kind: Literal["decision"] = "decision"
    outcome: Literal["ok", "error", "timeout"] = "ok"
    """How the model call ended: "ok", or "error" / "timeout" (then `cost_usd` is what the failed call cost,
    0.0 when unknown, and the router emits a FeedbackEvent of the same kind with value 0.0 after it)."""
    # -- what the buffer needs to read the user's next request (deployments/conversation.py); all optional,
    # so logs written before these fields existed still load (the buffer then falls back on `context`)
    turn_ref: str | None = None
    """`text_ref` of the latest user turn (normalised): equal refs are the same question re-sent."""
    answer_ref: str | None = None
    """`text_ref` of the answer this decision returned; None when the call failed or the answer is unknown."""
    history_refs: tuple[str, ...] = ()
    """`text_ref` of the assistant turns the request carried (the last 8): holding the previous decision's
    `answer_ref` makes the request a continuation of it."""
    turn_context: list[float] | None = None
    """Embedding of the latest user turn, only when it differs from `context` (router.context_turns > 1 and
    earlier turns present); None means `context` is the latest turn's embedding."""
    queue_wait_s: float | None = None
    """Seconds the request waited in the router's pool for a model slot (joint scheduling; None when not
    measured)."""
    queue_length: int | None = None
    """Requests waiting in the router's pool when this one was decided (joint scheduling; None when not
    measured)."""
    requested_at: float | None = None
    """Wall time the request reached the ingress (None: take `time`). The retrial window runs from the
    previous decision's `answered_at` to this."""
    answered_at: float | None = None
    """Wall time the answer (or the failure) was out (None: take `time + latency_s`)."""
    key_id: str | None = None
    """Public id of the API key that made the request (None: auth off). Only that key may score it."""
    fallback: bool = False
    """The model first chosen failed and this decision is the fallback the policy chose among the rest."""
    allowed: int | None = None
    """How many models the request could use (the ingress's budget / `max_cost_usd` filter); None: all."""
    paced: bool = False
    """The key paces its budget (`pacing: zcl`): the model was chosen by the ZCL rule (banditrouter/pacing.py)."""
    pacing_z: float | None = None
    """Fraction of the current budget bin spent when the request arrived (paced decisions)."""
    eligible: int | None = None
    """Paced decisions: how many allowed models reached the ZCL threshold."""
    fallback_cheapest: bool | None = None
    """Paced decisions: none was eligible, so the cheapest allowed model served."""

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


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
        return _as_dict(self)
