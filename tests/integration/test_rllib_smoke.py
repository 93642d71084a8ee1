"""RLlib PPO trains on RoutingEnv (Dict observation flattened by the FlattenObservations connector) and the
mean episode return rises."""

from __future__ import annotations

import numpy as np
import pytest

from envs.pretrain import train_ppo


@pytest.mark.slow
def test_ppo_return_rises_on_routing_env(ray_local):
    env_config = {"synthetic": {"n": 1000, "dim": 16, "n_arms": 4, "seed": 0}}
    returns = train_ppo(env_config, iterations=6, train_batch_size=1000, minibatch_size=250, num_epochs=6, lr=3e-3)
    assert all(np.isfinite(returns))
    # a uniformly random router earns ~0.05 here and a good one ~0.28 (tests/unit/test_policies.py)
    assert returns[-1] > returns[0] + 0.04, returns
