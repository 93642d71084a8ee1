"""router.handles_on_loop (issue 13, a Serve handle option): the router's handles to the embedder and the
models run Serve's request routing on the replica's own event loop, not on Serve's router thread. Real
DeploymentHandle objects with a recording router factory: no Ray."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve.handle import DeploymentHandle

MODELS = ("a", "b")


def _handle(name: str, made: list) -> DeploymentHandle:
    def create_router(handle_id, deployment_id, handle_options):
        made.append((deployment_id.name, handle_options._run_router_in_separate_loop))
        return object()

    return DeploymentHandle(name, "app", _create_router=create_router)


def _router(tmp_path, made: list, **router_cfg):
    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from deployments.router import Router

    ckpt = save_checkpoint(make_policy("linucb", MODELS, 8, tau=0.01, seed=0), tmp_path / "linucb.pt")
    cfg = load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt)},
            "router": router_cfg,
            "models": [{"name": m} for m in MODELS],
        }
    )
    return Router.func_or_class(cfg, _handle("embedder", made), {m: _handle(f"model:{m}", made) for m in MODELS})


def test_on_current_loop_initialises_a_handle_without_the_router_thread():
    from deployments.router import on_current_loop

    made: list = []
    h = _handle("embedder", made)

    async def main():
        on_current_loop(h)

    asyncio.run(main())
    assert made == [("embedder", False)]


def test_on_current_loop_leaves_a_handle_already_in_use_and_anything_else():
    from deployments.router import on_current_loop

    made: list = []
    h = _handle("embedder", made)
    h._init()  # first used elsewhere (Serve's default: the router thread)
    on_current_loop(h)  # no "already initialized" error
    on_current_loop(object())
    assert made == [("embedder", True)]


@pytest.mark.parametrize("on_loop", [True, False])
def test_the_router_binds_its_handles_to_its_loop_on_the_first_request_when_configured(tmp_path, on_loop):
    made: list = []
    router = _router(tmp_path, made, handles_on_loop=on_loop)
    assert made == []  # nothing at construction: Serve builds the replica off the loop that serves

    async def first_request():
        await router._ensure_sync()  # the first step of every routed request
        await router._ensure_sync()

    asyncio.run(first_request())
    if on_loop:
        assert sorted(made) == [("embedder", False), ("model:a", False), ("model:b", False)]
        assert router.info()["serve_handles"] == "replica loop"
    else:
        assert made == []  # left to Serve's default, set on first use
        assert router.info()["serve_handles"] is None


def test_a_model_handle_the_ingress_used_first_keeps_the_thread_and_health_says_mixed(tmp_path):
    made: list = []
    router = _router(tmp_path, made, handles_on_loop=True)
    router.models["a"]._init()  # a direct request to model a (the ingress shares these handles) came first

    async def first_request():
        await router._ensure_sync()

    asyncio.run(first_request())
    assert sorted(made) == [("embedder", False), ("model:a", True), ("model:b", False)]
    assert router.info()["serve_handles"] == "mixed"
