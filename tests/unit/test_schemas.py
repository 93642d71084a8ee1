"""Events' dicts (what the sink, the JSONL log and the shipper get): the same as `dataclasses.asdict`, made
without its item-by-item deep copy of the 384-float context (issue 13, fewer copies), and still copies."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np

from banditrouter.schemas import DecisionEvent, FeedbackEvent


def _decision() -> DecisionEvent:
    x = np.random.default_rng(0).normal(size=384).astype(np.float32)
    return DecisionEvent(
        decision_id="d1",
        request_id="r1",
        model="m",
        arm=1,
        propensity=0.5,
        policy="barp",
        policy_version=3,
        preference=(0.7, 0.3),
        context=x.tolist(),
        context_ref="c",
        cost_usd=0.01,
        latency_s=0.2,
        pool_version="p",
        user="u",
        history_refs=("h1", "h2"),
        turn_context=(x * 2).tolist(),
        paced=True,
        pacing_z=0.4,
    )


def test_to_dict_is_asdict():
    for ev in (_decision(), FeedbackEvent("d1", "explicit", 0.5)):
        assert ev.to_dict() == dataclasses.asdict(ev)
        assert json.dumps(ev.to_dict()) == json.dumps(dataclasses.asdict(ev))


def test_to_dict_copies_the_lists():
    ev = _decision()
    d = ev.to_dict()
    d["context"][0] = 99.0
    d["turn_context"].append(1.0)
    assert ev.context[0] != 99.0 and len(ev.turn_context) == 384


def test_to_dict_makes_no_item_by_item_deep_copy(monkeypatch):
    """`dataclasses.asdict` deep-copies every float of the context (about 0.4 ms per event: bench_copies.py)."""

    def refuse(*_a, **_k):
        raise AssertionError("copy.deepcopy called")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    ev = _decision()
    assert ev.to_dict()["context"] == ev.context
