"""``create_app`` assembles: the state, the guard, the error handlers, the routes, the playground.

Every route of the server is listed here: a route lost (or added) in the assembly fails.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.serve.conftest import MODEL_ID, _build_app  # noqa: E402

from tinygpt.serve.app import LOOPBACK_NAMES, ModelInfo, create_app  # noqa: E402
from tinygpt.serve.options import ServeLimits  # noqa: E402
from tinygpt.serve.playground import Playground  # noqa: E402
from tinygpt.serve.state import AppState  # noqa: E402

ROUTES = [  # (method, path, body): every route of the server, answering 200
    ("GET", "/health", None), ("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL_ID}", None),
    ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": "To", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": MODEL_ID, "max_tokens": 1, "messages": [
        {"role": "user", "name": "T", "content": "To"}]}),  # (this model knows few capitals)
    ("POST", "/v1/tinygpt/attention", {"model": MODEL_ID, "text": "To"}),
    ("GET", "/", None), ("GET", "/static/app.js", None), ("GET", "/static/style.css", None),
    ("GET", "/openapi.json", None),
]
NOT_ROUTES = [("GET", "/docs"), ("GET", "/redoc"),
              ("GET", "/static/index.html"), ("POST", "/v1/chat")]


def test_every_route_is_there_and_no_other(checkpoint):
    app = _build_app(checkpoint, chat_assistant="T")

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                found = [(await c.request(m, p, json=body)).status_code for m, p, body in ROUTES]
                wrong_method = [(await c.request("DELETE", p)).status_code for _, p, _ in ROUTES]
                missing = [(await c.request(m, p)).status_code for m, p in NOT_ROUTES]
                return found, wrong_method, missing

    found, wrong_method, missing = asyncio.run(main())
    assert found == [200] * len(ROUTES)
    assert wrong_method == [405] * len(ROUTES)
    assert missing == [404] * len(NOT_ROUTES)


def test_the_state_is_built_and_the_worker_runs_with_the_server(checkpoint):
    from tinygpt.engine import Engine

    info = ModelInfo(MODEL_ID, "gpt", 1, checkpoint.tokenizer.vocab_size, 16, 0)
    app = create_app(Engine(checkpoint.model), checkpoint.tokenizer, info)
    state = app.state.tinygpt
    assert isinstance(state, AppState) and state.info is info
    assert state.limits == ServeLimits()  # the defaults when none are given
    assert isinstance(app.state.playground, Playground)
    assert b"<html" in app.state.playground.page.lower()
    assert not hasattr(state, "scheduler")  # no thread before the server starts

    async def lifetime():
        async with app.router.lifespan_context(app):
            assert state.scheduler.alive
        return state.scheduler.alive

    assert asyncio.run(lifetime()) is False  # stopped with the server


def test_the_guard_is_in_front(checkpoint):
    app = _build_app(checkpoint, api_key="k")

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                return [await c.get("/v1/models"),
                        await c.get("/v1/models", headers={"Authorization": "Bearer k"}),
                        await c.get("/health", headers={"Host": "evil.example"}),
                        await c.get("/health")]

    no_key, key, evil, health = asyncio.run(main())
    assert no_key.status_code == 401 and key.status_code == 200
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "invalid_host"
    assert health.status_code == 200
    assert health.headers["x-content-type-options"] == "nosniff"
    assert "localhost" in LOOPBACK_NAMES
