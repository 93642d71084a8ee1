"""The vLLM backend. Without vLLM (this CPU machine) the config still validates and the builder refuses
with an actionable error; on a GPU node with vLLM and local weights (BANDITROUTER_VLLM_MODEL=/path) the
`gpu` test serves one model through ray.serve.llm and routes to it."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from banditrouter.config import load_config
from deployments.backends import BackendError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _cfg(model_source: str, ckpt=None):
    raw = {
        "models": [
            {
                "name": "small-llm",
                "backend": "vllm",
                "vllm": {"model_source": model_source, "engine_kwargs": {"max_model_len": 2048}},
                "input_price_per_mtok": 0.1,
                "output_price_per_mtok": 0.2,
                "ray_actor_options": {"num_cpus": 0.1},
            },
            {"name": "claude-instant-v1", "backend": "replay"},
        ]
    }
    if ckpt:
        raw["policy"] = {"checkpoint": str(ckpt)}
    return load_config(raw)


def test_vllm_config_validates_without_vllm():
    cfg = _cfg("Qwen/Qwen2.5-0.5B-Instruct")
    assert cfg.models[0].vllm.model_source == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(Exception, match="needs a 'vllm:' section"):
        load_config(
            {"models": [{"name": "a", "backend": "vllm", "input_price_per_mtok": 1, "output_price_per_mtok": 1}, {"name": "b"}]}
        )


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_builder_refuses_vllm_without_vllm_clearly():
    from deployments.app import build_app

    with pytest.raises(BackendError, match=r"needs a GPU node with vLLM installed"):
        build_app(_cfg("Qwen/Qwen2.5-0.5B-Instruct"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM")
@pytest.mark.skipif(not os.environ.get("BANDITROUTER_VLLM_MODEL"), reason="set BANDITROUTER_VLLM_MODEL to local weights")
def test_vllm_model_serves_through_the_router(ray_local, tmp_path):
    """A direct call to the vLLM pool model and a routed call both answer, with token-priced costs."""
    import torch
    from openai import OpenAI
    from ray import serve

    from banditrouter.policies import save_checkpoint
    from banditrouter.policies.static import CheapestPolicy
    from deployments.app import build_app

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    ckpt = tmp_path / "cheapest.pt"
    from banditrouter.policies.base import BanditBatch

    pol = CheapestPolicy(("small-llm", "claude-instant-v1"), context_dim=384, tau=1e-3)
    two = np.ones(2)
    batch = BanditBatch(np.zeros((2, 384)), np.full((2, 2), 0.5), np.array([0, 1]), two, two / 2, np.array([1e-6, 1e-3]))
    pol.update(batch)  # small-llm is the cheaper arm
    save_checkpoint(pol, ckpt)
    cfg = _cfg(os.environ["BANDITROUTER_VLLM_MODEL"], ckpt)
    serve.start(http_options={"host": "127.0.0.1", "port": 8013})
    try:
        serve.run(build_app(cfg), name="vllm-test", route_prefix="/")
        client = OpenAI(base_url="http://127.0.0.1:8013/v1", api_key="unused")
        msg = [{"role": "user", "content": "Say hello in one word."}]
        direct = client.chat.completions.create(model="small-llm", messages=msg, max_tokens=8)
        assert direct.choices[0].message.content
        routed = client.chat.completions.create(model="router", messages=msg, max_tokens=8)
        assert routed.model == "small-llm" and routed.model_extra["routing"]["cost_usd"] > 0
        chunks = list(client.chat.completions.create(model="small-llm", messages=msg, max_tokens=8, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        serve.shutdown()
