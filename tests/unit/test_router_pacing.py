"""Budgets in the router (issue 12), with fake model handles and no Ray: `RouteRequest.allowed_models` restricts
the decision and every retry / fallback; `pacing_z` routes by the ZCL rule (at z = 0 the policy's own choice
passes when it is eligible, at z = 1 the cheapest allowed model serves); the decision event and the routing
dict record the pacing fields; L / U come from the config, else the checkpoint's calibration, else live."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from factories import FakeHandle

from deployments.backends import BackendError, CompletionResult

MODELS = ("a", "b", "c")
D = 8
# weights (USD) of a, b, c: a dear, c cheap; with values ~1.0, 0.6, 0.2 the ratios are ~100, ~600, ~2000
BASE_USD = [0.01, 0.001, 0.0001]
L, U = 50.0, 5000.0


def _ctx() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=D).astype(np.float32)
    return x / np.linalg.norm(x)


class Model:
    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail, self.calls = name, fail, 0

    async def complete(self, req):
        self.calls += 1
        if self.fail:
            raise BackendError(f"{self.name} is down", retryable=True, status=503)
        return CompletionResult(text=f"answer of {self.name}", cost_usd=0.002, input_tokens=3, output_tokens=2, latency_s=0.01)


def _policy(name: str = "linucb"):
    from banditrouter.policies import make_policy
    from banditrouter.policies.base import BanditBatch

    pol = make_policy(name, MODELS, D, tau=0.01, seed=0)
    x = np.repeat(_ctx()[None, :], 60, axis=0)
    arms = np.tile(np.arange(3), 20)
    scores = np.array([1.0, 0.6, 0.2])[arms]  # a best, then b, then c
    pol.update(BanditBatch(x, np.tile([1.0, 0.0], (60, 1)), arms, np.ones(60), scores, np.full(60, 0.001)))
    return pol


def _calibration(bounds=(L, U)) -> dict:
    est = {"models": list(MODELS), "base_usd": BASE_USD, "per_char_usd": [0.0, 0.0, 0.0]}
    cal = {"cost_estimator": est, "tuning": "synthetic/train"}
    if bounds is not None:
        cal.update(L=bounds[0], U=bounds[1])
    return {"pacing": cal}


def _router(tmp_path, models=None, policy="linucb", extra=None, pacing=None, **router_cfg):
    from banditrouter.config import load_config
    from banditrouter.policies import save_checkpoint
    from deployments.router import Router

    models = models or {m: Model(m) for m in MODELS}
    ckpt = save_checkpoint(_policy(policy), tmp_path / f"{policy}.pt", extra=_calibration() if extra is None else extra)
    cfg = load_config(
        {
            "policy": {"name": policy, "checkpoint": str(ckpt)},
            "router": {"model_timeout_s": 5.0, "max_retries": 0, **router_cfg},
            "pacing": pacing or {},
            "models": [{"name": m} for m in MODELS],
        }
    )

    async def embed(prompt):
        return _ctx()

    handles = {m: FakeHandle(complete=models[m].complete) for m in MODELS}
    return Router.func_or_class(cfg, FakeHandle(__call__=embed), handles), models


def _req(allowed=None, z=None):
    from deployments.router import RouteRequest

    return RouteRequest(
        request_id="r",
        messages=[{"role": "user", "content": "hi"}],
        prompt="hi",
        preference=(1.0, 0.0),
        allowed_models=allowed,
        pacing_z=z,
    )


def _route(router, req) -> dict:
    return asyncio.run(router.route(req))["routing"]


def _decisions(router) -> list[dict]:
    return [e for e in router.recent_events(100) if e["kind"] == "decision"]


def test_unrestricted_unpaced_requests_take_the_policys_choice_and_log_no_pacing(tmp_path):
    router, _ = _router(tmp_path)
    routing = _route(router, _req())
    assert routing["model"] == "a" and "paced" not in routing
    ev = _decisions(router)[-1]
    assert ev["paced"] is False and ev["pacing_z"] is None and ev["allowed"] is None


def test_allowed_models_restrict_the_decision_to_the_best_allowed(tmp_path):
    router, models = _router(tmp_path)
    routing = _route(router, _req(allowed=("b", "c")))
    assert routing["model"] == "b" and routing["propensity"] == 1.0 and routing["allowed"] == 2
    assert models["a"].calls == 0
    assert _decisions(router)[-1]["allowed"] == 2


def test_allowed_models_naming_no_pool_model_is_a_429(tmp_path):
    router, _ = _router(tmp_path)
    with pytest.raises(BackendError) as e:
        _route(router, _req(allowed=("gpt-5",)))
    assert e.value.status == 429


def test_the_fallback_stays_within_the_allowed_models(tmp_path):
    models = {"a": Model("a", fail=True), "b": Model("b", fail=True), "c": Model("c")}
    router, _ = _router(tmp_path, models=models)
    with pytest.raises(BackendError, match="every model tried failed"):
        _route(router, _req(allowed=("a", "b")))
    assert models["a"].calls == 1 and models["b"].calls == 1 and models["c"].calls == 0
    # unrestricted, the same failures fall back to c
    router, _ = _router(tmp_path, models={"a": Model("a", fail=True), "b": Model("b", fail=True), "c": Model("c")})
    assert _route(router, _req())["model"] == "c"


def test_a_fallback_of_a_paced_request_is_logged_as_paced_within_the_allowed(tmp_path):
    models = {"a": Model("a", fail=True), "b": Model("b"), "c": Model("c")}
    router, _ = _router(tmp_path, models=models)
    routing = _route(router, _req(allowed=("a", "b"), z=0.0))
    assert routing["model"] == "b" and routing["fallback"] is True and routing["paced"] is True
    assert models["c"].calls == 0
    failed, served = _decisions(router)[-2:]
    assert failed["model"] == "a" and failed["outcome"] == "error" and failed["paced"] is True
    assert served["model"] == "b" and served["fallback"] is True and served["eligible"] == 1


def test_pacing_at_z0_lets_the_policys_own_choice_through(tmp_path):
    router, _ = _router(tmp_path)
    routing = _route(router, _req(z=0.0))
    assert routing["model"] == "a"  # the policy's greedy choice: eligible at Psi(0) = L / e
    assert routing["paced"] is True and routing["pacing_z"] == 0.0
    assert routing["eligible"] == 3 and routing["fallback_cheapest"] is False
    ev = _decisions(router)[-1]
    assert (ev["paced"], ev["pacing_z"], ev["eligible"], ev["fallback_cheapest"]) == (True, 0.0, 3, False)
    assert ev["propensity"] == 1.0


def test_pacing_at_z1_serves_the_cheapest_allowed(tmp_path):
    router, models = _router(tmp_path)
    routing = _route(router, _req(allowed=("a", "b"), z=1.0))  # Psi(1) = U: no allowed model reaches it
    assert routing["model"] == "b" and routing["fallback_cheapest"] is True and routing["eligible"] == 0
    assert models["c"].calls == 0
    assert _route(router, _req(z=1.0))["model"] == "c"


def test_pacing_between_drops_the_dear_model_first(tmp_path):
    router, _ = _router(tmp_path)
    # Psi(z) crosses a's ratio (~100) before b's (~600): some z serves b, and never a model below the threshold
    served = {z: _route(router, _req(z=z))["model"] for z in np.linspace(0, 1, 21)}
    assert served[0.0] == "a" and served[1.0] == "c"
    order = [MODELS.index(m) for m in served.values()]
    assert order == sorted(order) and "b" in served.values()


def test_bounds_from_the_config_override_the_checkpoint(tmp_path):
    router, _ = _router(tmp_path, pacing={"L": 1e6, "U": 2e6})
    assert router.pacer.info()["source"] == "config"
    routing = _route(router, _req(z=0.0))  # Psi(0) = 1e6 / e: no ratio reaches it
    assert routing["model"] == "c" and routing["fallback_cheapest"] is True


def test_without_calibration_the_bounds_are_estimated_live_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        router, _ = _router(tmp_path, extra=_calibration(bounds=None))
    assert any("estimated from the last" in r.message for r in caplog.records)
    assert router.pacer.info()["source"] == "estimated live"
    assert _route(router, _req(z=0.0))["model"] == "a"
    assert _route(router, _req(z=1.0))["model"] == "c"
    assert router.pacer.info()["seen"] == 2


def test_no_cost_estimate_is_a_clear_error_for_a_paced_request(tmp_path):
    router, _ = _router(tmp_path, extra={"dataset": "synthetic"})  # no calibration; replay models of a dataset
    router.pacer._needs_replay_log = lambda name: False  # noqa: SLF001 (the data is not here)
    router.pacer._fit_replay = lambda rc: None  # noqa: SLF001
    router.pacer.resolve()
    with pytest.raises(BackendError, match="no cost estimate"):
        _route(router, _req(z=0.5))
    assert _route(router, _req())["model"] == "a"  # unpaced requests are not affected


def test_token_priced_models_are_weighted_by_their_prices():
    from banditrouter.config import load_config
    from deployments.router import LivePacer

    cfg = load_config(
        {
            "pacing": {"output_tokens": 100},
            "models": [
                {"name": "x", "backend": "openai", "openai": {"base_url": "http://127.0.0.1:1/v1"}, **p}
                for p in ({"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0},)
            ]
            + [
                {
                    "name": "y",
                    "backend": "openai",
                    "openai": {"base_url": "http://127.0.0.1:1/v1"},
                    "input_price_per_mtok": 4.0,
                    "output_price_per_mtok": 8.0,
                }
            ],
        }
    )
    w = LivePacer(cfg, ("x", "y"), {}).weights(400)  # 400 chars = 100 input tokens
    assert np.allclose(w, [100 * 1e-6 + 100 * 2e-6, 100 * 4e-6 + 100 * 8e-6])


def test_acqb_serves_a_restricted_request_only_on_an_allowed_model(tmp_path):
    router, models = _router(tmp_path, policy="acqb", extra=_calibration())
    for _ in range(5):
        assert _route(router, _req(allowed=("c",)))["model"] == "c"
        assert _route(router, _req(allowed=("b", "c"), z=1.0))["model"] == "c"
    assert models["a"].calls == 0 and models["b"].calls == 0
    assert router._pool_info()["in_flight"] == {"a": 0, "b": 0, "c": 0}  # noqa: SLF001 (slots released)


def test_train_stores_a_pacing_calibration(tmp_path):
    from factories import synthetic_problem

    from banditrouter.pipeline import Split, pacing_calibration, train_one

    x, log, _, _, _ = synthetic_problem(D, 3)
    pol = train_one("linucb", Split(log, x), seed=0, progress=False)
    cal = pacing_calibration(pol, Split(log, x), preference=(1.0, 0.0))
    assert 0 < cal["L"] <= cal["U"] and cal["preference"] == [1.0, 0.0]
    assert cal["cost_estimator"]["models"] == list(log.models)


@pytest.mark.parametrize("name", ["random", "cheapest"])
def test_a_policy_without_positive_values_trains_and_leaves_l_and_u_to_the_router(tmp_path, name):
    """`banditrouter train --policy random` failed after training: the calibration raised on a policy whose values
    are never positive, and the checkpoint was not written."""
    from factories import synthetic_problem

    from banditrouter.pipeline import Split, pacing_calibration, train_one

    x, log, _, _, _ = synthetic_problem(D, 3)
    pol = train_one(name, Split(log, x), seed=0, progress=False)
    cal = pacing_calibration(pol, Split(log, x))
    assert cal["L"] is None and cal["U"] is None and cal["cost_estimator"]["models"] == list(log.models)


def test_fifo_queue_length_gauge_is_not_left_stale(tmp_path):
    """The FIFO router's `banditrouter_queue_length` reads 0 once nothing waits: after a request refused
    because the queue was full (it never waited) and after a waiter cancelled by its client."""
    release = asyncio.Event()

    class Slow(Model):
        async def complete(self, req):
            await release.wait()
            return await super().complete(req)

    models = {m: Slow(m) for m in MODELS}
    router, _ = _router(tmp_path, models=models, max_in_flight_per_model=1, queue_capacity=1)
    gauge = router.metrics.queue_length

    def last() -> float:
        return list(gauge._last.values())[-1]

    async def main():
        from deployments.scheduler import QueueFull

        first = asyncio.create_task(router.route(_req()))  # holds the chosen model's only slot
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(router.route(_req()))  # waits for it
        await asyncio.sleep(0.05)
        assert last() == 1.0
        with pytest.raises(QueueFull):  # the queue holds one: refused, never waited
            await router.route(_req())
        assert last() == 1.0, "the refused request is not counted as waiting"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert last() == 0.0, "a cancelled waiter leaves the gauge at what waits now"
        release.set()
        await first

    asyncio.run(main())
    assert last() == 0.0
