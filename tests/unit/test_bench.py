"""`banditrouter bench`'s pieces that run without Ray: the learner's absorb rate, the suite's ratios and
their targets, and the in-process router adapter `router.fused` uses."""

from __future__ import annotations

import asyncio

import pytest

from banditrouter import bench
from banditrouter.config import load_config
from banditrouter.policies import make_policy, save_checkpoint
from deployments.inprocess import InProcessRouter

MODELS = ("cheap", "mid", "strong")


def _cfg(tmp_path, ckpt, batch_size=4):
    return load_config(
        {
            "policy": {"name": "linucb", "checkpoint": str(ckpt)},
            "learning": {"batch_size": batch_size, "replay_steps": 2},
            "models": [{"name": m, "replay": {"split": "test"}} for m in MODELS],
        },
        base_dir=tmp_path,
    )


@pytest.mark.parametrize("name", ["linucb", "barp"])
def test_learner_absorb_applies_every_sample(tmp_path, name):
    ckpt = save_checkpoint(make_policy(name, MODELS, 8, tau=0.01), tmp_path / f"{name}.pt")
    out = bench.learner_absorb(_cfg(tmp_path, ckpt), ckpt, samples=42)
    assert out["policy"] == name and out["batch_size"] == 4
    assert out["samples"] == 40, "every fed sample (whole batches) was learned, none twice"
    assert out["learner_samples_per_s"] > 0 and out["buffer_samples_per_s"] > 0
    assert out["replay_steps"] == (2 if name == "barp" else 0)


def test_suite_ratios_and_targets(tmp_path, monkeypatch):
    ckpt = save_checkpoint(make_policy("linucb", MODELS, 8, tau=0.01), tmp_path / "linucb.pt")
    cfg = _cfg(tmp_path, ckpt)
    runs = {
        200: {"ratio": 0.5, "routed_rps": 30.0, "unloaded_p50_over_embed_p50": 1.5, "unloaded_added_ms": 12.0},
        None: {"ratio": 0.9, "routed_rps": 8.0, "unloaded_p50_over_embed_p50": 2.5, "unloaded_added_ms": 40.0},
    }
    monkeypatch.setattr(bench, "run_bench", lambda cfg, n, c, out, seed, chars, unloaded: runs[chars])
    monkeypatch.setattr(bench, "learner_absorb", lambda cfg, path, seed: {"learner_samples_per_s": 20.0})
    out = tmp_path / "bench.json"
    res = bench.run_suite(cfg, out, short_requests=10, full_requests=5, unloaded=3)
    s = res["summary"]
    assert s["short_prompts_ratio"] == 0.5 and s["routerbench_ratio"] == 0.9
    assert s["unloaded_p50_over_embed_p50"] == 2.5 and s["unloaded_added_ms"] == 40.0
    assert s["learner_over_routed"] == pytest.approx(20.0 / 8.0)  # only linucb.pt exists beside the config's
    assert res["met"] == {
        "short_prompts_ratio": False,
        "routerbench_ratio": True,
        "unloaded_p50_over_embed_p50": False,  # a ceiling: 2.5 > 2
        "unloaded_short_p50_over_embed_p50": True,  # 1.5 <= 2
        "learner_over_routed": True,
    }
    assert out.exists()


def test_suite_without_learner_checkpoints_reports_the_learner_target_not_met(tmp_path, monkeypatch):
    ckpt = tmp_path / "elsewhere" / "ucb.pt"  # no barp.pt / linucb.pt beside it: nothing to measure
    run = {"ratio": 0.9, "routed_rps": 8.0, "unloaded_p50_over_embed_p50": 1.5, "unloaded_added_ms": 12.0}
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: run)
    res = bench.run_suite(_cfg(tmp_path, ckpt), tmp_path / "bench.json", short_requests=1, full_requests=1)
    assert res["summary"]["learner_over_routed"] is None and res["met"]["learner_over_routed"] is False


def test_run_bench_ratios_come_from_the_raw_and_routed_phases(tmp_path, monkeypatch):
    """routed / raw throughput, and the unloaded routed p50 over the single-prompt embedding p50 taken over
    the same prompts the unloaded phase sends."""
    ckpt = save_checkpoint(make_policy("linucb", MODELS, 8, tau=0.01), tmp_path / "linucb.pt")
    seen = {}

    def raw(cfg, prompts, single=100):
        seen["single"] = single
        return {"raw_embedder_rps": 40.0, "single_embed_p50_ms": 20.0}

    monkeypatch.setattr(bench, "bench_prompts", lambda cfg, n, seed, chars: [f"p{i}" for i in range(n)])
    monkeypatch.setattr(bench, "raw_embedder", raw)
    monkeypatch.setattr(bench, "routed", lambda cfg, p, n, c, unloaded: {"routed_rps": 10.0, "unloaded_p50_ms": 50.0})
    res = bench.run_bench(_cfg(tmp_path, ckpt), 30, 4, None, unloaded=7)
    assert res["ratio"] == pytest.approx(0.25)
    assert res["unloaded_p50_over_embed_p50"] == pytest.approx(2.5) and res["unloaded_added_ms"] == pytest.approx(30.0)
    assert seen["single"] == 7


class _FakeRouter:
    def __init__(self):
        self.healthy = 0

    async def route(self, req):
        await asyncio.sleep(0)
        return {"routing": {"model": "m"}, "req": req}

    async def route_stream(self, req):
        yield {"model": "m"}
        yield "text"

    def info(self):
        return {"policy": "x"}

    def recent_events(self, n=100):
        raise ValueError("boom")

    async def check_health(self):
        self.healthy += 1


def test_in_process_router_answers_like_a_handle():
    fake = _FakeRouter()
    r = InProcessRouter(fake)

    async def main():
        assert (await r.route.remote("q"))["req"] == "q"
        gen = r.options(stream=True).route_stream.remote("q")
        assert await gen.__anext__() == {"model": "m"}
        assert [x async for x in gen] == ["text"]
        assert await r.info.remote() == {"policy": "x"}
        with pytest.raises(ValueError, match="boom"):  # raised where awaited, as from a handle
            await r.recent_events.remote(5)
        await r.check_health()

    asyncio.run(main())
    assert fake.healthy == 1


def test_fused_config_builds_no_router_deployment():
    from deployments.app import build_app

    cfg = load_config(
        {
            "router": {"fused": True},
            "policy": {"name": "linucb", "checkpoint": "unused.pt"},
            "models": [{"name": m, "replay": {"split": "test"}} for m in MODELS],
        }
    )
    app = build_app(cfg)
    names = {d.name for d in _deployments(app)}
    assert "ingress" in names and "embedder" in names and "router" not in names
    unfused = cfg.model_copy(update={"router": cfg.router.model_copy(update={"fused": False})})
    plain = {d.name for d in _deployments(build_app(unfused))}
    assert "router" in plain


def _deployments(app):
    """Every deployment bound into an Application (walks the bound arguments)."""
    seen, todo = [], [app._bound_deployment]
    while todo:
        d = todo.pop()
        if any(d is s for s in seen):
            continue
        seen.append(d)
        for a in list(d.init_args) + list(d.init_kwargs.values()):
            vals = a.values() if isinstance(a, dict) else [a]
            for v in vals:
                inner = getattr(v, "_bound_deployment", None)
                if inner is not None:
                    todo.append(inner)
    return seen


def test_the_ingress_health_check_and_shutdown_reach_a_fused_router():
    """Serve health-checks the ingress replica, not a router: with the router fused in, that check must start
    the router's weight sync and shipper (an idle replica follows the learner), and the replica's shutdown
    must close the shipper (queued decisions go to the spill). A plain handle gets neither."""
    from deployments.ingress import Ingress

    cls = Ingress.func_or_class
    user_del = cls.__mro__[1].__del__  # ours; Serve's ASGI wrapper subclass awaits the app's shutdown, then calls it

    class Shipper:
        closed = 0

        def close(self):
            Shipper.closed += 1

    fake = _FakeRouter()
    fake.shipper = Shipper()
    ingress = object.__new__(cls)
    ingress.router = InProcessRouter(fake)
    asyncio.run(cls.check_health(ingress))
    assert fake.healthy == 1
    user_del(ingress)
    assert Shipper.closed == 1

    class Handle:  # a DeploymentHandle answers any attribute; the ingress must not call into it
        def __getattr__(self, name):
            raise AssertionError(f"called {name} on the router handle")

    plain = object.__new__(cls)
    plain.router = Handle()
    asyncio.run(cls.check_health(plain))
    user_del(plain)


def test_bench_refuses_a_model_its_replay_log_lacks_before_measuring_anything(tmp_path, monkeypatch):
    """The replay check (and the index warm-up) runs before the raw half: a wrong model name is a clear error at
    once, not a traceback after minutes of measuring."""
    import yaml
    from typer.testing import CliRunner

    from banditrouter.cli import app

    ckpt = save_checkpoint(make_policy("linucb", ("claude-v1", "not-a-model"), 4, tau=0.01, seed=0), tmp_path / "p.pt")
    cfg = tmp_path / "bad.yaml"
    models = [{"name": m, "replay": {"split": "test"}} for m in ("claude-v1", "not-a-model")]
    cfg.write_text(yaml.safe_dump({"policy": {"name": "linucb", "checkpoint": str(ckpt)}, "models": models}))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured before the check"))
    result = CliRunner().invoke(app, ["bench", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "'not-a-model' is not in routerbench/test" in result.output
