"""A synthetic routing problem whose best arm depends on the context: for tests and smoke runs.

Contexts are unit vectors in R^d. Arm a answers well where x points along its own direction u_a:
P(correct | x, a) = sigmoid(gain * x . u_a + bias_a), and costs grow with the arm index, so which arm is
best changes with both the context and the preference.
"""

from __future__ import annotations

import numpy as np

from banditrouter.data.log import RoutingLog


def make_synthetic(
    n: int = 2000, dim: int = 16, n_arms: int = 4, seed: int = 0, gain: float = 6.0, noisy: bool = False
) -> tuple[np.ndarray, RoutingLog]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    u = rng.standard_normal((n_arms, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    p = 1.0 / (1.0 + np.exp(-(gain * x @ u.T)))
    scores = (rng.random(p.shape) < p).astype(float) if noisy else p
    base_cost = np.geomspace(1e-4, 1e-3, n_arms)
    costs = base_cost[None, :] * rng.uniform(0.8, 1.2, size=(n, n_arms))
    log = RoutingLog(
        name="synthetic",
        prompt_ids=tuple(f"s{i}" for i in range(n)),
        prompts=tuple(f"synthetic prompt {i}" for i in range(n)),
        models=tuple(f"arm{a}" for a in range(n_arms)),
        scores=scores,
        costs=costs,
    )
    return x.astype(np.float32), log
