"""The model-backend Protocol every model replica wraps: replay, OpenAI-compatible upstream, vLLM."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

CHARS_PER_TOKEN = 4.0
"""Token counts are estimated as characters / 4 where the backend reports none (replay)."""


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class CompletionRequest:
    request_id: str
    messages: list[dict[str, Any]]
    prompt: str
    """The text the router embedded and a replay log is keyed by (the user turns, joined)."""
    max_tokens: int | None = None
    temperature: float | None = None
    context: list[float] | None = None
    """The prompt's embedding, when the router already computed it."""
    passthrough: dict[str, Any] | None = None
    """OpenAI request fields forwarded as sent to an upstream that supports them (`n`, `tools`, `tool_choice`,
    `response_format`; deployments/gateway/parsing.py). The ingress refuses them (400) for a backend that
    cannot honour them, so a backend that receives any can forward them."""

    def sampling(self) -> dict[str, Any]:
        """The OpenAI sampling fields the caller set (max_tokens, temperature), for an upstream request."""
        return {k: v for k, v in (("max_tokens", self.max_tokens), ("temperature", self.temperature)) if v is not None}


@dataclass(frozen=True)
class CompletionResult:
    text: str
    cost_usd: float
    input_tokens: int
    output_tokens: int
    latency_s: float
    info: dict[str, Any] = field(default_factory=dict)
    """Backend specifics surfaced to the caller, e.g. replay's {"match": "exact" | "nearest"}."""


def priced_result(text: str, n_in: int, n_out: int, prices: tuple[float, float], t0: float, backend: str) -> CompletionResult:
    """The result of a token-priced backend: cost = tokens x USD per million tokens (input, output);
    latency from `t0` (a `time.perf_counter()` reading taken when the call started)."""
    return CompletionResult(
        text=text,
        cost_usd=(n_in * prices[0] + n_out * prices[1]) / 1e6,
        input_tokens=n_in,
        output_tokens=n_out,
        latency_s=time.perf_counter() - t0,
        info={"backend": backend},
    )


class BackendError(RuntimeError):
    """The backend could not answer (upstream down, no logged answer); the ingress returns 502 (400 when
    `client_error`).

    retryable     the same call may succeed on another try (upstream 5xx, connection error, a dead replica):
                  the router retries it on another replica, then falls back to another model. False (4xx,
                  no logged answer, a misconfiguration): never retried, no fallback.
    status        the upstream's HTTP status, when it answered one.
    client_error  the upstream refused the caller's own request (400 / 413 / 422: e.g. a response_format it
                  cannot honour): the ingress answers 400 with the message rather than 502.
    The message never carries upstream URLs or tracebacks (it reaches the client)."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None, client_error: bool = False):
        super().__init__(message)
        self.message, self.retryable, self.status, self.client_error = message, retryable, status, client_error

    def __reduce__(self):  # crosses Ray's process boundary with its flags
        return (_backend_error, (type(self), self.message, self.retryable, self.status, self.client_error))


def _backend_error(cls, message, retryable, status, client_error):
    return cls(message, retryable=retryable, status=status, client_error=client_error)


class ModelBackend(Protocol):
    name: str

    async def complete(self, request: CompletionRequest) -> CompletionResult: ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[str | CompletionResult]:
        """Yields text chunks, then the final CompletionResult (with cost and token counts)."""
        ...

    def check_health(self) -> None:
        """Raises when the backend cannot serve (Serve calls this on every replica periodically)."""
        ...


async def stream_text(result: CompletionResult, chunk_words: int = 4) -> AsyncIterator[str | CompletionResult]:
    """Stream a finished answer in word chunks (used by backends that produce the whole text at once)."""
    words = result.text.split(" ")
    for i in range(0, len(words), chunk_words):
        piece = " ".join(words[i : i + chunk_words])
        yield piece if i + chunk_words >= len(words) else piece + " "
    yield result
