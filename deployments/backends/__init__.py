"""Model backends behind one Protocol (`base.ModelBackend`): replay, OpenAI-compatible upstream, vLLM."""

from __future__ import annotations

from banditrouter.config import ModelConfig
from deployments.backends.base import BackendError, CompletionRequest, CompletionResult, ModelBackend


def make_backend(cfg: ModelConfig, vllm_base_url: str | None = None) -> ModelBackend:
    """Build the backend a model config names (imports only what that backend needs)."""
    if cfg.backend == "replay":
        from deployments.backends.replay import ReplayBackend

        return ReplayBackend(cfg.name, cfg.replay)
    if cfg.backend == "openai":
        from deployments.backends.openai_upstream import OpenAIBackend

        return OpenAIBackend(cfg.name, cfg.openai, cfg.input_price_per_mtok, cfg.output_price_per_mtok)
    if cfg.backend == "vllm":
        # vLLM replicas run as a ray.serve.llm OpenAI app (deployments/vllm_app.py); we call it as an upstream.
        from banditrouter.config import OpenAIBackendConfig
        from deployments.backends.openai_upstream import OpenAIBackend

        if vllm_base_url is None:
            raise BackendError(f"model {cfg.name!r}: the vLLM app's URL is unknown")
        return OpenAIBackend(
            cfg.name,
            OpenAIBackendConfig(base_url=vllm_base_url, model=cfg.name),
            cfg.input_price_per_mtok,
            cfg.output_price_per_mtok,
        )
    raise BackendError(f"unknown backend {cfg.backend!r}")


__all__ = ["BackendError", "CompletionRequest", "CompletionResult", "ModelBackend", "make_backend"]
