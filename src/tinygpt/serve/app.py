"""The HTTP application, assembled: state, guard, error handlers, routes and playground.

Its rooms::

    guard.py       what every request passes first: Host header, API key, body size and type
    errors.py      every failure as an OpenAI error body (the app's exception handlers)
    state.py       AppState: what the routes read (model, tokenizer, limits, scheduler)
    routes.py      /health, /v1/models, /v1/completions, /v1/chat/completions, /v1/tinygpt/attention
    chat.py        the chat template (a play script) and the chat shape of requests and answers
    stream.py      the worker thread -> request bridge; JSON answers and server-sent events
    playground.py  GET / and /static/*: the playground page
    schema.py      the OpenAPI document served at /openapi.json
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tinygpt import __version__
from tinygpt.engine import Engine
from tinygpt.serve import playground, routes, schema
from tinygpt.serve.chat import ChatTemplate
from tinygpt.serve.errors import add_error_handlers
from tinygpt.serve.guard import LOOPBACK_NAMES, Guard
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.state import AppState, ModelInfo
from tinygpt.tokenizer import Tokenizer

__all__ = ["LOOPBACK_NAMES", "ModelInfo", "create_app"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the worker thread with the server; stop it (and its requests) with the server."""
    state: AppState = app.state.tinygpt
    state.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        await asyncio.to_thread(state.scheduler.close)


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    info: ModelInfo,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES,
    chat_assistant: str = "assistant",
) -> FastAPI:
    """The application. ``allowed_hosts=None`` turns the Host header check off (for servers that
    listen on other addresses than loopback); ``chat_assistant`` is the speaker of the replies in
    the chat template (``tinygpt.serve.chat``; a ``ValueError`` if it is not a name)."""
    app = FastAPI(title="tinygpt", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", lifespan=lifespan,
                  description="An OpenAI-compatible API to one tinygpt model.")
    app.openapi = lambda: schema.openapi(app)
    app.state.tinygpt = AppState(engine, tokenizer, info, limits or ServeLimits(),
                                 ChatTemplate(chat_assistant))
    app.state.playground = playground.Playground.load()
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    add_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(playground.router, include_in_schema=False)
    return app
