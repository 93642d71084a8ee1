"""A model deployment's `autoscaling_config` reaches Serve: under load it goes from 1 to 2 replicas, and
back to 1 when the load stops. Replay with simulated latency keeps requests in flight, as real models do."""

from __future__ import annotations

import threading
import time

import pytest
import requests

PORT = 8014
APP = "autoscale"
MODEL = "claude-instant-v1"


def _running(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def _wait_for(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_model_deployment_scales_up_under_load_and_back(ray_local, tmp_path, data_dir):
    from ray import serve

    from banditrouter.config import load_config
    from banditrouter.data import load_dataset
    from banditrouter.policies import save_checkpoint
    from banditrouter.policies.static import RandomPolicy
    from deployments.app import build_app

    pool = [MODEL, "gpt-3.5-turbo-1106"]
    ckpt = save_checkpoint(RandomPolicy(tuple(pool), context_dim=384, tau=1e-3), tmp_path / "random.pt")
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        "look_back_period_s": 2,
    }
    cfg = load_config(
        {
            "policy": {"name": "random", "checkpoint": str(ckpt)},
            "embedder": {"ray_actor_options": {"num_cpus": 0.5}},
            "models": [
                {
                    "name": MODEL,
                    "replay": {"split": "test", "simulate_latency": True, "base_latency_s": 0.5, "tokens_per_s": 1000},
                    "autoscaling_config": autoscaling,
                },
                {"name": pool[1], "replay": {"split": "test"}},
            ],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        serve.run(build_app(cfg), name=APP, route_prefix="/")
        dep = f"model:{MODEL}"
        assert _running(dep) == 1

        stop, codes = threading.Event(), []
        logged = load_dataset("routerbench", "test").prompts[0]  # a logged prompt: replay answers it exactly

        def client():
            body = {"model": MODEL, "messages": [{"role": "user", "content": logged}]}
            while not stop.is_set():
                codes.append(requests.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(12)]
        for t in threads:
            t.start()
        scaled_up = _wait_for(lambda: _running(dep) == 2, 90)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert scaled_up, serve.status().applications[APP].deployments[dep]
        assert codes and set(codes) == {200}
        assert _wait_for(lambda: _running(dep) == 1, 120), serve.status().applications[APP].deployments[dep]
    finally:
        serve.delete(APP)
        serve.shutdown()
