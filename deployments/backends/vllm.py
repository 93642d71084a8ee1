"""vLLM backend: the model runs in a `ray.serve.llm` LLMServer deployment (GPU) bound into the same Serve
application; this backend calls it through its deployment handle with OpenAI request objects.

Nothing here imports vLLM or `ray.serve.llm` at module import: the CPU path never touches them, and the
config validates without them. `build_llm_app` is what `deployments.app.build_app` uses for each vllm model.
"""

from __future__ import annotations

import json
import time
from typing import Any

from banditrouter.config import ModelConfig
from deployments.backends.base import BackendError, CompletionRequest, CompletionResult, priced_result


def llm_config(cfg: ModelConfig):
    """Our model config → `ray.serve.llm.LLMConfig` (replicas/autoscaling carry over)."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError as e:  # no vLLM on this machine
        raise BackendError(
            f"model {cfg.name!r} uses backend 'vllm', which needs a GPU node with vLLM installed "
            f"(pip install -e '.[serve,gpu]'): {e}"
        ) from None
    v = cfg.vllm
    deployment: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests}
    if cfg.autoscaling_config:
        deployment["autoscaling_config"] = dict(cfg.autoscaling_config)
    else:
        deployment["num_replicas"] = cfg.num_replicas
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.name, "model_source": v.model_source},
        "deployment_config": deployment,
        "engine_kwargs": {"tensor_parallel_size": v.tensor_parallel_size, **v.engine_kwargs},
    }
    if v.accelerator_type:
        kwargs["accelerator_type"] = v.accelerator_type
    return LLMConfig(**kwargs)


def build_llm_app(cfg: ModelConfig):
    config = llm_config(cfg)  # raises the actionable error first where vLLM is missing
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(config, name_prefix=f"vllm:{cfg.name}:")


class VLLMBackend:
    """Wraps the handle of a `ray.serve.llm` LLMServer deployment."""

    def __init__(self, cfg: ModelConfig, handle):
        self.name, self.cfg = cfg.name, cfg
        self.prices = (cfg.input_price_per_mtok or 0.0, cfg.output_price_per_mtok or 0.0)
        self.handle = handle.options(stream=True)
        self._healthy = True

    def _request(self, request: CompletionRequest, stream: bool):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        kw: dict[str, Any] = {"model": self.name, "messages": request.messages, "stream": stream}
        if stream:
            kw["stream_options"] = {"include_usage": True}
        # n, tools, tool_choice, response_format: vLLM's OpenAI server takes them as sent
        kw.update(getattr(request, "passthrough", None) or {})
        return ChatCompletionRequest(**kw, **request.sampling())

    def _check(self, item) -> None:
        if type(item).__name__ == "ErrorResponse":
            self._healthy = False
            raise BackendError(f"vLLM model {self.name!r}: {getattr(item, 'error', item)}")

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        t0 = time.perf_counter()
        resp = None
        async for item in self.handle.chat.remote(self._request(request, stream=False)):
            self._check(item)
            resp = item
        if resp is None:
            raise BackendError(f"vLLM model {self.name!r} returned nothing")
        self._healthy = True
        usage = resp.usage
        text = resp.choices[0].message.content or ""
        return priced_result(text, usage.prompt_tokens or 0, usage.completion_tokens or 0, self.prices, t0, "vllm")

    async def stream(self, request: CompletionRequest):
        """LLMServer streams batches of SSE strings ('data: {json}\\n\\n'); we yield their text deltas."""
        t0 = time.perf_counter()
        parts: list[str] = []
        n_in = n_out = 0
        async for batch in self.handle.chat.remote(self._request(request, stream=True)):
            for item in batch if isinstance(batch, list) else [batch]:
                self._check(item)
                for line in str(item).splitlines():
                    line = line.strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data:") :])
                    if chunk.get("usage"):
                        n_in = chunk["usage"].get("prompt_tokens") or n_in
                        n_out = chunk["usage"].get("completion_tokens") or n_out
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            parts.append(text)
                            yield text
        self._healthy = True
        yield priced_result("".join(parts), n_in, n_out, self.prices, t0, "vllm")

    def check_health(self) -> None:
        if not self._healthy:
            raise BackendError(f"vLLM model {self.name!r} failed its last call")
