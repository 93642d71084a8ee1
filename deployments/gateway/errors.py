"""The gateway's one error shape: every 4xx/5xx body is

    {"error": {"message": str, "type": str, "code": str | null, "request_id": str}}

with the same request id in the `x-request-id` header. Nothing else (upstream URLs, tracebacks, Ray's
wrapped-exception text) may reach a client.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


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
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.retry_after_s = retry_after_s


def error_response(request_id: str, e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "code": e.code, "request_id": request_id}}
    headers = {"x-request-id": request_id}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(-(-e.retry_after_s // 1))))  # RFC 9110 delay-seconds, rounded up
    return JSONResponse(body, status_code=e.status, headers=headers)
