"""Learning from implicit signals (issue 10 §4), without Ray: `learning.train_on_implicit` defaults on for a
queue-aware policy, and an explicit score wins over a retrial / accepted label of the same decision."""

from __future__ import annotations

import numpy as np
import pytest
from factories import MODELS, decision

from banditrouter.config import load_config
from banditrouter.policies import make_policy
from banditrouter.schemas import FeedbackEvent
from learner.core import Learner, LearnerSettings


def _learner(tmp_path, implicit=True):
    pol = make_policy("linucb", MODELS, 8, tau=0.01)
    return Learner(pol, tmp_path / "learner", LearnerSettings(batch_size=100, max_wait_s=60, train_on_implicit=implicit))


def _rows(*events):
    return list(enumerate(events, start=1))


def test_explicit_score_replaces_a_waiting_implicit_label(tmp_path, rng):
    ln = _learner(tmp_path)
    ln.consume(
        _rows(
            decision(0, rng, user="u"),
            FeedbackEvent("d0", "retrial", 0.0).to_dict(),  # the user re-sent before rating ...
            FeedbackEvent("d0", "explicit", 0.9).to_dict(),  # ... then rated the first answer 0.9
        )
    )
    (s,) = ln.samples
    assert (s.score, s.kind) == (0.9, "explicit") and ln.counts["explicit_over_implicit"] == 1


def test_explicit_first_then_accepted_keeps_the_explicit_score(tmp_path, rng):
    ln = _learner(tmp_path)
    ln.consume(_rows(decision(0, rng, user="u"), FeedbackEvent("d0", "explicit", 0.2).to_dict()))
    ln.consume([(3, FeedbackEvent("d0", "accepted", 1.0).to_dict())])  # T passed with no retrial
    (s,) = ln.samples
    assert (s.score, s.kind) == (0.2, "explicit")


def test_an_explicit_score_after_the_implicit_one_was_applied_is_counted_not_applied(tmp_path, rng):
    ln = _learner(tmp_path)
    ln.consume(_rows(decision(0, rng, user="u"), FeedbackEvent("d0", "retrial", 0.0).to_dict()))
    ln.update()
    params = ln.policy.state_dict()["params"]
    ln.consume([(3, FeedbackEvent("d0", "explicit", 1.0).to_dict())])
    assert not ln.samples and ln.counts["explicit_after_implicit"] == 1
    for k, v in ln.policy.state_dict()["params"].items():
        np.testing.assert_array_equal(v, params[k])


def test_a_failed_call_keeps_its_failure_score_over_a_later_explicit_one(tmp_path, rng):
    ln = _learner(tmp_path)
    ln.consume(
        _rows(decision(0, rng), FeedbackEvent("d0", "error", 0.0).to_dict(), FeedbackEvent("d0", "explicit", 1.0).to_dict())
    )
    (s,) = ln.samples
    assert (s.score, s.kind) == (0.0, "error") and not ln.counts["explicit_over_implicit"]


def test_implicit_labels_train_only_when_on(tmp_path, rng):
    on, off = _learner(tmp_path / "on"), _learner(tmp_path / "off", implicit=False)
    rows = _rows(decision(0, rng, user="u"), FeedbackEvent("d0", "accepted", 1.0).to_dict())
    on.consume(rows)
    off.consume(rows)
    assert [s.kind for s in on.samples] == ["accepted"] and not off.samples


def _cfg(tmp_path, name, **learning):
    from banditrouter.policies import save_checkpoint

    ckpt = save_checkpoint(make_policy(name, MODELS, 8, tau=0.01), tmp_path / f"{name}.pt")
    return load_config(
        {
            "policy": {"name": name, "checkpoint": str(ckpt), "explore": True},
            "learning": {"enabled": True, "state_dir": str(tmp_path / "s"), **learning},
            "models": [{"name": m} for m in MODELS],
        }
    )


@pytest.mark.parametrize(("name", "expected"), [("acqb", True), ("linucb", False)])
def test_train_on_implicit_defaults_on_for_a_queue_aware_policy(tmp_path, name, expected):
    assert _cfg(tmp_path, name).learning.train_on_implicit is expected
    assert _cfg(tmp_path, name, train_on_implicit=not expected).learning.train_on_implicit is (not expected)


@pytest.mark.parametrize(
    ("path", "policy"), [("configs/online-acqb.yaml", "acqb"), ("configs/online-linucb-implicit.yaml", "linucb")]
)
def test_the_live_retrial_configs_learn_from_implicit_signals_above_capacity(path, policy):
    """Must-show 3's configs: both learn from retrials from a cold start, with the same pool, slots, latency and
    retrial window, and scripts/live_retrials.sh's rate (6/s) is 1.5x the best model's capacity."""
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / path)
    assert cfg.policy.name == policy and cfg.policy.explore
    assert cfg.learning.enabled and cfg.learning.cold_start and cfg.learning.train_on_implicit is True
    assert cfg.learning.retrial_window_s == 10 and cfg.router.queue_capacity == 16
    assert all(m.replay.simulate_latency and m.replay.base_latency_s == 0.5 and m.replay.tokens_per_s >= 1e9 for m in cfg.models)
    capacity = cfg.router.max_in_flight_per_model / 0.5  # requests/s each model can serve
    assert capacity == 4.0 and 6.0 / capacity == 1.5
