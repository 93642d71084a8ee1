"""Config validation: combinations that would silently mislearn are refused at load, naming the fields."""

from __future__ import annotations

import pytest

from banditrouter.config import ConfigError, load_config

POOL = [{"name": "a"}, {"name": "b"}]


def _cfg(policy: dict, learning: dict) -> dict:
    return {"policy": policy, "learning": learning, "models": POOL}


def test_propensity_learner_refuses_a_deterministic_logger():
    """BaRP learning online from argmax decisions (propensity 1) is biased and never explores (issue 9)."""
    with pytest.raises(ConfigError, match=r"learning\.enabled.*policy\.explore"):
        load_config(_cfg({"name": "barp", "explore": False}, {"enabled": True}))


@pytest.mark.parametrize(
    "policy, learning",
    [
        ({"name": "barp", "explore": True}, {"enabled": True}),  # exploring: true propensities
        ({"name": "barp", "explore": False}, {"enabled": False}),  # serving only
        ({"name": "linucb", "explore": False}, {"enabled": True}),  # count-based: needs no propensity
        ({"name": "lints", "explore": False}, {"enabled": True}),
    ],
)
def test_valid_learning_combinations_load(policy, learning):
    cfg = load_config(_cfg(policy, learning))
    assert (cfg.policy.name, cfg.policy.explore, cfg.learning.enabled) == (policy["name"], policy["explore"], learning["enabled"])


def test_unknown_policy_name_is_named():
    with pytest.raises(ConfigError, match="unknown policy"):
        load_config(_cfg({"name": "nope", "explore": False}, {"enabled": True}))


def test_checkpoint_of_another_policy_is_refused(tmp_path):
    """The config checks hold for policy.name; a checkpoint of another policy would bypass them (e.g. name:
    linucb with a BaRP checkpoint and explore: false), so routers and the learner refuse it."""
    from banditrouter.policies import StateError, load_checkpoint, make_policy, save_checkpoint

    path = save_checkpoint(make_policy("barp", ("a", "b"), 4, tau=0.01), tmp_path / "barp.pt")
    assert load_checkpoint(path, expect="barp").name == "barp"
    with pytest.raises(StateError, match="policy.name: 'linucb'"):
        load_checkpoint(path, expect="linucb")


def test_retention_must_outlive_the_pending_horizon():
    with pytest.raises(ConfigError, match="retention_s"):
        load_config(_cfg({"name": "linucb"}, {"enabled": True, "retention_s": 60, "pending_horizon_s": 3600}))
