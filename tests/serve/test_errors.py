"""Every failure in the OpenAI error shape: the exception handlers on a bare app, and the statuses
of the scheduler's refusals and failures."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402

from tinygpt.serve.errors import add_error_handlers, error_response, refused, server_error  # noqa: E402
from tinygpt.serve.options import ServeLimits  # noqa: E402
from tinygpt.serve.protocol import ApiError  # noqa: E402
from tinygpt.serve.scheduler import QueueFull, SchedulerClosed, WorkerFailed  # noqa: E402


def test_error_response_carries_status_headers_and_body():
    r = error_response(ApiError(401, "no", "p", "c", headers={"X-A": "1"}))
    assert r.status_code == 401 and r.headers["x-a"] == "1"
    assert json.loads(r.body) == {"error": {"message": "no", "type": "invalid_request_error",
                                            "param": "p", "code": "c"}}


@pytest.mark.parametrize("error, status, code", [
    (WorkerFailed(ValueError()), 503, "worker_failed"),
    (SchedulerClosed("stopping"), 503, "shutting_down"),
    (RuntimeError("secret detail"), 500, "internal_error"),
])
def test_server_errors(error, status, code):
    e = server_error(error)
    assert (e.status, e.code, e.type) == (status, code, "server_error")
    assert "secret detail" not in e.message  # a bug's message stays in the log


def test_a_full_queue_is_a_429_with_retry_after():
    e = refused(QueueFull(7), ServeLimits(max_queue=3))
    assert (e.status, e.code, e.type) == (429, "queue_full", "rate_limit_error")
    assert e.headers == {"Retry-After": "7"} and "3 requests" in e.message
    assert refused(SchedulerClosed("x"), ServeLimits()).status == 503


def bare_app() -> FastAPI:
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/api")
    async def api_error():
        raise ApiError(418, "short and stout", "pot", "teapot")

    @app.get("/bug")
    async def bug():
        raise KeyError("hidden")

    @app.get("/items/{n}")
    async def item(n: int):
        return {"n": n}

    return app


def get(path: str, method: str = "GET") -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(bare_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            return await c.request(method, path)

    return asyncio.run(main())


@pytest.mark.parametrize("path, method, status, code", [
    ("/api", "GET", 418, "teapot"),
    ("/nothing/%0A/here", "GET", 404, "not_found"),
    ("/api", "POST", 405, "method_not_allowed"),
    ("/items/x", "GET", 400, "invalid_value"),
    ("/bug", "GET", 500, "internal_error"),
])
def test_handlers_answer_in_the_openai_shape(path, method, status, code):
    r = get(path, method)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and "\n" not in err["message"]
    if status == 500:
        assert "hidden" not in err["message"]
