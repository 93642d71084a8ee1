"""`RoutingEnv`: one-step episodes over a routing log, with the BaRP reward.

    observation  Dict{"embedding": Box(-1, 1, (d,)), "preference": Box(0, 1, (2,))}
    action       Discrete(K): the model to route to
    reward       w_q * q_a - w_c * min(c_a / tau, 1) for the chosen model only (bandit feedback)

Each reset draws a prompt and, unless fixed, a preference w uniform on the simplex, from the env's seeded
generator: `reset(seed=s)` always yields the same observation. A logged cell with no score gives reward 0
and `info["observed"] = False` (it is unknown, not wrong).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from banditrouter.reward import check_preferences, cost_scale, normalised_cost

ENV_ID = "banditrouter/Routing-v0"
RLLIB_ENV_NAME = "banditrouter-routing"


class RoutingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        contexts: np.ndarray,
        scores: np.ndarray,
        costs: np.ndarray,
        tau: float | None = None,
        models: tuple[str, ...] | None = None,
        preference: tuple[float, float] | None = None,
    ):
        super().__init__()
        contexts = np.asarray(contexts, dtype=np.float32)
        if contexts.ndim != 2 or scores.shape != (len(contexts), scores.shape[1]) or costs.shape != scores.shape:
            raise ValueError(f"contexts {contexts.shape}, scores {scores.shape} and costs {costs.shape} do not match")
        self.contexts = np.clip(contexts, -1.0, 1.0)
        self.scores, self.costs = np.asarray(scores, dtype=np.float64), np.asarray(costs, dtype=np.float64)
        self.tau = float(tau) if tau is not None else cost_scale(self.costs)
        self.models = tuple(models) if models else tuple(f"arm{i}" for i in range(scores.shape[1]))
        self.fixed_preference = None if preference is None else check_preferences(np.asarray(preference))[0].astype(np.float32)
        d, k = contexts.shape[1], scores.shape[1]
        self.observation_space = spaces.Dict(
            {
                "embedding": spaces.Box(-1.0, 1.0, shape=(d,), dtype=np.float32),
                "preference": spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32),
            }
        )
        self.action_space = spaces.Discrete(k)
        self._row: int | None = None
        self._pref: np.ndarray | None = None

    @classmethod
    def from_log(cls, log, contexts: np.ndarray, tau: float | None = None, preference=None) -> RoutingEnv:
        return cls(contexts, log.scores, log.costs, tau=tau, models=log.models, preference=preference)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"embedding": self.contexts[self._row].copy(), "preference": self._pref.copy()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._row = int(self.np_random.integers(len(self.contexts)))
        if self.fixed_preference is not None:
            self._pref = self.fixed_preference.copy()
        else:
            wc = np.float32(self.np_random.uniform(0.0, 1.0))
            self._pref = np.array([1.0 - wc, wc], dtype=np.float32)
        return self._obs(), {"row": self._row}

    def step(self, action):
        if self._row is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        a = int(action)
        q, c = self.scores[self._row, a], self.costs[self._row, a]
        observed = bool(np.isfinite(q) and np.isfinite(c))
        wq, wc = float(self._pref[0]), float(self._pref[1])
        r = wq * q - wc * float(normalised_cost(c, self.tau)) if observed else 0.0
        info = {"row": self._row, "arm": a, "model": self.models[a], "score": float(q), "cost": float(c), "observed": observed}
        obs = self._obs()
        self._row = None
        return obs, float(r), True, False, info


def make_routing_env(config: dict | None = None) -> RoutingEnv:
    """Build from a plain config dict (what RLlib passes):

    {"synthetic": {"n": 2000, "dim": 16, "n_arms": 4, "seed": 0}}           # a synthetic problem
    {"dataset": "routerbench", "split": "train", "limit": 500, "data_dir": None}  # a logged dataset
    optional: "tau", "preference": [w_q, w_c]
    """
    config = dict(config or {})
    if "synthetic" in config:
        from banditrouter.synthetic import make_synthetic

        x, log = make_synthetic(**config["synthetic"])
    else:
        from banditrouter.pipeline import load_split

        split = load_split(
            config.get("dataset", "routerbench"),
            config.get("split", "train"),
            data_dir=config.get("data_dir"),
            limit=config.get("limit"),
            progress=False,
        )
        x, log = split.contexts, split.log
    return RoutingEnv.from_log(log, x, tau=config.get("tau"), preference=config.get("preference"))


def register_everywhere(env_id: str, rllib_name: str, creator) -> None:
    """Register `creator(config)` with gymnasium as `env_id` and, when Ray is installed, with RLlib."""
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=f"{creator.__module__}:{creator.__name__}")
    try:
        from ray.tune.registry import register_env
    except ImportError:  # the train extra is not installed
        return
    register_env(rllib_name, creator)


def register() -> None:
    """Register with gymnasium (`gym.make(ENV_ID, ...)`) and, when Ray is installed, with RLlib."""
    register_everywhere(ENV_ID, RLLIB_ENV_NAME, make_routing_env)
