"""The one contract every routing policy implements (offline training, the router replica, the learner).

    select(contexts, preferences, explore=...) -> Decisions   # arm, propensity, policy_version per row
    schedule(contexts, preferences, free, explore=...) -> [Assignment]   # queue-aware policies (ACQB) only
    update(BanditBatch) -> metrics                            # only the chosen arm's outcome per row
    state_dict() / load_state_dict(state)                     # plain arrays + metadata, validated on load
    serving_state_dict()                                      # what a router needs to decide (published weights)

Nothing here knows about Ray. A policy sees a context (the prompt embedding), a preference
w = (w_quality, w_cost) and, after it decides, the score and cost of the arm it chose.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from banditrouter.reward import check_preferences, reward

if TYPE_CHECKING:
    from banditrouter.features import Projection

FEATURE_PARAMS = ("features.W", "features.b")
"""Where a learned projection's arrays sit among a policy's params (see banditrouter.features)."""


@dataclass(frozen=True)
class Decision:
    arm: int
    propensity: float
    policy_version: int


@dataclass(frozen=True)
class Decisions:
    """Decisions for a batch of contexts. `propensities[i]` is the probability the policy gave `arms[i]` at
    the moment it decided (1.0 for a deterministic choice): logged with the decision, it makes off-policy
    learning and evaluation possible."""

    arms: np.ndarray
    propensities: np.ndarray
    policy_version: int

    def __len__(self) -> int:
        return len(self.arms)

    def __getitem__(self, i: int) -> Decision:
        return Decision(int(self.arms[i]), float(self.propensities[i]), self.policy_version)

    def __iter__(self) -> Iterator[Decision]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class Assignment:
    """One (waiting job, model) pair a queue-aware policy serves: `job` indexes the waiting pool handed to
    `schedule`, `propensity` is the probability that this job got this arm at that moment."""

    job: int
    arm: int
    propensity: float
    policy_version: int


@dataclass(frozen=True)
class BanditBatch:
    """Bandit samples: per row, the context, preference, chosen arm, its logged propensity and the observed
    outcome of that arm only. `retrial` (ACQB) marks whether the user retried after the answer."""

    contexts: np.ndarray
    preferences: np.ndarray
    arms: np.ndarray
    propensities: np.ndarray
    scores: np.ndarray
    costs: np.ndarray
    retrial: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.arms)
        for name in ("contexts", "preferences", "propensities", "scores", "costs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BanditBatch.{name} has {len(getattr(self, name))} rows, arms has {n}")
        if not (np.isfinite(self.scores).all() and np.isfinite(self.costs).all()):
            raise ValueError("BanditBatch holds non-finite scores or costs; drop unobserved samples first")
        if n and ((self.propensities <= 0) | (self.propensities > 1 + 1e-9)).any():
            raise ValueError("BanditBatch propensities must lie in (0, 1]")

    def __len__(self) -> int:
        return len(self.arms)

    def rewards(self, tau: float) -> np.ndarray:
        return reward(self.scores, self.costs, self.preferences, tau)


class StateError(ValueError):
    """A checkpoint does not fit this policy (wrong models, shapes, non-finite values)."""


class ServingOnlyError(RuntimeError):
    """A policy loaded from a serving blob (`serving_state_dict`) was asked to learn or to be saved as a
    training checkpoint: it holds only what a decision reads, not what learning continues from."""


@dataclass
class PolicyState:
    """What every checkpoint carries besides the policy's own arrays."""

    models: tuple[str, ...]
    context_dim: int
    tau: float
    version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Policy(ABC):
    """Base class: holds the arm names, the context width, the cost scale tau and the version counter."""

    name: str = "policy"
    full_information: bool = False
    """True for references that train on every arm's outcome (never used as a bandit learner)."""
    learns_from_propensities: bool = False
    """True when `update` weights samples by pi(a) / propensity (BaRP): it needs decisions logged by an
    exploring policy with true propensities. Count-based learners (LinUCB, LinTS) learn from any logger."""
    queue_aware: bool = False
    """True when the policy also schedules a waiting pool (`schedule`, ACQB); the others are served FIFO per
    model through `select` at arrival."""

    def __init__(self, models: Sequence[str], context_dim: int, tau: float, seed: int = 0, features: Projection | None = None):
        """`features`: a learned projection of the context (banditrouter.features.Projection, frozen) the
        policy learns on instead of the raw embedding; None = the raw embedding (identity)."""
        if len(models) < 2:
            raise ValueError("a routing policy needs at least two models")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive number, got {tau}")
        self.models = tuple(models)
        self.context_dim = int(context_dim)
        self.tau = float(tau)
        self.seed = seed
        self.version = 0
        self.rng = np.random.default_rng(seed)
        if features is not None:
            from banditrouter.features import Projection

            if not isinstance(features, Projection):
                raise TypeError(f"features must be a banditrouter.features.Projection or None, got {type(features).__name__}")
            if features.in_dim != self.context_dim:
                raise ValueError(f"the projection takes {features.in_dim}-d contexts, this policy gets {self.context_dim}-d")
        self.projection: Projection | None = features
        self.serving_only = False
        """True once loaded from a serving blob (`serving_state_dict`): it decides, it cannot learn or be saved
        as a training checkpoint (ServingOnlyError) until a full `state_dict()` is loaded."""

    @property
    def n_arms(self) -> int:
        return len(self.models)

    @property
    def projected_dim(self) -> int:
        """Width of what `project` returns: the context features the policy's own parameters see."""
        return self.projection.out_dim if self.projection is not None else self.context_dim

    def project(self, contexts: np.ndarray) -> np.ndarray:
        """Context (n, context_dim) -> the features the policy learns on (n, projected_dim). Identity unless
        the policy carries a learned projection (`features:`); every policy calls it on what it is given, so
        routers, the buffer and the learner always handle raw embeddings."""
        if self.projection is None:
            return np.asarray(contexts)
        return self.projection.apply(contexts)

    def schedule(
        self, contexts: np.ndarray, preferences: np.ndarray, free: np.ndarray, *, explore: bool = True
    ) -> list[Assignment]:
        """Queue-aware policies only: given the waiting pool (contexts and preferences, one row per job) and
        the free slots per arm (`free[k]`), return the pairs to serve now: each job at most once, arm k at
        most `free[k]` times, and work-conserving (serve while both jobs and slots remain)."""
        raise NotImplementedError(f"{self.name} is not queue-aware: serve it FIFO per model through select()")

    def fixed_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that are fixed inputs of the policy, not learned online (copies): what a cold
        copy (`untrained_like`) keeps. The base: a learned projection (`features`); PILOT adds its prior."""
        return {"features": self.projection.copy()} if self.projection is not None else {}

    def take_random_state(self, other: Policy) -> None:
        """Continue `other`'s random streams (a router installing new weights): re-seeding on every version
        would replay the same exploration draws after each install."""
        self.rng = other.rng

    # -- training state -----------------------------------------------------------------------------------
    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a learner must save besides `state_dict()` to continue exactly as if it had never stopped:
        the random streams and the optimizer, as (arrays, JSON-able metadata); no pickled objects. The base
        covers `self.rng` (numpy Generator state); subclasses add theirs (BaRP: Adam moments and step
        counts, the torch Generator, the EMA count). Load it after `load_state_dict`, which resets them."""
        self._check_trainable("save its training state")
        return {}, {"rng": self.rng.bit_generator.state}

    def load_training_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore `training_state()`. Raises StateError when it does not fit this policy (then the policy
        may hold a partly restored training state: reload it or discard the policy)."""
        state = meta.get("rng")
        if not isinstance(state, dict) or state.get("bit_generator") != type(self.rng.bit_generator).__name__:
            raise StateError(f"training state holds no {type(self.rng.bit_generator).__name__} random state")
        self.rng.bit_generator.state = state

    # -- the contract -----------------------------------------------------------------------------------
    @abstractmethod
    def select(self, contexts: np.ndarray, preferences: np.ndarray, *, explore: bool = False) -> Decisions:
        """Choose an arm per row. `explore=True` is the behaviour used while learning (sampling, UCB bonus,
        epsilon); `explore=False` is the policy's best guess."""

    @abstractmethod
    def update(self, batch: BanditBatch) -> dict[str, float]:
        """Learn from bandit samples; bumps `version`; returns training metrics."""

    # -- value estimates (the router's fallback; issue 12's "value estimate") ------------------------------
    @abstractmethod
    def values(self, contexts: np.ndarray, preferences: np.ndarray, *, explore: bool = False) -> np.ndarray:
        """(n, K) the policy's value of each arm per row: what `select` maximises (explore=False: its greedy
        choice is the argmax, first index on ties; explore=True for an optimistic policy: with the bonus).
        Higher is better; the scale is the policy's own (BaRP: pi, the linear models: predicted reward)."""

    def arm_probabilities(self, contexts: np.ndarray, preferences: np.ndarray, *, explore: bool = False) -> np.ndarray:
        """(n, K) the probability `select` gives each arm per row (rows sum to 1). Default: deterministic, all
        mass on the argmax of `values`; stochastic policies override it with their sampling distribution. It
        draws nothing and changes no state."""
        v = self.values(contexts, preferences, explore=explore)
        return np.eye(self.n_arms)[np.asarray(v).argmax(axis=1)]

    def fallback_probabilities(
        self, contexts: np.ndarray, preferences: np.ndarray, allowed: np.ndarray, *, explore: bool = False
    ) -> np.ndarray:
        """(n, K) the distribution a fallback draws from when only the `allowed` arms ((K,) or (n, K) bool)
        may serve: the policy's `arm_probabilities` renormalised over them; where they hold no mass (a
        deterministic policy whose choice failed, or explore=False) all mass goes to the best allowed arm by
        `values` (propensity 1). Rows with no allowed arm are all zero. The entry of the arm served is its
        true propensity given that the other arms were unavailable."""
        allowed = np.broadcast_to(np.asarray(allowed, dtype=bool), (len(np.atleast_2d(contexts)), self.n_arms))
        out = np.zeros(allowed.shape)
        p = self.arm_probabilities(contexts, preferences, explore=explore) if explore else np.zeros(allowed.shape)
        p = np.where(allowed, p, 0.0)
        mass = p.sum(axis=1)
        v = np.where(allowed, self.values(contexts, preferences, explore=explore), -np.inf)
        for i in range(len(out)):
            if not allowed[i].any():
                continue
            if mass[i] > 1e-12:
                out[i] = p[i] / mass[i]
            else:
                ok = np.flatnonzero(allowed[i])
                out[i, ok[int(np.argmax(v[i, ok]))]] = 1.0
        return out

    def state_dict(self) -> dict[str, Any]:
        """The full state: every learned array (what a learner checkpoints to continue learning exactly)."""
        self._check_trainable("be saved as a training checkpoint (state_dict)")
        return self._state(self._all_params())

    def serving_state_dict(self) -> dict[str, Any]:
        """What a router needs to decide (the weights the learner publishes). The base: `state_dict()`.
        A policy whose learning state is much larger than what its decisions read (ACQB: the precision and
        cost Gram matrices) overrides it to return only the latter, marked `"serving": True`; loading such a
        blob gives a policy that decides exactly as one loaded from the full state, and refuses to learn."""
        return self.state_dict()

    def _state(self, params: dict[str, np.ndarray], serving: bool = False) -> dict[str, Any]:
        state = {
            "policy": self.name,
            "models": list(self.models),
            "context_dim": self.context_dim,
            "tau": self.tau,
            "version": self.version,
            "params": params,
            "config": self._config() if self.projection is None else {**self._config(), "features": self.projection.meta},
        }
        if serving:
            state["serving"] = True
        return state

    def _check_trainable(self, action: str) -> None:
        if self.serving_only:
            raise ServingOnlyError(
                f"this {self.name} policy was loaded from a serving blob (only what a decision reads): it cannot "
                f"{action}; load a full state_dict() to learn"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load parameters, tau and version (validated first: on StateError nothing changed). Parameters only:
        an optimizer starts afresh on new parameters; `load_training_state` restores it and the random
        streams of a policy that is to continue training exactly. A serving blob (`"serving": True`, from
        `serving_state_dict`) is validated against the serving subset, as strictly; the policy then decides
        and refuses to learn (`serving_only`) until a full state is loaded."""
        if state.get("policy") != self.name:
            raise StateError(f"checkpoint is for policy {state.get('policy')!r}, not {self.name!r}")
        if tuple(state.get("models", ())) != self.models:
            raise StateError(f"checkpoint models {state.get('models')} differ from this pool {list(self.models)}")
        if int(state.get("context_dim", -1)) != self.context_dim:
            raise StateError(f"checkpoint context_dim {state.get('context_dim')} != {self.context_dim}")
        tau = float(state.get("tau", float("nan")))
        if not (math.isfinite(tau) and tau > 0):
            raise StateError(f"checkpoint tau {tau} is not a positive number")
        serving = state.get("serving", False)
        if not isinstance(serving, bool | np.bool_):
            raise StateError(f"checkpoint 'serving' must be true or false, got {serving!r}")
        params = state.get("params", {})
        if not isinstance(params, dict):
            raise StateError("checkpoint parameters are not a mapping")
        if serving:
            expected = self._all_serving_params()
            if expected is None:
                raise StateError(f"policy {self.name!r} takes no serving blob: publish its state_dict()")
        else:
            expected = self._template_params()
        if set(params) != set(expected):
            kind = "serving parameters" if serving else "parameters"
            raise StateError(f"checkpoint {kind} {sorted(params)} differ from expected {sorted(expected)}")
        for k, v in params.items():
            arr, ref = np.asarray(v), np.asarray(expected[k])
            if arr.shape != ref.shape:
                raise StateError(f"parameter {k!r} has shape {arr.shape}, expected {ref.shape}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise StateError(f"parameter {k!r} holds non-finite values")
        projection = None
        if self.projection is not None:
            from banditrouter.features import Projection

            meta = (state.get("config") or {}).get("features", self.projection.meta)
            projection = Projection.from_params(params, meta)  # validated before anything changes
        own = {k: np.asarray(v) for k, v in params.items() if k not in FEATURE_PARAMS}
        if serving:
            self._load_serving_params(own)  # validates, then installs (StateError: nothing changed)
        else:
            self._load_params(own)
        self.tau = tau
        if projection is not None:
            self.projection = projection
        self.version = int(state.get("version", 0))
        self.serving_only = bool(serving)

    # -- helpers for subclasses -------------------------------------------------------------------------
    @abstractmethod
    def _params(self) -> dict[str, np.ndarray]:
        """Every learned array, as numpy (copies)."""

    @abstractmethod
    def _load_params(self, params: dict[str, np.ndarray]) -> None: ...

    def _all_params(self) -> dict[str, np.ndarray]:
        """The policy's own arrays plus its projection's (`features.W`, `features.b`) when it has one."""
        params = self._params()
        if self.projection is not None:
            params.update(self.projection.params())
        return params

    def _template_params(self) -> dict[str, np.ndarray]:
        """What a full state must hold (names, shapes): this policy's arrays, or a cold twin's when this one
        was loaded from a serving blob (it no longer holds the learning state)."""
        if not self.serving_only:
            return self._all_params()
        from banditrouter.policies import untrained_like

        return untrained_like(self)._all_params()

    def _serving_params(self) -> dict[str, np.ndarray] | None:
        """The arrays a decision reads (copies), for a policy with a serving subset; None (the base): the
        policy publishes its full state."""
        return None

    def _load_serving_params(self, params: dict[str, np.ndarray]) -> None:
        """Validate, then install, the serving subset (names and shapes were checked by `load_state_dict`)."""
        raise StateError(f"policy {self.name!r} takes no serving blob")

    def _all_serving_params(self) -> dict[str, np.ndarray] | None:
        params = self._serving_params()
        if params is not None and self.projection is not None:
            params.update(self.projection.params())
        return params

    def _config(self) -> dict[str, Any]:
        return {}

    def _check_inputs(self, contexts: np.ndarray, preferences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(contexts, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.context_dim:
            raise ValueError(f"contexts must have shape (n, {self.context_dim}), got {x.shape}")
        p = check_preferences(preferences)
        if len(p) == 1 and len(x) > 1:
            p = np.repeat(p, len(x), axis=0)
        if len(p) != len(x):
            raise ValueError(f"{len(x)} contexts but {len(p)} preferences")
        return x, p


def deterministic(arms: np.ndarray, version: int) -> Decisions:
    return Decisions(np.asarray(arms, dtype=np.int64), np.ones(len(arms)), version)


def linear_features(contexts: np.ndarray, preferences: np.ndarray) -> np.ndarray:
    """Embedding ⊕ preference ⊕ bias: the features of the disjoint linear baselines."""
    x = np.asarray(contexts, dtype=np.float64)
    return np.hstack([x, np.asarray(preferences, dtype=np.float64), np.ones((len(x), 1))])
