"""The HTTP application: OpenAI-compatible routes, the playground page, and the guards around them.

Routes::

    GET  /health            liveness (never needs the API key)
    GET  /v1/models         the one model served, with tinygpt details under "tinygpt"
    GET  /v1/models/{id}
    POST /v1/completions    OpenAI Completions API (+ top_k, logprobs); streams server-sent events
    POST /v1/tinygpt/attention  the attention weights of every layer and head for a text
    GET  /                  the playground (static HTML/JS/CSS shipped in the package)

The model runs in the scheduler's worker thread; request handlers only wait on an asyncio queue,
so the event loop stays free while tokens are computed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tinygpt.engine import Engine
from tinygpt.models.attention_maps import attention_maps
from tinygpt.serve.logprobs import as_openai, entries_within
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.protocol import (
    ApiError,
    AttentionQuery,
    Completion,
    check_attention,
    check_completion,
    parse_json,
    quoted,
)
from tinygpt.serve.scheduler import (
    Event,
    Job,
    QueueFull,
    Scheduler,
    SchedulerClosed,
    WorkerFailed,
)
from tinygpt.tokenizer import CharTokenizer

log = logging.getLogger("tinygpt.serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WATCHDOG_SECONDS = 1.0  # how often a waiting request checks that the worker is still alive
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass
class ModelInfo:
    """What /v1/models and the playground say about the model."""

    id: str
    kind: str
    num_params: int
    vocab_size: int
    block_size: int
    created: int
    step: int | None = None
    val_loss: float | None = None


def host_name(host: str) -> str:
    """The name part of a Host header value, lower-cased (``[::1]:8000`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _error(status: int, message: str, code: str, headers: dict | None = None,
           type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, None, code, type).body(), status, headers)


class Guard:
    """ASGI middleware: Host header check (DNS rebinding), API key, and ``nosniff``."""

    def __init__(self, app, api_key: str | None, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.key = api_key.encode("utf-8") if api_key is not None else None
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        given = b""
        if scheme.lower() == "bearer":
            given = value.strip().encode("utf-8", "replace")
        elif scheme.lower() == "basic":  # a browser login: any user name, the key as password
            with suppress(binascii.Error, ValueError):
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        return hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed is not None:
            hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
            if len(hosts) != 1 or host_name(hosts[0]) not in self.allowed:
                shown = hosts[0][:100] if hosts else ""
                response = _error(400, f"Host header {shown!r} is not allowed: this server "
                                  f"listens on loopback (see --allowed-host)", "invalid_host")
                return await response(scope, receive, send)
        if self.key is not None and scope["path"] != "/health":
            auth = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
            if not self.authorized(auth[0] if len(auth) == 1 else None):
                response = _error(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    "invalid_api_key",
                    {"WWW-Authenticate": 'Basic realm="tinygpt", charset="UTF-8"'},
                )
                return await response(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def read_body(request: Request, limit: int) -> bytes:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype[:100]!r}",
                       code="unsupported_media_type")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes (see "
                       f"--max-body-bytes)", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        if int(length) > limit:
            raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> dict | None:
    """The request's JSON object (``ApiError`` if it is not one); None if the client left."""
    try:
        return parse_json(await read_body(request, limit))
    except ClientDisconnect:
        return None


class Mailbox:
    """Carries items from the worker thread to requests' asyncio queues.

    Waking the event loop costs a system call; one decode step produces items for many requests,
    so they are collected and the loop is woken once to deliver them all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.scheduled = False

    def sink(self, queue: asyncio.Queue) -> Callable:
        def put(item) -> None:  # runs in the worker thread
            with self.lock:
                self.items.append((queue, item))
                if self.scheduled:
                    return
                self.scheduled = True
            with suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
                self.loop.call_soon_threadsafe(self.deliver)

        return put

    def deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _server_error(e: BaseException) -> ApiError:
    if isinstance(e, WorkerFailed):
        return ApiError(503, str(e), code="worker_failed", type="server_error")
    if isinstance(e, SchedulerClosed):
        return ApiError(503, str(e), code="shutting_down", type="server_error")
    return ApiError(500, f"generation failed: {type(e).__name__}", code="internal_error",
                    type="server_error")


def create_app(
    engine: Engine,
    tokenizer: CharTokenizer,
    info: ModelInfo,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES,
) -> FastAPI:
    """The application. ``allowed_hosts=None`` turns the Host header check off (for servers that
    listen on other addresses than loopback)."""
    limits = limits or ServeLimits()
    static = resources.files("tinygpt.serve") / "static"
    page = (static / "index.html").read_bytes()
    assets = {name: (static / name).read_bytes() for name in STATIC_FILES}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        app.state.scheduler = Scheduler(engine, tokenizer, limits.max_batch, limits.max_queue)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.scheduler.close)

    app = FastAPI(title="tinygpt", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.state.limits = limits
    app.state.info = info

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
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

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, f"invalid request: {err.get('msg', 'bad input')}",
                                     loc, "invalid_value").body(), 400)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(_server_error(exc).body(), 500)

    def model_card() -> dict:
        details = asdict(info)
        details.pop("id")
        details.pop("created")
        details["limits"] = asdict(limits)
        return {"id": info.id, "object": "model", "created": info.created, "owned_by": "tinygpt",
                "tinygpt": details}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        scheduler: Scheduler = request.app.state.scheduler
        if scheduler.alive:
            return JSONResponse({"status": "ok"})
        error = scheduler.failure or SchedulerClosed("the server is shutting down")
        return JSONResponse({"status": "error", **_server_error(error).body()}, 503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != info.id:
            raise ApiError(404, f"the model {quoted(model_id)} does not exist", "model",
                           "model_not_found")
        return model_card()

    @app.get("/")
    async def playground() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def asset(name: str) -> Response:
        if name not in assets:
            raise StarletteHTTPException(404)
        return Response(assets[name], media_type=STATIC_FILES[name] + "; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        obj = await json_body(request, limits.max_body_bytes)
        if obj is None:
            return Response(status_code=400)
        spec = check_completion(obj, info.id, tokenizer, limits)
        queue: asyncio.Queue = asyncio.Queue()
        scheduler: Scheduler = request.app.state.scheduler
        try:
            job = scheduler.submit(spec.prompt_ids, spec.n, spec.params, limits.timeout,
                                   request.app.state.mailbox.sink(queue))
        except (QueueFull, SchedulerClosed) as e:
            raise _refused(e, limits) from None
        meta = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
                "created": int(time.time()), "model": info.id}
        if spec.stream:
            return StreamingResponse(
                _stream(job, spec, queue, meta, scheduler), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _respond(request, job, spec, queue, meta)

    @app.post("/v1/tinygpt/attention")
    async def attention(request: Request) -> Response:
        obj = await json_body(request, limits.max_body_bytes)
        if obj is None:
            return Response(status_code=400)
        config = engine.model.config
        query = check_attention(obj, info.id, tokenizer,
                                getattr(config, "n_layer", 0), getattr(config, "n_head", 0),
                                info.block_size)
        idx = torch.tensor(query.ids, dtype=torch.long, device=engine.device)  # (T,)
        queue: asyncio.Queue = asyncio.Queue()
        scheduler: Scheduler = request.app.state.scheduler
        try:  # the model runs in the worker thread only, between two decode steps
            scheduler.call(lambda: attention_maps(engine.model, idx).cpu(),
                           request.app.state.mailbox.sink(queue))
        except (QueueFull, SchedulerClosed) as e:
            raise _refused(e, limits) from None
        maps = await _next(queue, scheduler)
        if isinstance(maps, BaseException):
            raise _server_error(maps)
        causal = getattr(config, "causal", True)
        return JSONResponse(await asyncio.to_thread(attention_body, maps, query, info.id, causal))

    return app


def attention_body(maps: torch.Tensor, query: AttentionQuery, model_id: str,
                   causal: bool) -> dict:
    """The answer of the attention route from the maps (n_layer, n_head, T, T).

    ``weights[i][j][q]`` is the row of query position ``q`` in layer ``layers[i]``, head
    ``heads[j]``: how much that character attends to each character, rounded to 4 decimals.
    A causal model's row ``q`` stops at ``q`` (the later weights are all 0), which halves it.
    """
    picked = maps[query.layers][:, query.heads].double().round(decimals=4)  # (l, h, T, T)
    weights = [[[row[: q + 1] if causal else row for q, row in enumerate(head)]
                for head in layer] for layer in picked.tolist()]
    return {"object": "tinygpt.attention", "model": model_id, "text": query.text,
            "tokens": query.tokens, "causal": causal, "layers": query.layers,
            "heads": query.heads, "weights": weights}


def _refused(e: QueueFull | SchedulerClosed, limits: ServeLimits) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy ({limits.max_queue} requests are waiting); "
                        f"retry after {e.retry_after} s", code="queue_full",
                        type="rate_limit_error", headers={"Retry-After": str(e.retry_after)})
    return _server_error(e)


def _usage(job: Job, spec: Completion) -> dict:
    prompt = sum(len(ids) for ids in spec.prompt_ids)
    completion = sum(c.num_tokens for c in job.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _next(queue: asyncio.Queue, scheduler: Scheduler):
    """The next item from the worker; the worker's failure if it died without a word."""
    getter = asyncio.ensure_future(queue.get())  # one getter throughout: no item is lost
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=WATCHDOG_SECONDS)
            if done:
                return getter.result()
            if not scheduler.alive and queue.empty():
                return scheduler.failure or SchedulerClosed("the server is shutting down")
    finally:
        getter.cancel()  # no-op once it has its item


async def _collect(job: Job, queue: asyncio.Queue, scheduler: Scheduler) -> BaseException | None:
    """Wait until every choice has finished; returns the error if generation failed."""
    left = len(job.choices)
    while left:
        item = await _next(queue, scheduler)
        if isinstance(item, BaseException):
            return item
        left -= sum(1 for event in item if event.finish)
    return None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(request: Request, job: Job, spec: Completion, queue: asyncio.Queue,
                   meta: dict) -> Response:
    collect = asyncio.ensure_future(_collect(job, queue, request.app.state.scheduler))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client left (or the server is stopping): stop decoding
            collect.cancel()
            job.cancel()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)
    error = collect.result()
    if error is not None:
        raise _server_error(error)
    choices = []
    for c in job.choices:
        prompt = spec.prompts[c.index // spec.n]
        logprobs = None
        if spec.logprobs is not None:
            entries = (c.prompt_entries or []) + entries_within(c.entries, len(c.text))
            logprobs = as_openai(entries, 0 if spec.echo else len(prompt))
        choices.append({"text": (prompt if spec.echo else "") + c.text, "index": c.index,
                        "logprobs": logprobs, "finish_reason": c.finish_reason})
    return JSONResponse({**meta, "choices": choices, "usage": _usage(job, spec)})


def _merge(first: Event | None, then: Event) -> Event:
    """One event for two consecutive events of the same choice."""
    if first is None:
        return then
    logprobs = None if then.logprobs is None else (first.logprobs or []) + then.logprobs
    return Event(then.index, first.text + then.text, then.finish or first.finish, logprobs)


async def _stream(job: Job, spec: Completion, queue: asyncio.Queue, meta: dict,
                  scheduler: Scheduler):
    """Server-sent events: one ``data: {chunk}`` per choice with new text, then ``[DONE]``.

    With ``logprobs``, each chunk carries the entries of its own characters. An echoed prompt
    is sent first; with ``logprobs`` it comes from the worker, which scores it.
    """
    # where each choice's next character is, counted from the start of its prompt
    offset = [0 if spec.echo else len(spec.prompts[c.index // spec.n]) for c in job.choices]

    def chunk(index: int, text: str, finish: str | None, entries: list | None) -> str:
        logprobs = None
        if entries is not None:
            logprobs = as_openai(entries, offset[index])
            offset[index] += sum(e.chars for e in entries)
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**meta, "choices": [choice]})

    try:
        if spec.echo and spec.logprobs is None:
            for c in job.choices:
                yield chunk(c.index, spec.prompts[c.index // spec.n], None, None)
        left = len(job.choices)
        while left:
            items = [await _next(queue, scheduler), *_drain(queue)]  # merge what piled up
            merged: dict[int, Event] = {}
            error = None
            for item in items:
                if isinstance(item, BaseException):
                    error = item
                    break
                for event in item:
                    merged[event.index] = _merge(merged.get(event.index), event)
            for event in merged.values():
                yield chunk(event.index, event.text, event.finish, event.logprobs)
                left -= event.finish is not None
            if error is not None:
                yield _sse(_server_error(error).body())
                return
        if spec.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(job, spec)})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op when finished; stops decoding when the client went away
