"""Model backends behind one Protocol (`base.ModelBackend`): replay, OpenAI-compatible upstream, vLLM."""

from __future__ import annotations

from banditrouter.config import ModelConfig
from deployments.backends.base import BackendError, CompletionRequest, CompletionResult, ModelBackend


def make_backend(cfg: ModelConfig, llm_handle=None) -> ModelBackend:
    """Build the backend a model config names (imports only what that backend needs)."""
    if cfg.backend == "replay":
        from deployments.backends.replay import ReplayBackend

        return ReplayBackend(cfg.name, cfg.replay)
    if cfg.backend == "openai":
        from deployments.backends.openai_upstream import OpenAIBackend

        return OpenAIBackend(cfg.name, cfg.openai, cfg.input_price_per_mtok, cfg.output_price_per_mtok)
    if cfg.backend == "vllm":
        # The engine runs in a ray.serve.llm LLMServer deployment bound into the same app; we hold its handle.
        from deployments.backends.vllm import VLLMBackend

        if llm_handle is None:
            raise BackendError(f"model {cfg.name!r}: backend 'vllm' needs the handle of its LLMServer deployment")
        return VLLMBackend(cfg, llm_handle)
    raise BackendError(f"unknown backend {cfg.backend!r}")


__all__ = ["BackendError", "CompletionRequest", "CompletionResult", "ModelBackend", "make_backend"]
