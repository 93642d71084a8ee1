"""The OpenAI-compatible upstream backend against a local fake upstream (aiohttp on 127.0.0.1): token-priced
costs, streaming, sampling and passthrough fields forwarded, retries on 5xx only, retryable / client errors
marked, usage estimated (and flagged) when the upstream omits it."""

from __future__ import annotations

import asyncio
import json

import pytest

from banditrouter.config import OpenAIBackendConfig
from deployments.backends import BackendError, CompletionRequest, CompletionResult
from tests.conftest import free_port


async def _serve(handler):
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1"


def _backend(url: str, retries: int = 2):
    from deployments.backends.openai_upstream import OpenAIBackend

    return OpenAIBackend("m", OpenAIBackendConfig(base_url=url, max_retries=retries, timeout_s=10), 1.0, 3.0)


COMPLETION = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "four"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
}
REQ = CompletionRequest(request_id="r", messages=[{"role": "user", "content": "2+2?"}], prompt="2+2?", max_tokens=5)


def test_complete_prices_tokens_and_passes_sampling_fields():
    from aiohttp import web

    seen = []

    async def handler(request):
        seen.append(await request.json())
        return web.json_response(COMPLETION)

    async def main():
        runner, url = await _serve(handler)
        try:
            return await _backend(url).complete(REQ)
        finally:
            await runner.cleanup()

    r = asyncio.run(main())
    assert r.text == "four" and (r.input_tokens, r.output_tokens) == (10, 2)
    assert r.cost_usd == pytest.approx((10 * 1.0 + 2 * 3.0) / 1e6)
    assert r.info == {"backend": "openai", "finish_reason": "stop"}  # usage reported: not estimated
    assert seen[0]["max_tokens"] == 5 and "temperature" not in seen[0]


def test_stream_yields_text_then_priced_result():
    from aiohttp import web

    async def handler(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("fo", "ur"):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}  # fmt: skip
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        last = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}  # fmt: skip
        await resp.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def main():
        runner, url = await _serve(handler)
        try:
            return [item async for item in _backend(url).stream(REQ)]
        finally:
            await runner.cleanup()

    items = asyncio.run(main())
    assert items[:2] == ["fo", "ur"] and isinstance(items[-1], CompletionResult)
    assert items[-1].text == "four" and items[-1].cost_usd == pytest.approx(16e-6)


@pytest.mark.parametrize("status, calls", [(500, 3), (400, 1)])
def test_retries_only_on_5xx(status, calls):
    from aiohttp import web

    n = []

    async def handler(request):
        n.append(1)
        return web.json_response({"error": {"message": "nope"}}, status=status)

    async def main():
        runner, url = await _serve(handler)
        try:
            backend = _backend(url, retries=2)
            with pytest.raises(BackendError):
                await backend.complete(REQ)
            return backend
        finally:
            await runner.cleanup()

    backend = asyncio.run(main())
    assert len(n) == calls
    if status == 500:
        with pytest.raises(BackendError, match="failed its last call"):
            backend.check_health()


@pytest.mark.parametrize(
    "status, calls, retryable, client_error",
    [(500, 3, True, False), (503, 3, True, False), (400, 1, False, True), (401, 1, False, False), (429, 1, False, False)],
)
def test_backend_error_says_whether_it_is_retryable_and_names_no_url(status, calls, retryable, client_error):
    """5xx: retried (jittered), then a retryable BackendError (the router retries elsewhere, then falls back);
    4xx (429 included): one call, not retryable; 400/413/422 are the client's own request. The message
    reaches clients, so it names the model, never the upstream URL."""
    from aiohttp import web

    n = []

    async def handler(request):
        n.append(1)
        return web.json_response({"error": {"message": "nope"}}, status=status)

    async def main():
        runner, url = await _serve(handler)
        try:
            with pytest.raises(BackendError) as e:
                await _backend(url, retries=2).complete(REQ)
            return e.value, url
        finally:
            await runner.cleanup()

    err, url = asyncio.run(main())
    assert len(n) == calls
    assert (err.retryable, err.client_error, err.status) == (retryable, client_error, status)
    assert "127.0.0.1" not in str(err) and url not in str(err) and "'m'" in str(err)


def test_an_unreachable_upstream_is_a_retryable_error_without_its_url():
    port = free_port()  # a port nothing listens on
    with pytest.raises(BackendError) as e:
        asyncio.run(_backend(f"http://127.0.0.1:{port}/v1", retries=1).complete(REQ))
    assert e.value.retryable and str(port) not in str(e.value)


def _no_usage(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "usage"}


def test_missing_usage_is_estimated_and_flagged_never_free():
    from aiohttp import web

    async def handler(request):
        return web.json_response(_no_usage(COMPLETION))

    async def main():
        runner, url = await _serve(handler)
        try:
            return await _backend(url).complete(REQ)
        finally:
            await runner.cleanup()

    r = asyncio.run(main())
    assert r.info["usage_estimated"] is True
    assert (r.input_tokens, r.output_tokens) == (1, 1)  # "2+2?" and "four": 4 characters each
    assert r.cost_usd == pytest.approx((1 * 1.0 + 1 * 3.0) / 1e6) and r.cost_usd > 0


def test_a_stream_without_usage_is_estimated_and_flagged():
    from aiohttp import web

    async def handler(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "four four"}, "finish_reason": "stop"}]}  # fmt: skip
        await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def main():
        runner, url = await _serve(handler)
        try:
            return [item async for item in _backend(url).stream(REQ)]
        finally:
            await runner.cleanup()

    items = asyncio.run(main())
    final = items[-1]
    assert items[0] == "four four" and final.info["usage_estimated"] is True
    assert final.output_tokens == 2 and final.cost_usd > 0


def test_passthrough_fields_reach_the_upstream_and_tool_calls_come_back():
    from aiohttp import web

    from deployments.backends import CompletionRequest

    seen = []
    tool_call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}

    async def handler(request):
        seen.append(await request.json())
        choice = {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                  "finish_reason": "tool_calls"}  # fmt: skip
        return web.json_response({**COMPLETION, "choices": [choice, {**COMPLETION["choices"][0], "index": 1}]})

    passthrough = {
        "n": 2,
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
    }
    req = CompletionRequest(request_id="r", messages=REQ.messages, prompt="2+2?", passthrough=passthrough)

    async def main():
        runner, url = await _serve(handler)
        try:
            return await _backend(url).complete(req)
        finally:
            await runner.cleanup()

    r = asyncio.run(main())
    assert {k: seen[0][k] for k in passthrough} == passthrough
    assert r.info["tool_calls"][0]["function"]["name"] == "add" and r.info["finish_reason"] == "tool_calls"
    assert len(r.info["choices"]) == 2 and r.text == ""


def test_a_read_timeout_is_not_retried_and_is_a_504_not_a_fallback():
    """An upstream that takes the request and then says nothing within `timeout_s` may have billed it: no
    retry (it could bill again) and no fallback; the error carries status 504 (the ingress's timeout)."""
    from aiohttp import web

    from deployments.backends.openai_upstream import OpenAIBackend

    calls = []

    async def handler(request):
        calls.append(1)
        await asyncio.sleep(5)
        return web.json_response(COMPLETION)

    async def main():
        runner, url = await _serve(handler)
        try:
            b = OpenAIBackend("m", OpenAIBackendConfig(base_url=url, max_retries=2, timeout_s=0.3), 1.0, 3.0)
            with pytest.raises(BackendError) as err:
                await b.complete(REQ)
            return err.value
        finally:
            await runner.cleanup()

    e = asyncio.run(main())
    assert len(calls) == 1 and e.status == 504 and not e.retryable and "did not answer within" in str(e)
