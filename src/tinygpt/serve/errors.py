"""How every failure reaches the client: the OpenAI error shape, always.

``{"error": {"message", "type", "param", "code"}}`` with a 4xx for what the client sent and a
5xx only for what went wrong in the server. This module holds the app's exception handlers
(``add_error_handlers``) and the statuses of the scheduler's refusals and failures.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygpt.serve.options import ServeLimits
from tinygpt.serve.protocol import ApiError, quoted
from tinygpt.serve.scheduler import QueueFull, SchedulerClosed, WorkerFailed

log = logging.getLogger("tinygpt.serve")


def error_response(error: ApiError) -> JSONResponse:
    """The response that carries ``error``: its status, its headers, the OpenAI body."""
    return JSONResponse(error.body(), error.status, error.headers or None)


def server_error(e: BaseException) -> ApiError:
    """The 5xx for a failure on the server's side: a dead worker, a shutdown, or a bug."""
    if isinstance(e, WorkerFailed):
        return ApiError(503, str(e), code="worker_failed", type="server_error")
    if isinstance(e, SchedulerClosed):
        return ApiError(503, str(e), code="shutting_down", type="server_error")
    return ApiError(500, f"generation failed: {type(e).__name__}", code="internal_error",
                    type="server_error")


def refused(e: QueueFull | SchedulerClosed, limits: ServeLimits) -> ApiError:
    """The answer to a request the scheduler would not take: 429 when busy, else 503."""
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy ({limits.max_queue} requests are waiting); "
                        f"retry after {e.retry_after} s", code="queue_full",
                        type="rate_limit_error", headers={"Retry-After": str(e.retry_after)})
    return server_error(e)


async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in the OpenAI shape, on one line."""
    if exc.status_code == 404:
        message = f"no such route: {request.method} {quoted(request.url.path, 200)}"
    elif exc.status_code == 405:
        message = (f"method {quoted(request.method)} is not allowed on "
                   f"{quoted(request.url.path, 200)}")
    else:
        message = str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(ApiError(exc.status_code, message, None, code).body(),
                        exc.status_code, getattr(exc, "headers", None))


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
    return JSONResponse(ApiError(400, f"invalid request: {err.get('msg', 'bad input')}",
                                 loc, "invalid_value").body(), 400)


async def on_crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(server_error(exc).body(), 500)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route raises in the OpenAI error shape."""
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_crash)
