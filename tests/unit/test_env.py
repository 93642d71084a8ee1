from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from banditrouter.reward import normalised_cost
from envs import ENV_ID, RoutingEnv, make_routing_env, register


@pytest.fixture
def env():
    return make_routing_env({"synthetic": {"n": 100, "dim": 8, "n_arms": 3, "seed": 1}})


def test_passes_gymnasium_env_checker(env):
    check_env(env, skip_render_check=True)


def test_seeded_resets_are_deterministic(env):
    a, _ = env.reset(seed=11)
    b, _ = env.reset(seed=11)
    c, _ = env.reset(seed=12)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_one_step_episode_with_barp_reward(env):
    obs, info = env.reset(seed=0)
    row, (wq, wc) = info["row"], obs["preference"]
    _, r, terminated, truncated, step_info = env.step(2)
    expected = wq * env.scores[row, 2] - wc * normalised_cost(env.costs[row, 2], env.tau)
    assert terminated and not truncated and step_info["observed"]
    assert r == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(RuntimeError):
        env.step(0)
    with pytest.raises(ValueError):
        env.reset(seed=0) and env.step(7)


def test_fixed_preference_and_missing_cell():
    scores = np.array([[np.nan, 1.0]])
    e = RoutingEnv(np.zeros((1, 4), np.float32), scores, np.array([[1.0, 1.0]]), tau=1.0, preference=(3.0, 1.0))
    obs, _ = e.reset(seed=0)
    np.testing.assert_allclose(obs["preference"], [0.75, 0.25])
    _, r, *_, info = e.step(0)
    assert r == 0.0 and info["observed"] is False


def test_registered_with_gymnasium_and_rllib():
    register()
    e = gym.make(ENV_ID, config={"synthetic": {"n": 20, "dim": 4}})
    assert e.observation_space["embedding"].shape == (4,)
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from envs import RLLIB_ENV_NAME

    assert _global_registry.contains(ENV_CREATOR, RLLIB_ENV_NAME)
