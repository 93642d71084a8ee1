"""Model deployment: one per pool model, wrapping its backend (replay | OpenAI upstream | vLLM)."""

from __future__ import annotations

from ray import serve

from banditrouter.config import ModelConfig
from banditrouter.threads import limit_blas_threads
from deployments.backends import CompletionRequest, CompletionResult, make_backend


@serve.deployment
class ModelDeployment:
    def __init__(self, cfg: ModelConfig, llm_server=None):
        limit_blas_threads()
        self.cfg = cfg
        self.backend = make_backend(cfg, llm_server)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return await self.backend.complete(request)

    async def stream(self, request: CompletionRequest):
        async for item in self.backend.stream(request):
            yield item

    def check_health(self) -> None:
        self.backend.check_health()
