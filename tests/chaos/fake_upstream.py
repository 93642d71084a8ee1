"""A fake OpenAI-compatible upstream for the chaos tests, with failure modes switchable per model.

Run as its own process (`python tests/chaos/fake_upstream.py --port 0`; it prints `PORT <n>` once it
listens on 127.0.0.1), so the test process's client threads and this server do not share one GIL.

    POST /v1/chat/completions   answers as the mode set for the request's `model` says:
        ok           an answer with `usage` after `latency_s` (streams too: SSE chunks, then a usage chunk)
        omit-usage   the same answer without `usage`
        500 | 400    an OpenAI-shaped JSON error with that status
        hang         sleeps `hang_s` (default 600) before answering: a backend that stopped answering
        close        drops the connection without a response (a connection error to the client)
        break        streams two chunks, then drops the connection (a stream that fails midway)
    POST /_control/mode    {"model": {"mode": ..., "latency_s": ..., "hang_s": ...}, ...}  (merged)
    POST /_control/reset   every model back to ok (latency 0) and every count to zero
    GET  /_control/calls   {"calls": {model: n}, "by_text": {model: {text: n}}, "active": {model: n},
                            "disconnects": n}

Calls are counted per model and per (model, latest user text), when a request arrives, so a test can say
exactly how many upstream calls one client request caused (its text is unique).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, defaultdict

from aiohttp import web

DEFAULT = {"mode": "ok", "latency_s": 0.0, "hang_s": 600.0}


class Upstream:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.modes: dict[str, dict] = {}
        self.calls: Counter = Counter()
        self.by_text: dict[str, Counter] = defaultdict(Counter)
        self.active: Counter = Counter()
        self.disconnects = 0

    def mode(self, model: str) -> dict:
        return {**DEFAULT, **self.modes.get(model, {})}

    # -- control ----------------------------------------------------------------------------------------------
    async def set_mode(self, request: web.Request) -> web.Response:
        for model, m in (await request.json()).items():
            self.modes[model] = {**self.modes.get(model, {}), **m}
        return web.json_response({"modes": self.modes})

    async def do_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def get_calls(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "calls": dict(self.calls),
                "by_text": {m: dict(c) for m, c in self.by_text.items()},
                "active": dict(self.active),
                "disconnects": self.disconnects,
            }
        )

    # -- the OpenAI endpoint ------------------------------------------------------------------------------------
    @staticmethod
    def _text(body: dict) -> str:
        for m in reversed(body.get("messages") or []):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                return c or ""
        return ""

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return web.json_response({"error": {"message": message, "type": kind, "code": None}}, status=status)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model, text = body.get("model", ""), self._text(body)
        self.calls[model] += 1
        self.by_text[model][text] += 1
        self.active[model] += 1
        try:
            return await self._answer(request, body, model, text)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        finally:
            self.active[model] -= 1

    async def _answer(self, request: web.Request, body: dict, model: str, text: str) -> web.StreamResponse:
        m = self.mode(model)
        mode = m["mode"]
        if mode == "hang":
            await asyncio.sleep(float(m["hang_s"]))
        elif m["latency_s"]:
            await asyncio.sleep(float(m["latency_s"]))
        if mode in ("500", "400"):
            return self._error(int(mode), f"fake upstream: mode {mode} for {model}")
        if mode == "close":
            request.transport.close()  # no status line: the client sees the connection drop
            raise ConnectionResetError("fake upstream closed the connection")
        answer = f"{model} answers: {text[:40]}"
        usage = {"prompt_tokens": max(1, len(text) // 4), "completion_tokens": 8, "total_tokens": max(1, len(text) // 4) + 8}
        if body.get("stream"):
            return await self._stream(request, body, model, answer, usage, broken=mode == "break")
        return web.json_response(
            {
                "id": f"fake-{time.time_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                **({"usage": usage} if mode != "omit-usage" else {}),
            }
        )

    async def _stream(self, request, body, model, answer, usage, broken: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict, finish=None, **extra) -> bytes:
            c = {"id": "fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
            c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
            return f"data: {json.dumps({**c, **extra})}\n\n".encode()

        words = answer.split(" ")
        for i, w in enumerate(words):
            await resp.write(chunk({"content": w + (" " if i < len(words) - 1 else "")}))
            if broken and i == 1:
                request.transport.close()
                raise ConnectionResetError("fake upstream broke the stream")
        await resp.write(chunk({}, "stop"))
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        if include_usage and self.mode(model)["mode"] != "omit-usage":
            await resp.write(chunk(None, usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def make_app() -> web.Application:
    up = Upstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", up.chat)
    app.router.add_post("/_control/mode", up.set_mode)
    app.router.add_post("/_control/reset", up.do_reset)
    app.router.add_get("/_control/calls", up.get_calls)
    return app


async def _main(port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(_main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
