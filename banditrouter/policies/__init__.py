"""Policy registry: a plain dict from name to "module:Class", imported on first use (so that importing
this package does not import torch)."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from banditrouter.policies.base import FEATURE_PARAMS, Assignment, BanditBatch, Decision, Decisions, Policy, StateError

POLICIES: dict[str, str] = {
    "barp": "banditrouter.policies.barp:BaRP",
    "acqb": "banditrouter.policies.acqb:ACQB",
    "linucb": "banditrouter.policies.linucb:LinUCB",
    "lints": "banditrouter.policies.lints:LinTS",
    "epsilon_greedy": "banditrouter.policies.epsilon_greedy:EpsilonGreedy",
    "random": "banditrouter.policies.static:RandomPolicy",
    "cheapest": "banditrouter.policies.static:CheapestPolicy",
    "best_single": "banditrouter.policies.static:BestSinglePolicy",
    "supervised": "banditrouter.policies.supervised:SupervisedRouter",
    "pilot": "banditrouter.policies.pilot:PILOT",
}
"""Every policy `train`/`eval` know. The per-prompt oracle is a reference computed from the full table in
`banditrouter.evaluation` (it needs the outcomes it is choosing among, so it cannot be a policy)."""


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    module, cls = POLICIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def takes_features(name: str) -> bool:
    """Whether the policy can learn on a learned projection of the context (`features=`); the static
    baselines ignore the context and take none."""
    return "features" in inspect.signature(policy_class(name).__init__).parameters


def make_policy(name: str, models: Sequence[str], context_dim: int, tau: float, seed: int = 0, **config: Any) -> Policy:
    """`config` holds the policy's own settings, and `features` (a banditrouter.features.Projection) for a
    policy that learns on a projection of the context."""
    if config.get("features") is not None and not takes_features(name):
        raise ValueError(f"policy {name!r} takes no learned features (its constructor has no `features` argument)")
    if "features" in config and config["features"] is None:
        config.pop("features")
    return policy_class(name)(models, context_dim, tau, seed=seed, **config)


def untrained_like(policy: Policy, seed: int = 0) -> Policy:
    """A fresh policy of the same kind, pool, context width, tau and config (a cold start, or the shell a
    router loads pushed weights into). Fixed inputs (`Policy.fixed_kwargs`: a learned projection, PILOT's prior)
    are kept (their arrays copied): they are part of the policy's input, not something it learned online."""
    extra = policy.fixed_kwargs()
    return make_policy(policy.name, policy.models, policy.context_dim, policy.tau, seed=seed, **extra, **policy._config())


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(policy: Policy, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically and durably: tmp file, fsync, rename over `path`, fsync the folder. A reader never
    sees half a checkpoint, and after a power loss `path` holds the old or the new one, whole."""
    import numpy as np
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = policy.state_dict()
    state["params"] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state["params"].items()}
    if extra:
        state["extra"] = extra
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, seed: int = 0, expect: str | None = None) -> Policy:
    """Rebuild the policy a checkpoint was saved from; raises StateError on anything that does not fit,
    including a checkpoint of another policy than `expect` (the config's `policy.name`: the checks made on
    the config, such as refusing a propensity learner with a non-exploring logger, hold for that name)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise StateError(f"{path} is not a banditrouter checkpoint: {e}") from None
    if not isinstance(state, dict) or "policy" not in state:
        raise StateError(f"{path} is not a banditrouter checkpoint")
    if expect is not None and state["policy"] != expect:
        raise StateError(f"{path} holds a {state['policy']!r} policy, but the config says policy.name: {expect!r}")
    state["params"] = {k: v.numpy() for k, v in state["params"].items()}
    config = dict(state.get("config", {}))
    if "features" in config:  # a learned projection: rebuilt from the checkpoint's arrays, then validated again on load
        from banditrouter.features import Projection

        config["features"] = Projection.from_params(state["params"], config["features"])
    elif any(k in FEATURE_PARAMS for k in state["params"]):
        raise StateError(f"{path} holds projection arrays but no features entry in its config")
    policy = make_policy(state["policy"], state["models"], state["context_dim"], state["tau"], seed=seed, **config)
    policy.load_state_dict(state)
    return policy


__all__ = [
    "POLICIES",
    "Assignment",
    "BanditBatch",
    "Decision",
    "Decisions",
    "Policy",
    "StateError",
    "load_checkpoint",
    "make_policy",
    "policy_class",
    "save_checkpoint",
    "takes_features",
    "untrained_like",
]
