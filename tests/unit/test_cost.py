"""A request's maximum cost: token-priced models (input bound x input price + max_tokens x output price),
replay models (the largest logged cost among the rows the backend answers from), "router" = max over the
pool; and the input-token bound, which must never undercount a byte-level BPE tokenizer."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from banditrouter.config import load_config
from deployments.backends.base import CompletionRequest, estimate_tokens
from deployments.backends.replay import ReplayBackend
from deployments.gateway.cost import MESSAGE_OVERHEAD_TOKENS, REQUEST_OVERHEAD_TOKENS, CostModel, ModelPrice, input_token_bound


def write_log(path, rows):
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def replay_log(tmp_path):
    """Model `a`: logged costs 0.1, 0.3 with answers, and 0.5 WITHOUT an answer (the backend never serves that
    row, so the bound is 0.3). Model `b`: 0.02, 0.04."""
    return write_log(
        tmp_path / "log.jsonl",
        [
            {
                "id": "p1",
                "prompt": "one",
                "outcomes": {"a": {"score": 1, "cost": 0.1, "response": "A1"}, "b": {"score": 0, "cost": 0.02, "response": "B1"}},
            },
            {
                "id": "p2",
                "prompt": "two",
                "outcomes": {"a": {"score": 1, "cost": 0.3, "response": "A2"}, "b": {"score": 1, "cost": 0.04, "response": "B2"}},
            },
            {
                "id": "p3",
                "prompt": "three",
                "outcomes": {"a": {"score": 1, "cost": 0.5}, "b": {"score": 1, "cost": 0.01, "response": "B3"}},
            },
        ],
    )


def test_token_priced_max_cost_uses_max_tokens_or_the_configured_cap():
    cm = CostModel({"gpt": ModelPrice("gpt", input_per_mtok=2.0, output_per_mtok=8.0)}, default_max_tokens=1000)
    assert cm.max_cost("gpt", 500, 200) == pytest.approx((500 * 2.0 + 200 * 8.0) / 1e6)
    assert cm.max_cost("gpt", 500, None) == pytest.approx((500 * 2.0 + 1000 * 8.0) / 1e6)
    assert cm.cost("gpt", 10, 20) == pytest.approx((10 * 2.0 + 20 * 8.0) / 1e6)
    with pytest.raises(ValueError, match="unknown model"):
        cm.max_cost("nope", 1, 1)
    with pytest.raises(ValueError, match=">= 0"):
        cm.max_cost("gpt", -1, 1)


def test_from_config_replay_bound_is_the_largest_cost_the_backend_can_charge(tmp_path, replay_log):
    cfg = load_config(
        {
            "gateway": {"limits": {"max_tokens": 2048}},
            "models": [
                {"name": "a", "replay": {"dataset": str(replay_log)}},
                {"name": "b", "replay": {"dataset": str(replay_log)}},
                {
                    "name": "up",
                    "backend": "openai",
                    "openai": {"base_url": "http://127.0.0.1:9/v1"},
                    "input_price_per_mtok": 1.0,
                    "output_price_per_mtok": 4.0,
                },
            ],
        },
        base_dir=tmp_path,
    )
    cm = CostModel.from_config(cfg)
    assert cm.max_cost("a", 10_000, 10) == pytest.approx(0.3)  # not 0.5: that row has no answer to replay
    assert cm.max_cost("b", 0, None) == pytest.approx(0.04)
    assert cm.max_cost("up", 100, None) == pytest.approx((100 * 1.0 + 2048 * 4.0) / 1e6)
    assert cm.max_cost("router", 100, None) == pytest.approx(0.3)
    assert cm.max_cost("router", 10**6, 10**6) == pytest.approx(1.0 + 4.0)  # a huge request: the priced model tops it
    # every answer the replay backend gives costs at most the bound, and the bound is reached
    charged = []
    for name in ("a", "b"):
        be = ReplayBackend(name, cfg.models[0 if name == "a" else 1].replay)
        for p in be.prompts:
            r = asyncio.run(be.complete(CompletionRequest("rq", [{"role": "user", "content": p}], p)))
            assert r.cost_usd <= cm.max_cost(name, 0, None) + 1e-15
            charged.append((name, r.cost_usd))
    assert max(c for n, c in charged if n == "a") == pytest.approx(0.3)


def test_from_config_on_the_routerbench_pool(data_dir):
    from banditrouter.data import load_dataset

    pool = ["claude-instant-v1", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"]
    cfg = load_config({"models": [{"name": m, "replay": {"split": "test"}} for m in pool]})
    cm = CostModel.from_config(cfg)
    log = load_dataset("routerbench", "test")
    for m in pool:
        k = log.models.index(m)
        served = [log.costs[i, k] for i in range(len(log)) if log.responses[i][k] is not None and np.isfinite(log.costs[i, k])]
        assert cm.max_cost(m, 0, None) == pytest.approx(max(served))
    assert cm.max_cost("router", 0, None) == pytest.approx(max(cm.max_cost(m, 0, None) for m in pool))


def test_input_token_bound_never_undercounts_a_byte_level_bpe_and_chars_over_4_does():
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()  # a small vocabulary: close to one token per byte, the worst case
    tok.train_from_iterator(["hello world, the router routes"] * 20, vocab_size=300, min_frequency=1, show_progress=False)
    texts = [
        "hello world",
        "漢字のテキストを数えるとバイト数に近いトークンになる",
        "🙂" * 40,
        "def f(x):\n    return {k: v for k, v in x.items() if v}\n" * 5,
        "",
    ]
    undercounted = 0
    for text in texts:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
        true_count = sum(len(tok.encode(m["content"]).ids) for m in messages)
        assert true_count + 2 * MESSAGE_OVERHEAD_TOKENS <= input_token_bound(messages)
        undercounted += sum(estimate_tokens(m["content"]) for m in messages) < true_count
    assert undercounted >= 2  # the chars/4 estimate is not a bound (CJK, emoji)


def test_input_token_bound_counts_text_parts_names_and_tool_calls():
    from deployments.gateway.cost import NON_TEXT_PART_TOKENS

    parts = [{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]}]
    image = len('{"type": "image_url", "image_url": {"url": "x"}}') + NON_TEXT_PART_TOKENS
    assert input_token_bound(parts) == REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS + 4 + image + len('{"role": "user"}')
    lone = [{"role": "user", "content": "\ud800 hi"}]  # a lone surrogate still counts (3 bytes), no exception
    assert input_token_bound(lone) == REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS + 6 + len('{"role": "user"}')
    tool = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}]
    assert input_token_bound(tool) > REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS + 40


def test_a_cost_model_without_prices_or_bounds_is_refused():
    with pytest.raises(ValueError, match="neither token prices"):
        CostModel({"x": ModelPrice("x")}, 10)


def test_the_input_bound_counts_tools_formats_and_non_text_parts():
    """Upstreams bill tool definitions, response formats and images as input: a request with tiny text but
    ~100 KB of tools or 50 image parts must not reserve as if it were tiny (a budget bypass otherwise)."""
    from deployments.gateway.cost import NON_TEXT_PART_TOKENS, input_token_bound

    msgs = [{"role": "user", "content": "hi"}]
    base = input_token_bound(msgs)
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 1000}} for i in range(100)]
    assert input_token_bound(msgs, {"tools": tools}) >= base + 100 * 1000
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": "y" * 5000}}}
    assert input_token_bound(msgs, {"response_format": fmt}) >= base + 5000
    images = [{"type": "image_url", "image_url": {"url": "https://e.x/a.png"}}] * 50
    with_images = [{"role": "user", "content": [{"type": "text", "text": "hi"}, *images]}]
    assert input_token_bound(with_images) >= base + 50 * NON_TEXT_PART_TOKENS
    assert input_token_bound(msgs, {"n": 3}) == base  # fields not billed as input add nothing
