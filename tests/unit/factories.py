"""Event factories shared by the buffer and learner unit tests (imported as a plain module: pytest puts
this folder on sys.path)."""

from __future__ import annotations

import asyncio

import numpy as np

from banditrouter.reward import cost_scale
from banditrouter.schemas import DecisionEvent
from banditrouter.synthetic import make_synthetic

MODELS = ("cheap", "strong")


def decision(i: int, rng, user: str | None = None, context=None, model: str | None = None) -> dict:
    x = context if context is not None else rng.normal(size=8)
    x = x / np.linalg.norm(x)
    m = model or MODELS[i % 2]
    return DecisionEvent(
        decision_id=f"d{i}",
        request_id=f"r{i}",
        model=m,
        arm=MODELS.index(m),
        propensity=0.5,
        policy="linucb",
        policy_version=0,
        preference=(0.7, 0.3),
        context=[float(v) for v in x],
        context_ref=None,
        cost_usd=0.001 if m == "cheap" else 0.01,
        latency_s=0.1,
        pool_version="p",
        user=user,
    ).to_dict()


class _FakeMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))  # awaitable, with cancel(), like a DeploymentResponse


class FakeHandle:
    """A stand-in for a Serve deployment handle or a Ray actor: `handle.method.remote(...)` runs the given
    coroutine function as a task."""

    def __init__(self, **methods):
        if "__call__" in methods and "embed_many" not in methods:  # as the embedder deployment: a list in one call
            one = methods["__call__"]

            async def embed_many(texts):
                return np.stack(await asyncio.gather(*(one(t) for t in texts)))

            methods["embed_many"] = embed_many
        for name, fn in methods.items():
            setattr(self, name, _FakeMethod(fn))

    def remote(self, *args):  # the embedder is called as a handle
        return self.__call__.remote(*args)


def synthetic_problem(dim: int, n_arms: int):
    """A seeded synthetic log split 800 / 400: (train contexts, train log, test contexts, test log, tau)."""
    x, log = make_synthetic(n=1200, dim=dim, n_arms=n_arms, seed=0)
    tr, te = np.arange(800), np.arange(800, 1200)
    train, test = log.subset(tr), log.subset(te)
    return x[tr], train, x[te], test, cost_scale(train.costs)


async def settle(hops: int = 20) -> None:
    """Let the running loop take `hops` turns: enough for queued tasks (and coalesced embedder calls) to step."""
    for _ in range(hops):
        await asyncio.sleep(0)
