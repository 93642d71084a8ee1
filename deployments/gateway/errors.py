"""The gateway's one error shape: every 4xx/5xx body is

    {"error": {"message": str, "type": str, "code": str | null, "request_id": str}}

with the same request id in the `x-request-id` header. Nothing else (upstream URLs, tracebacks, Ray's
wrapped-exception text) may reach a client: details go to the server log, under the request id.

`install(app, bind)` makes it hold for every answer of a FastAPI app, not only the routes' own:
- `ApiError` raised anywhere (a route, a FastAPI dependency such as the auth ones), the framework's own
  errors (404 unknown path, 405 wrong method, 422 bad query or path parameter) and `GatewayMiddleware`'s
  413 answer in this shape;
- an exception nothing handled answers 500 `internal_error` (the traceback only in the log);
- the request id is the client's `x-request-id` when it is short (`gateway.limits.max_request_id_chars`) and
  made of token characters (letters, digits, `._:/+=@-`), else a fresh one: an over-long or odd id is never
  echoed.

Serve's HTTP proxy runs its own request-id middleware (Ray 2.60, `ray.serve._private.http_util.
RequestIdMiddleware`): it takes the client's `x-request-id` as the id (or makes one) and *appends* it to every
response's headers, whatever the replica answered. A replica alone therefore cannot stop the proxy echoing an
over-long client id. `ProxyRequestIdMiddleware` does it in the proxy, where Serve's documented hook
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` installs it outside Serve's middleware: it replaces a bad id
before Serve reads it and leaves one `x-request-id` per response. The variable must be in the environment of
the process that starts Ray (the proxy actor inherits it): `PROXY_CALLBACK_ENV=PROXY_CALLBACK`. Without it the
replica still puts the fresh id in the body and its own header, and the proxy adds the client's as a second
header. With `server.proxy: haproxy` (Serve's direct ingress) the ingress replica's own HTTP server calls the
same hook, so the middleware runs there (tests/integration/test_haproxy.py).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

log = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
DEFAULT_MAX_REQUEST_ID_CHARS = 128
MAX_REQUEST_ID_ENV = "BANDITROUTER_MAX_REQUEST_ID_CHARS"
"""The proxy middleware's limit (it has no config); set it where Ray starts to match gateway.limits."""
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "deployments.gateway.errors.proxy_middlewares"
_ID_CHARS = re.compile(r"[A-Za-z0-9._:/+=@-]+")


class ApiError(Exception):
    """An error answer. `retry_after_s` (429, 503) becomes a `Retry-After` header in whole seconds (at least 1)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        *,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})


def error_response(request_id: str, e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "code": e.code, "request_id": request_id}}
    headers = {**e.headers, REQUEST_ID_HEADER: request_id}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(-(-e.retry_after_s // 1))))  # RFC 9110 delay-seconds, rounded up
    return JSONResponse(body, status_code=e.status, headers=headers)


# ---------------------------------------------------------------------------------------------------------
# the request id
# ---------------------------------------------------------------------------------------------------------
def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def clean_request_id(value: str | None, max_chars: int) -> str | None:
    """`value` when it is a usable id (at most `max_chars` token characters), else None."""
    if value and len(value) <= max_chars and _ID_CHARS.fullmatch(value):
        return value
    return None


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def request_id(request) -> str:
    """The request's id: the one `GatewayMiddleware` settled on, else (no middleware) a clean client id or a
    fresh one, remembered for the rest of the request."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = clean_request_id(request.headers.get(REQUEST_ID_HEADER), DEFAULT_MAX_REQUEST_ID_CHARS) or new_request_id()
        request.state.request_id = rid
    return rid


# ---------------------------------------------------------------------------------------------------------
# exception handlers: the framework's errors in the one shape
# ---------------------------------------------------------------------------------------------------------
async def _api_error(request, exc: ApiError) -> JSONResponse:
    return error_response(request_id(request), exc)


async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    method, path = request.method, request.url.path[:200]
    if exc.status_code == 404:
        e = ApiError(404, f"no endpoint {method} {path}", "not_found_error", "not_found")
    elif exc.status_code == 405:
        e = ApiError(405, f"method {method} is not allowed on {path}", code="method_not_allowed")
    elif exc.status_code == 413:
        e = ApiError(413, "request body too large", code="body_too_large")
    else:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        e = ApiError(exc.status_code, detail[:200], "invalid_request_error" if exc.status_code < 500 else "server_error")
    e.headers.update({k: v for k, v in (exc.headers or {}).items() if k.lower() in ("allow", "www-authenticate")})
    return error_response(request_id(request), e)


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(request_id(request), ApiError(422, "; ".join(parts)[:1000] or "invalid request"))


# ---------------------------------------------------------------------------------------------------------
# the replica's middleware: request id, body size, the 500 of last resort, response metrics
# ---------------------------------------------------------------------------------------------------------
INTERNAL_ERROR = "internal error; the server log has the details under this request id"


class GatewayMiddleware:
    """Pure ASGI middleware inside the FastAPI app. Reads `app.state.limits` (gateway.limits) and
    `app.state.metrics` (a GatewayMetrics or None); `bind(app)` is called on the first request when
    `app.state.gateway_ready` is not set yet, to fill them in (Serve copies the app into the replica, so the
    deployment cannot reach it from its constructor)."""

    def __init__(self, app, bind: Callable[[Any], None] | None = None):
        self.app = app
        self.bind = bind

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        if not getattr(state, "gateway_ready", False) and self.bind is not None:
            self.bind(scope["app"])
        limits = getattr(state, "limits", None)
        metrics = getattr(state, "metrics", None)
        max_id = limits.max_request_id_chars if limits is not None else DEFAULT_MAX_REQUEST_ID_CHARS
        sent_id = _header(scope, REQUEST_ID_HEADER.encode())
        rid = clean_request_id(sent_id, max_id) or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        # Serve's proxy appends the id it read (the client's) to the answer: ours goes in only when it differs
        own_header = rid != sent_id
        status: list[int] = []

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                headers = MutableHeaders(scope=message)
                del headers[REQUEST_ID_HEADER]
                if own_header:
                    headers[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            receive_body = await self._bounded_body(scope, receive, limits)
            if isinstance(receive_body, ApiError):
                await error_response(rid, receive_body)(scope, receive, send_with_id)
                return
            await self.app(scope, receive_body, send_with_id)
        except Exception:
            log.exception("request %s: unhandled error", rid)
            if not status:
                await error_response(rid, ApiError(500, INTERNAL_ERROR, "server_error", "internal_error"))(
                    scope, receive, send_with_id
                )
        finally:
            if metrics is not None and status:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                try:
                    metrics.response(route, status[0])
                except Exception:  # metrics never fail an answer
                    log.debug("gateway metrics failed", exc_info=True)

    @staticmethod
    async def _bounded_body(scope, receive, limits):
        """A `receive` replaying the body, read whole but never past `max_body_bytes` (Content-Length first,
        then the bytes themselves, for chunked uploads), or the ApiError to answer (413, 400)."""
        if limits is None or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        limit = limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return ApiError(400, "Content-Length must be a number of bytes", code="bad_content_length")
            if int(declared) > limit:
                return ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}", code="body_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                chunks = None
                first = message
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return ApiError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay


def install(app, bind: Callable[[Any], None] | None = None) -> None:
    """The one error shape for every answer of `app` (call before Serve copies the app: at import)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(GatewayMiddleware, bind=bind)


# ---------------------------------------------------------------------------------------------------------
# in Serve's HTTP proxy (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)
# ---------------------------------------------------------------------------------------------------------
class ProxyRequestIdMiddleware:
    """Outside Serve's own request-id middleware: replaces an over-long or odd client `x-request-id` with a
    fresh id before Serve reads it, and leaves one `x-request-id` header per answer (the first: the
    replica's when it set one)."""

    def __init__(self, app, max_chars: int | None = None):
        self.app = app
        self.max_chars = max_chars or int(os.environ.get(MAX_REQUEST_ID_ENV, DEFAULT_MAX_REQUEST_ID_CHARS))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = MutableHeaders(scope=scope)
        sent = headers.getlist(REQUEST_ID_HEADER)
        if sent and (len(sent) > 1 or clean_request_id(sent[0], self.max_chars) is None):
            headers[REQUEST_ID_HEADER] = new_request_id()

        async def send_one_id(message):
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                ids = out.getlist(REQUEST_ID_HEADER)
                if len(ids) > 1:
                    out[REQUEST_ID_HEADER] = ids[0]
            await send(message)

        await self.app(scope, receive, send_one_id)


def proxy_environment(limits=None) -> dict[str, str]:
    """The variables the process that starts Ray needs for the proxy middleware (the proxy actor inherits them)."""
    max_chars = limits.max_request_id_chars if limits is not None else DEFAULT_MAX_REQUEST_ID_CHARS
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK, MAX_REQUEST_ID_ENV: str(max_chars)}


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback: `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.gateway.errors.proxy_middlewares`."""
    return [Middleware(ProxyRequestIdMiddleware)]
