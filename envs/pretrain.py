"""RLlib PPO on RoutingEnv (Dict observations flattened by the FlattenObservations env-to-module connector).

RLlib 2.60 ships no bandit algorithms; PPO on one-step episodes is a policy-gradient learner close to BaRP's
REINFORCE (with a learned value baseline instead of the batch mean). Used to pretrain and to check the env.
"""

from __future__ import annotations

from typing import Any


def ppo_config(
    env_config: dict,
    *,
    train_batch_size: int = 512,
    minibatch_size: int = 128,
    num_epochs: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.connectors.env_to_module import FlattenObservations

    from envs.routing import RLLIB_ENV_NAME, register

    register()
    return (
        PPOConfig()
        .environment(RLLIB_ENV_NAME, env_config=env_config)
        .env_runners(num_env_runners=0, env_to_module_connector=lambda env, spaces=None, device=None: FlattenObservations())
        .training(
            train_batch_size_per_learner=train_batch_size,
            minibatch_size=minibatch_size,
            num_epochs=num_epochs,
            lr=lr,
            gamma=1.0,
            lambda_=1.0,
        )
        .debugging(seed=seed)
    )


def train_ppo(env_config: dict, iterations: int, **kwargs: Any) -> list[float]:
    """Train for `iterations`; returns the mean episode return of each iteration."""
    algo = ppo_config(env_config, **kwargs).build_algo()
    try:
        returns = []
        for _ in range(iterations):
            res = algo.train()
            returns.append(float(res["env_runners"]["episode_return_mean"]))
        return returns
    finally:
        algo.stop()
