"""Retries and fallback in the router (issue 11, failure semantics), with fake model handles: a retryable
failure is retried on another replica at most `router.max_retries` times, then the request falls back to the
policy's next-best model, logged as what was served with its true propensity; a 4xx is never retried; a dead
replica (ActorDiedError, defect 8) is retried, never raised; a model with no live replica falls back within
`router.replica_wait_s`; a stream fails or falls back before its routing chunk (defect 7, router side)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from factories import FakeHandle

from deployments.backends import BackendError, CompletionResult

MODELS = ("a", "b", "c")
D = 8


def _ctx(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=D).astype(np.float32)
    return x / np.linalg.norm(x)


def _result(model: str) -> CompletionResult:
    return CompletionResult(text=f"answer of {model}", cost_usd=0.002, input_tokens=3, output_tokens=2, latency_s=0.01)


class Model:
    """A fake model deployment: `behaviour(n)` for the n-th call (0-based) returns "ok" or raises."""

    def __init__(self, name: str, behaviour=lambda n: "ok"):
        self.name, self.behaviour, self.calls = name, behaviour, 0

    async def complete(self, req):
        n, self.calls = self.calls, self.calls + 1
        self.behaviour(n)
        return _result(self.name)

    async def stream(self, req):
        n, self.calls = self.calls, self.calls + 1
        self.behaviour(n)
        for word in ("one ", "two"):
            yield word
        yield _result(self.name)


class _StreamHandle:
    """`handle.options(stream=True).stream.remote(req)`: an async iterator with cancel()."""

    def __init__(self, model: Model):
        self.model = model

    def options(self, **_):
        return self

    @property
    def stream(self):
        return self

    def remote(self, req):
        gen = self.model.stream(req)

        class _It:
            def __aiter__(self):
                return self

            async def __anext__(self):
                return await gen.__anext__()

            def cancel(self):
                pass

        return _It()


def handle(model: Model):
    h = FakeHandle(complete=model.complete)
    h.options = lambda **_: _StreamHandle(model)
    return h


def _router(tmp_path, models: dict[str, Model], policy="linucb", explore=False, train=True, **router_cfg):
    from banditrouter.config import load_config
    from banditrouter.policies import make_policy, save_checkpoint
    from banditrouter.policies.base import BanditBatch
    from deployments.router import Router

    pol = make_policy(policy, MODELS, D, tau=0.01, seed=0)
    if train:  # arm a best, then b, then c for this context: the fallback order is a -> b -> c
        x = np.repeat(_ctx()[None, :], 60, axis=0)
        arms = np.tile(np.arange(3), 20)
        scores = np.array([1.0, 0.6, 0.2])[arms]
        pol.update(BanditBatch(x, np.tile([1.0, 0.0], (60, 1)), arms, np.ones(60), scores, np.full(60, 0.001)))
    ckpt = save_checkpoint(pol, tmp_path / f"{policy}.pt")
    cfg = load_config(
        {
            "policy": {"name": policy, "checkpoint": str(ckpt), "explore": explore},
            "router": {"model_timeout_s": 5.0, "max_retries": 2, **router_cfg},
            "models": [{"name": m} for m in MODELS],
        }
    )

    async def embed(prompt):
        return _ctx()

    return Router.func_or_class(cfg, FakeHandle(__call__=embed), {m: handle(models[m]) for m in MODELS})


def _req(i: int = 0):
    from deployments.router import RouteRequest

    return RouteRequest(request_id=f"r{i}", messages=[{"role": "user", "content": "hi"}], prompt="hi", preference=(1.0, 0.0))


def _decisions(router) -> list[dict]:
    return [e for e in router.recent_events(100) if e["kind"] == "decision"]


def fails(exc_factory, times: int | None = None):
    """A behaviour that raises exc_factory() on the first `times` calls (all calls when None)."""

    def behaviour(n):
        if times is None or n < times:
            raise exc_factory()

    return behaviour


def upstream_5xx():
    return BackendError("upstream answered 503", retryable=True, status=503)


def test_5xx_is_retried_then_falls_back_to_the_next_best_model_logged_as_served(tmp_path):
    models = {"a": Model("a", fails(upstream_5xx)), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)
    out = asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    routing = out["routing"]
    assert out["result"].text == "answer of b"
    assert routing["model"] == "b" and routing["fallback"] is True and routing["failed_models"] == ["a"]
    assert routing["propensity"] == 1.0  # explore=false: the argmax among the remaining arms
    assert models["a"].calls == 3 and models["b"].calls == 1 and models["c"].calls == 0  # 1 + max_retries
    ds = _decisions(router)
    assert [(e["model"], e["outcome"], e["fallback"]) for e in ds] == [("a", "error", False)] * 3 + [("b", "ok", True)]
    assert len({e["decision_id"] for e in ds}) == 4  # each attempt is its own decision
    assert ds[-1]["decision_id"] == routing["decision_id"] and ds[-1]["arm"] == MODELS.index("b")
    outcomes = [e for e in router.recent_events(100) if e["kind"] == "error"]
    assert len(outcomes) == 3 and all(e["value"] == 0.0 for e in outcomes)  # the policy learns that a fails


def test_a_4xx_is_never_retried_nor_falls_back(tmp_path):
    refused = lambda: BackendError("upstream refused the request (401)", retryable=False, status=401)  # noqa: E731
    models = {"a": Model("a", fails(refused)), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)
    with pytest.raises(BackendError) as e:
        asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    assert e.value.status == 401 and not e.value.retryable
    assert models["a"].calls == 1 and models["b"].calls == 0
    assert [(d["model"], d["outcome"]) for d in _decisions(router)] == [("a", "error")]


def test_a_replica_that_dies_in_flight_is_retried_on_another_not_raised(tmp_path):
    """Defect 8: ActorDiedError from a dying model replica reached the ingress (a plain-text 500)."""
    from ray.exceptions import ActorDiedError

    models = {"a": Model("a", fails(ActorDiedError, times=1)), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)
    out = asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    assert out["result"].text == "answer of a" and "fallback" not in out["routing"]
    assert [(d["model"], d["outcome"]) for d in _decisions(router)] == [("a", "error"), ("a", "ok")]


def test_every_replica_dead_falls_back_and_all_models_dead_is_a_backend_error(tmp_path):
    from ray.exceptions import ActorDiedError

    models = {"a": Model("a", fails(ActorDiedError)), "b": Model("b", fails(ActorDiedError)), "c": Model("c")}
    router = _router(tmp_path, models)
    out = asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    assert out["routing"]["model"] == "c" and out["routing"]["failed_models"] == ["a", "b"]
    models["c"].behaviour = fails(ActorDiedError)
    with pytest.raises(BackendError, match="every model tried failed"):
        asyncio.run(asyncio.wait_for(router.route(_req(1)), 10))


def test_an_unexpected_exception_reaches_the_ingress_as_backend_error(tmp_path):
    models = {"a": Model("a", fails(lambda: KeyError("boom"))), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)
    with pytest.raises(BackendError, match="KeyError"):
        asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    assert models["a"].calls == 1


def test_a_stochastic_policy_logs_the_renormalised_propensity_of_the_fallback(tmp_path):
    models = {"a": Model("a", fails(upstream_5xx)), "b": Model("b", fails(upstream_5xx)), "c": Model("c", fails(upstream_5xx))}
    router = _router(tmp_path, models, policy="epsilon_greedy", explore=True, max_retries=0)
    probs = router.policy.arm_probabilities(_ctx()[None, :], np.array([[1.0, 0.0]]), explore=True)[0]
    with pytest.raises(BackendError):
        asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    first, second, third = _decisions(router)
    a1, a2 = first["arm"], second["arm"]
    assert first["propensity"] == pytest.approx(probs[a1]) and not first["fallback"]
    rest = [k for k in range(3) if k != a1]
    assert second["fallback"] and second["propensity"] == pytest.approx(probs[a2] / probs[rest].sum())
    assert third["fallback"] and third["propensity"] == pytest.approx(1.0)  # one arm left


@pytest.mark.parametrize("name", ["barp", "linucb", "lints", "epsilon_greedy", "acqb", "random", "cheapest", "best_single"])
def test_fallback_probabilities_match_select(name):
    """`arm_probabilities` is the distribution `select` draws from (its propensity at the chosen arm), the
    greedy choice is the argmax of `values`, and a fallback distribution puts no mass on excluded arms."""
    from banditrouter.policies import make_policy

    pol = make_policy(name, MODELS, D, tau=0.01, seed=3)
    x, w = np.stack([_ctx(i) for i in range(4)]), np.tile([0.6, 0.4], (4, 1))
    greedy = pol.select(x, w, explore=False)
    assert np.allclose(pol.arm_probabilities(x, w)[np.arange(4), greedy.arms], greedy.propensities)
    probs = pol.arm_probabilities(x, w, explore=True)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    d = pol.select(x, w, explore=True)
    assert np.allclose(probs[np.arange(4), d.arms], d.propensities, atol=1e-6)
    allowed = np.array([False, True, True])
    fb = pol.fallback_probabilities(x, w, allowed, explore=True)
    assert (fb[:, 0] == 0).all() and np.allclose(fb.sum(axis=1), 1.0)


def test_no_live_replica_falls_back_within_replica_wait(tmp_path):
    """A model whose every replica is down: Serve's handle waits for a replica; the router stops waiting
    after router.replica_wait_s and falls back, well within the model timeout."""
    models = {m: Model(m) for m in MODELS}
    router = _router(tmp_path, models, replica_wait_s=0.3, model_timeout_s=10.0)

    class _Chooser:  # Serve's choose_replica with no replica: waits forever
        def __init__(self):
            self.entered = False

        async def __aenter__(self):
            await asyncio.sleep(3600)

        async def __aexit__(self, *exc):
            return None

    down = handle(models["a"])
    down.complete.choose_replica = lambda req: _Chooser()
    router.models["a"] = down
    t0 = time.perf_counter()
    out = asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    assert time.perf_counter() - t0 < 2.0
    assert out["routing"]["model"] == "b" and out["routing"]["failed_models"] == ["a"]
    assert [(d["model"], d["outcome"]) for d in _decisions(router)] == [("a", "error"), ("b", "ok")]  # no retries of a


def test_the_deadline_bounds_retries_and_fallbacks(tmp_path):
    async def hang(req):
        await asyncio.sleep(3600)

    models = {m: Model(m, fails(upstream_5xx)) for m in MODELS}
    router = _router(tmp_path, models, model_timeout_s=0.5)
    router.models["b"] = FakeHandle(complete=hang)
    from deployments.router import ModelTimeout

    t0 = time.perf_counter()
    with pytest.raises(ModelTimeout):
        asyncio.run(asyncio.wait_for(router.route(_req()), 10))
    assert time.perf_counter() - t0 < 1.5
    assert [d["outcome"] for d in _decisions(router)][-1] == "timeout"


def test_fallback_releases_the_failed_models_slot(tmp_path):
    models = {"a": Model("a", fails(upstream_5xx)), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models, max_in_flight_per_model=1, queue_capacity=1)

    async def main():
        outs = await asyncio.gather(*(router.route(_req(i)) for i in range(2)), return_exceptions=True)
        assert all(o["routing"]["model"] == "b" for o in outs), outs
        assert all(q.in_flight == 0 and q.waiting == 0 for q in router.queues.values())

    asyncio.run(asyncio.wait_for(main(), 10))


def test_acqb_pool_falls_back_to_a_free_model_and_releases_every_slot(tmp_path):
    models = {"a": Model("a", fails(upstream_5xx)), "b": Model("b", fails(upstream_5xx)), "c": Model("c", fails(upstream_5xx))}
    router = _router(tmp_path, models, policy="acqb", train=False, max_retries=0)

    async def main():
        with pytest.raises(BackendError, match="every model tried failed"):
            await router.route(_req())
        assert router.pool.in_flight.tolist() == [0, 0, 0]
        models["c"].behaviour = lambda n: "ok"
        out = await router.route(_req(1))
        assert out["routing"]["model"] == "c" and out["routing"]["failed_models"] == ["a", "b"]
        assert router.pool.in_flight.tolist() == [0, 0, 0]

    asyncio.run(asyncio.wait_for(main(), 10))
    ds = _decisions(router)
    assert sorted(d["model"] for d in ds[:3]) == ["a", "b", "c"] and [d["fallback"] for d in ds[:3]] == [False, True, True]


# -- streams (defect 7, router side) ----------------------------------------------------------------------------
async def _collect(router, req):
    return [item async for item in router.route_stream(req)]


def test_a_stream_whose_upstream_fails_before_its_first_item_falls_back_before_the_routing_chunk(tmp_path):
    models = {"a": Model("a", fails(upstream_5xx)), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)
    items = asyncio.run(asyncio.wait_for(_collect(router, _req()), 10))
    routing = items[0]
    assert routing["model"] == "b" and routing["fallback"] is True and routing["failed_models"] == ["a"]
    assert items[1:3] == ["one ", "two"] and items[-1].text == "answer of b"
    assert [(d["model"], d["outcome"]) for d in _decisions(router)][-1] == ("b", "ok")


def test_a_stream_refused_before_its_first_item_raises_before_any_chunk(tmp_path):
    refused = lambda: BackendError("upstream refused the request (400)", status=400, client_error=True)  # noqa: E731
    models = {"a": Model("a", fails(refused)), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)

    async def first():
        gen = router.route_stream(_req())
        return await gen.__anext__()

    with pytest.raises(BackendError) as e:
        asyncio.run(asyncio.wait_for(first(), 10))
    assert e.value.client_error and e.value.status == 400


def test_a_stream_that_fails_midway_is_logged_and_raised_as_backend_error(tmp_path):
    from ray.exceptions import ActorDiedError

    class Midway(Model):
        async def stream(self, req):
            self.calls += 1
            yield "one "
            raise ActorDiedError()

    models = {"a": Midway("a"), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models)
    got = []

    async def main():
        async for item in router.route_stream(_req()):
            got.append(item)

    with pytest.raises(BackendError, match="mid-stream"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert got[0]["model"] == "a" and got[1:] == ["one "]
    assert [(d["model"], d["outcome"]) for d in _decisions(router)] == [("a", "error")]
    assert all(q.in_flight == 0 for q in router.queues.values())


def test_a_full_queue_is_refused_before_the_routing_chunk(tmp_path):
    from deployments.router import QueueFull

    gate = asyncio.Event()

    class Slow(Model):
        async def stream(self, req):
            await gate.wait()
            async for item in super().stream(req):
                yield item

    models = {"a": Slow("a"), "b": Model("b"), "c": Model("c")}
    router = _router(tmp_path, models, max_in_flight_per_model=1, queue_capacity=1)

    async def main():
        holders = [asyncio.ensure_future(router.route_stream(_req(i)).__anext__()) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await router.route_stream(_req(2)).__anext__()
        assert not any(h.done() for h in holders)  # no routing chunk before the first upstream item
        gate.set()
        assert (await holders[0])["model"] == "a"
        holders[1].cancel()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_backend_error_keeps_its_flags_across_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(BackendError("x", retryable=True, status=503)))
    assert (e.message, e.retryable, e.status, e.client_error) == ("x", True, 503, False)


def test_a_timed_out_call_is_logged_with_the_cost_it_may_have_incurred(tmp_path):
    """A timeout is an outcome the policy learns from with the cost incurred (the upstream may have billed the
    whole call): the decision carries the ingress's cost bound for that model; an error (nothing billed) 0."""
    import dataclasses

    async def hang(req):
        await asyncio.sleep(3600)

    models = {m: Model(m) for m in MODELS}
    router = _router(tmp_path, models, model_timeout_s=0.3)
    for m in MODELS:
        router.models[m] = FakeHandle(complete=hang)
    from deployments.router import ModelTimeout

    req = dataclasses.replace(_req(), timeout_cost_usd={m: 0.01 * (k + 1) for k, m in enumerate(MODELS)})
    with pytest.raises(ModelTimeout):
        asyncio.run(asyncio.wait_for(router.route(req), 10))
    d = _decisions(router)[-1]
    assert d["outcome"] == "timeout" and d["cost_usd"] == pytest.approx(0.01 * (MODELS.index(d["model"]) + 1))
