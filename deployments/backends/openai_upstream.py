"""OpenAI-compatible upstream backend: any remote /v1/chat/completions endpoint.

Uses the official `openai` client with its own retries off: we retry only on 5xx and connection errors
(a 4xx is the caller's problem and is not retried), with exponential backoff, up to `max_retries`.
"""

from __future__ import annotations

import asyncio
import os
import time

from banditrouter.config import OpenAIBackendConfig
from deployments.backends.base import BackendError, CompletionRequest, CompletionResult, priced_result


class OpenAIBackend:
    def __init__(self, name: str, cfg: OpenAIBackendConfig, input_price_per_mtok: float, output_price_per_mtok: float):
        from openai import AsyncOpenAI

        self.name, self.cfg = name, cfg
        self.upstream_model = cfg.model or name
        self.prices = (input_price_per_mtok, output_price_per_mtok)
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise BackendError(f"openai backend {name!r}: environment variable {cfg.api_key_env} is not set")
        self.client = AsyncOpenAI(base_url=cfg.base_url, api_key=key or "EMPTY", timeout=cfg.timeout_s, max_retries=0)
        self._healthy = True

    @staticmethod
    def _tokens(usage) -> tuple[int, int]:
        return getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0

    async def _with_retries(self, call):
        import openai

        delay = 0.2
        for attempt in range(self.cfg.max_retries + 1):
            try:
                result = await call()
                self._healthy = True
                return result
            except (openai.APIConnectionError, openai.InternalServerError) as e:  # connection errors, 5xx
                if attempt == self.cfg.max_retries:
                    self._healthy = False
                    raise BackendError(f"upstream {self.cfg.base_url} failed after {attempt + 1} tries: {e}") from None
                await asyncio.sleep(delay)
                delay *= 2
            except openai.APIStatusError as e:  # 4xx: not retried
                raise BackendError(f"upstream {self.cfg.base_url} refused the request ({e.status_code}): {e.message}") from None

    def _kwargs(self, request: CompletionRequest) -> dict:
        return {"model": self.upstream_model, "messages": request.messages, **request.sampling()}

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        t0 = time.perf_counter()
        resp = await self._with_retries(lambda: self.client.chat.completions.create(**self._kwargs(request)))
        return priced_result(resp.choices[0].message.content or "", *self._tokens(resp.usage), self.prices, t0, "openai")

    async def stream(self, request: CompletionRequest):
        t0 = time.perf_counter()
        stream = await self._with_retries(
            lambda: self.client.chat.completions.create(
                **self._kwargs(request), stream=True, stream_options={"include_usage": True}
            )
        )
        parts, usage = [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                yield chunk.choices[0].delta.content
        yield priced_result("".join(parts), *self._tokens(usage), self.prices, t0, "openai")

    def check_health(self) -> None:
        if not self._healthy:
            raise BackendError(f"upstream {self.cfg.base_url} failed its last call")
