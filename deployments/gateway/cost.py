"""A request's maximum cost (what the budget gate reserves before dispatch), and token estimates.

Two kinds of model:
- token-priced (backend `openai`, `vllm`, whose config names input/output USD per million tokens):
      max cost = input tokens x input price + max_tokens x output price
  with `max_tokens` the request's, or `gateway.limits.max_tokens` when it names none (the ingress must then
  send that cap upstream, or the bound does not hold). The input count is `input_token_bound(messages)`, an
  upper bound rather than an estimate: a token of a byte-level BPE (GPT, Llama 3, Mistral) or a byte-fallback
  SentencePiece tokenizer covers at least one UTF-8 byte, so bytes + a per-message chat-template allowance
  bound the real count. The chars/4 estimate can undercount (code, CJK) and would let a key overspend.
- replay (costs come from the routing log, no prices): the model's largest logged cost among the rows the
  replay backend answers from (`deployments.backends.replay.max_logged_cost`): every answer, exact or
  nearest-prompt match, is one of those rows at its logged cost, so the bound is exact. Computed once when
  the cost model is built (`from_config`, in the ingress at start), loading each (dataset, split) once
  (RouterBench: ~3 s, then freed).
`"router"` (the policy picks): the maximum over the pool.

`estimate_tokens` (chars / 4, the one in `deployments/backends/base.py`) is the estimate for prompts and
answers when an upstream omits usage; responses then say `usage_estimated`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.backends.base import estimate_tokens

__all__ = ["CostModel", "ModelPrice", "estimate_tokens", "input_token_bound"]

MESSAGE_OVERHEAD_TOKENS = 16
"""Per message: chat-template tokens (role markers, separators) the text bytes do not include."""
REQUEST_OVERHEAD_TOKENS = 64
"""Per request: template preamble (e.g. a default system header) and the assistant turn's opening tokens."""


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))  # a lone surrogate still counts its 3 bytes


NON_TEXT_PART_TOKENS = 2_000
"""Per non-text content part (an image, audio): upstreams bill these as input tokens (a high-detail image is
~1,100 on OpenAI's scale); counted on top of the part's own JSON bytes."""


def input_token_bound(messages: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> int:
    """An upper bound on the prompt tokens an upstream bills for these chat messages: the UTF-8 bytes of every
    message's text and other fields (name, tool calls), a chat-template allowance, each non-text content part's
    bytes plus `NON_TEXT_PART_TOKENS`, and the bytes of `extra` (the request's `tools` / `response_format`,
    which upstreams bill as input too)."""
    from deployments.conversation import content_text

    total = REQUEST_OVERHEAD_TOKENS
    for m in messages:
        content = m.get("content")
        total += MESSAGE_OVERHEAD_TOKENS + _utf8_len(content_text(content))
        if isinstance(content, list):
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"):
                    total += NON_TEXT_PART_TOKENS + _utf8_len(json.dumps(part, ensure_ascii=False, default=str))
        rest = {k: v for k, v in m.items() if k != "content"}
        if rest:
            total += _utf8_len(json.dumps(rest, ensure_ascii=False, default=str))
    billed = {k: v for k, v in (extra or {}).items() if k in ("tools", "tool_choice", "response_format") and v is not None}
    if billed:
        total += _utf8_len(json.dumps(billed, ensure_ascii=False, default=str))
    return total


@dataclass(frozen=True)
class ModelPrice:
    """USD per million input / output tokens (token-priced), or the largest logged cost (replay)."""

    name: str
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    max_logged_cost: float | None = None

    @property
    def token_priced(self) -> bool:
        return self.max_logged_cost is None


class CostModel:
    def __init__(self, prices: Mapping[str, ModelPrice], default_max_tokens: int):
        if not prices:
            raise ValueError("a cost model needs at least one model")
        if default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        for p in prices.values():
            if p.token_priced and (p.input_per_mtok is None or p.output_per_mtok is None):
                raise ValueError(f"model {p.name!r}: neither token prices nor a logged cost bound")
        self.prices = dict(prices)
        self.default_max_tokens = int(default_max_tokens)

    @classmethod
    def from_config(cls, cfg) -> CostModel:
        """Prices from the config; replay models' bounds from their logs (each dataset/split loaded once)."""
        from banditrouter.data import load_dataset
        from deployments.backends.replay import max_logged_cost

        prices: dict[str, ModelPrice] = {}
        replay: dict[tuple, list[str]] = {}
        for m in cfg.models:
            if m.backend == "replay":
                rc = m.replay
                replay.setdefault((rc.dataset, rc.split, None if rc.data_dir is None else str(rc.data_dir)), []).append(m.name)
            else:  # the config requires both prices for non-replay backends
                prices[m.name] = ModelPrice(m.name, m.input_price_per_mtok, m.output_price_per_mtok)
        for (dataset, split, data_dir), names in replay.items():
            log = load_dataset(dataset, split, data_dir=data_dir)
            for name in names:
                prices[name] = ModelPrice(name, max_logged_cost=max_logged_cost(log, name))
            del log
        return cls({m.name: prices[m.name] for m in cfg.models}, cfg.gateway.limits.max_tokens)

    def max_cost(self, model_or_router: str, input_tokens: int, max_tokens: int | None) -> float:
        """The most one request can cost on this model ("router": on any model of the pool), USD."""
        if input_tokens < 0 or (max_tokens is not None and max_tokens < 0):
            raise ValueError("token counts must be >= 0")
        if model_or_router == "router":
            return max(self._max_cost(p, input_tokens, max_tokens) for p in self.prices.values())
        p = self.prices.get(model_or_router)
        if p is None:
            raise ValueError(f"unknown model {model_or_router!r}; the pool is {list(self.prices)}")
        return self._max_cost(p, input_tokens, max_tokens)

    def _max_cost(self, p: ModelPrice, input_tokens: int, max_tokens: int | None) -> float:
        if not p.token_priced:
            return float(p.max_logged_cost)
        out = self.default_max_tokens if max_tokens is None else max_tokens
        return (input_tokens * p.input_per_mtok + out * p.output_per_mtok) / 1e6

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """The cost of a token-priced call from its (reported or estimated) token counts, USD."""
        p = self.prices.get(model)
        if p is None or not p.token_priced:
            raise ValueError(f"model {model!r} is not token-priced here")
        c = (input_tokens * p.input_per_mtok + output_tokens * p.output_per_mtok) / 1e6
        if not math.isfinite(c):
            raise ValueError("cost overflow")
        return c
