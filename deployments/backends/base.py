"""The model-backend Protocol every model replica wraps: replay, OpenAI-compatible upstream, vLLM."""

from __future__ import annotations

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


@dataclass(frozen=True)
class CompletionResult:
    text: str
    cost_usd: float
    input_tokens: int
    output_tokens: int
    latency_s: float
    info: dict[str, Any] = field(default_factory=dict)
    """Backend specifics surfaced to the caller, e.g. replay's {"match": "exact" | "nearest"}."""


class BackendError(RuntimeError):
    """The backend could not answer (upstream down, no logged answer); the ingress returns 502."""


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
