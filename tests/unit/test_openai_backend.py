"""The OpenAI-compatible upstream backend against a local fake upstream (aiohttp on 127.0.0.1): token-priced
costs, streaming, sampling fields passed through, retries on 5xx only."""

from __future__ import annotations

import asyncio
import json

import pytest

from banditrouter.config import OpenAIBackendConfig
from deployments.backends import BackendError, CompletionRequest, CompletionResult


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
    assert r.cost_usd == pytest.approx((10 * 1.0 + 2 * 3.0) / 1e6) and r.info == {"backend": "openai"}
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
