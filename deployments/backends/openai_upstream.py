"""OpenAI-compatible upstream backend: any remote /v1/chat/completions endpoint.

Uses the official `openai` client with its own retries off (it would also retry 408 / 409 / 429, which are
4xx): tenacity retries only connection errors, timeouts and 5xx, with jittered exponential backoff
(`wait_random_exponential`), up to `max_retries` times; a 4xx is never retried. What still fails becomes a
`BackendError` marked `retryable` (5xx / connection: the router may retry on another replica, then fall back
to another model) or not (4xx; `client_error` for 400 / 413 / 422, the caller's own request). Error messages
name the model, never the upstream URL (they reach clients); the URL goes to the replica's log.

Usage an upstream omits is estimated (characters / 4, `estimate_tokens`) and flagged `usage_estimated`, so
cost is never silently 0. `CompletionRequest.passthrough` (n, tools, tool_choice, response_format) is
forwarded as sent; tool calls and extra choices come back in `info`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from banditrouter.config import OpenAIBackendConfig
from deployments.backends.base import BackendError, CompletionRequest, CompletionResult, estimate_tokens, priced_result
from deployments.conversation import content_text

logger = logging.getLogger("ray.serve")

RETRY_WAIT_S = (0.2, 4.0)
"""Jittered exponential backoff between tries: random in [0, min(max, multiplier * 2^n)] seconds."""
CLIENT_ERROR_STATUSES = (400, 413, 422)
"""Upstream statuses that mean the caller's own request is unacceptable (the ingress answers 400)."""


class OpenAIBackend:
    def __init__(self, name: str, cfg: OpenAIBackendConfig, input_price_per_mtok: float, output_price_per_mtok: float):
        from openai import AsyncOpenAI

        self.name, self.cfg = name, cfg
        self.upstream_model = cfg.model or name
        self.prices = (input_price_per_mtok or 0.0, output_price_per_mtok or 0.0)
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise BackendError(f"openai backend {name!r}: environment variable {cfg.api_key_env} is not set")
        self.client = AsyncOpenAI(base_url=cfg.base_url, api_key=key or "EMPTY", timeout=cfg.timeout_s, max_retries=0)
        self._healthy = True

    async def _with_retries(self, call):
        """`await call()`, retried on connection errors, timeouts and 5xx only (tenacity, jittered)."""
        import openai
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

        def transient(e: BaseException) -> bool:
            # not a read timeout: the upstream may have billed that call, and a retry could bill it again
            if isinstance(e, openai.APITimeoutError):
                return False
            return isinstance(e, openai.APIConnectionError | openai.InternalServerError) or (
                isinstance(e, openai.APIStatusError) and e.status_code >= 500
            )

        multiplier, cap = RETRY_WAIT_S
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(transient),
                stop=stop_after_attempt(self.cfg.max_retries + 1),
                wait=wait_random_exponential(multiplier=multiplier, max=cap),
                reraise=True,
            ):
                with attempt:
                    result = await call()
            self._healthy = True
            return result
        except openai.APIStatusError as e:
            status = e.status_code
            logger.warning("upstream %s of model %s answered %s: %s", self.cfg.base_url, self.name, status, e.message)
            if status >= 500:
                self._healthy = False
                raise BackendError(
                    f"the upstream of model {self.name!r} failed ({status}) after {self.cfg.max_retries + 1} tries",
                    retryable=True,
                    status=status,
                ) from None
            raise BackendError(
                f"the upstream of model {self.name!r} refused the request ({status}): {_short(e.message)}",
                status=status,
                client_error=status in CLIENT_ERROR_STATUSES,
            ) from None
        except openai.APIConnectionError as e:  # connection refused / reset, timeouts
            self._healthy = False
            logger.warning("upstream %s of model %s unreachable: %s", self.cfg.base_url, self.name, e)
            if isinstance(e, openai.APITimeoutError):  # not retried, no fallback: it may have been billed (504)
                raise BackendError(
                    f"the upstream of model {self.name!r} did not answer within {self.cfg.timeout_s:g} s", status=504
                ) from None
            raise BackendError(
                f"the upstream of model {self.name!r} was unreachable after {self.cfg.max_retries + 1} tries", retryable=True
            ) from None

    def _kwargs(self, request: CompletionRequest) -> dict:
        return {
            "model": self.upstream_model,
            "messages": request.messages,
            **request.sampling(),
            **(getattr(request, "passthrough", None) or {}),
        }

    def _estimated(self, request: CompletionRequest, text: str) -> tuple[int, int]:
        prompt = " ".join(content_text(m.get("content")) for m in request.messages if isinstance(m, dict))
        return estimate_tokens(prompt or request.prompt), estimate_tokens(text)

    def _priced(self, request: CompletionRequest, text: str, usage, t0: float, info: dict[str, Any]) -> CompletionResult:
        n_in = getattr(usage, "prompt_tokens", None) if usage is not None else None
        n_out = getattr(usage, "completion_tokens", None) if usage is not None else None
        estimated = n_in is None or n_out is None
        if estimated:  # the upstream sent no usage: estimate, and say so (cost is never silently 0)
            est_in, est_out = self._estimated(request, text)
            n_in, n_out = n_in if n_in is not None else est_in, n_out if n_out is not None else est_out
        result = priced_result(text, n_in, n_out, self.prices, t0, "openai")
        result.info.update(info)
        if estimated:
            result.info["usage_estimated"] = True
        return result

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        t0 = time.perf_counter()
        resp = await self._with_retries(lambda: self.client.chat.completions.create(**self._kwargs(request)))
        if not resp.choices:
            raise BackendError(f"the upstream of model {self.name!r} returned no choices", retryable=True)
        first = resp.choices[0]
        info: dict[str, Any] = {"finish_reason": first.finish_reason}
        if first.message.tool_calls:
            info["tool_calls"] = [c.model_dump() for c in first.message.tool_calls]
        if len(resp.choices) > 1:  # n > 1: every choice, as the upstream sent it
            info["choices"] = [c.model_dump() for c in resp.choices]
        return self._priced(request, first.message.content or "", resp.usage, t0, info)

    async def stream(self, request: CompletionRequest):
        t0 = time.perf_counter()
        stream = await self._with_retries(
            lambda: self.client.chat.completions.create(
                **self._kwargs(request), stream=True, stream_options={"include_usage": True}
            )
        )
        import openai

        parts, usage, finish = [], None, None
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                    if chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
                        yield chunk.choices[0].delta.content
        except openai.APIError as e:  # the connection broke mid-stream (before the first chunk: the router may retry)
            logger.warning("upstream %s of model %s broke its stream: %s", self.cfg.base_url, self.name, e)
            self._healthy = False
            raise BackendError(f"the upstream of model {self.name!r} broke its stream", retryable=True) from None
        yield self._priced(request, "".join(parts), usage, t0, {"finish_reason": finish})

    def check_health(self) -> None:
        if not self._healthy:
            raise BackendError(f"the upstream of model {self.name!r} failed its last call")


def _short(message: str | None, limit: int = 300) -> str:
    """An upstream's refusal message, bounded (it is shown to the client)."""
    text = " ".join(str(message or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
