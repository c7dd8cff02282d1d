"""The API's routes; each reads the app's ``AppState`` (model, tokenizer, limits, scheduler).

::

    GET  /health                liveness (never needs the API key)
    GET  /v1/models             the one model served, with tinygpt details under "tinygpt"
    GET  /v1/models/{id}
    POST /v1/completions        OpenAI Completions API (+ top_k, logprobs); streams server-sent events
    POST /v1/chat/completions   OpenAI Chat Completions API, through the chat template (``chat``)
    POST /v1/tinygpt/attention  the attention weights of every layer and head for a text

What each route takes and gives is declared for the OpenAPI document (``schema``), which
``/openapi.json`` serves. A route checks the request (``protocol``), hands the model's work to
the scheduler's worker and waits for it (``stream``); it never runs the model on the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tinygpt.models.attention_maps import attention_maps
from tinygpt.serve.chat import ChatDelivery, ChatRequest, check_chat
from tinygpt.serve.errors import refused, server_error
from tinygpt.serve.guard import json_body
from tinygpt.serve.protocol import (
    ApiError,
    AttentionQuery,
    AttentionRequest,
    Completion,
    CompletionRequest,
    check_attention,
    check_completion,
    quoted,
)
from tinygpt.serve.scheduler import QueueFull, SchedulerClosed
from tinygpt.serve.schema import (
    AttentionResponse,
    ChatCompletionResponse,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
    answers,
    body,
)
from tinygpt.serve.state import AppState, app_state
from tinygpt.serve.stream import Delivery, next_item

router = APIRouter()
State = Annotated[AppState, Depends(app_state)]


POST_ERRORS = (400, 401, 404, 413, 415, 429, 500, 503)


@router.get("/health", response_model=None, responses={
    200: {"model": Health, "description": "the worker runs"},
    503: {"model": Health, "description": "the server is shutting down, or its worker stopped"}})
async def health(state: State) -> JSONResponse:
    scheduler = state.scheduler
    if scheduler.alive:
        return JSONResponse({"status": "ok"})
    error = scheduler.failure or SchedulerClosed("the server is shutting down")
    return JSONResponse({"status": "error", **server_error(error).body()}, 503)


@router.get("/v1/models", response_model=None, responses=answers(ModelList, 400, 401))
async def list_models(state: State) -> dict:
    return {"object": "list", "data": [state.model_card()]}


@router.get("/v1/models/{model_id:path}", response_model=None,
            responses=answers(ModelCard, 400, 401, 404))
async def get_model(model_id: str, state: State) -> dict:
    if model_id != state.info.id:
        raise ApiError(404, f"the model {quoted(model_id)} does not exist", "model",
                       "model_not_found")
    return state.model_card()


@router.post("/v1/completions", openapi_extra=body(CompletionRequest),
             responses=answers(CompletionResponse, *POST_ERRORS, stream=True))
async def completions(request: Request, state: State) -> Response:
    obj = await json_body(request, state.limits.max_body_bytes)
    if obj is None:  # the client left while sending
        return Response(status_code=400)
    spec = check_completion(obj, state.info.id, state.tokenizer, state.limits)
    return await deliver(request, state, spec, Delivery, "cmpl-", "text_completion")


@router.post("/v1/chat/completions", openapi_extra=body(ChatRequest),
             responses=answers(ChatCompletionResponse, *POST_ERRORS, stream=True))
async def chat_completions(request: Request, state: State) -> Response:
    obj = await json_body(request, state.limits.max_body_bytes)
    if obj is None:  # the client left while sending
        return Response(status_code=400)
    spec = check_chat(obj, state.info.id, state.tokenizer, state.limits, state.chat)
    kind = "chat.completion.chunk" if spec.stream else "chat.completion"
    return await deliver(request, state, spec, ChatDelivery, "chatcmpl-", kind)


async def deliver(request: Request, state: AppState, spec: Completion, shape: type[Delivery],
                  id_prefix: str, kind: str) -> Response:
    """Hand a checked request to the scheduler; its answer as JSON, or streamed if asked."""
    queue: asyncio.Queue = asyncio.Queue()
    try:
        job = state.scheduler.submit(spec.prompt_ids, spec.n, spec.params, state.limits.timeout,
                                     state.mailbox.sink(queue))
    except (QueueFull, SchedulerClosed) as e:
        raise refused(e, state.limits) from None
    meta = {"id": id_prefix + secrets.token_hex(12), "object": kind,
            "created": int(time.time()), "model": state.info.id}
    delivery = shape(job, spec, queue, meta, state.scheduler)
    if spec.stream:
        return StreamingResponse(
            delivery.events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await delivery.response(request)


@router.post("/v1/tinygpt/attention", openapi_extra=body(AttentionRequest),
             responses=answers(AttentionResponse, *POST_ERRORS))
async def attention(request: Request, state: State) -> Response:
    obj = await json_body(request, state.limits.max_body_bytes)
    if obj is None:  # the client left while sending
        return Response(status_code=400)
    model, config = state.engine.model, state.engine.model.config
    query = check_attention(obj, state.info.id, state.tokenizer, getattr(config, "n_layer", 0),
                            getattr(config, "n_head", 0), state.info.block_size)
    idx = torch.tensor(query.ids, dtype=torch.long, device=state.engine.device)  # (T,)
    queue: asyncio.Queue = asyncio.Queue()
    try:  # the model runs in the worker thread only, between two decode steps
        state.scheduler.call(lambda: attention_maps(model, idx).cpu(), state.mailbox.sink(queue))
    except (QueueFull, SchedulerClosed) as e:
        raise refused(e, state.limits) from None
    maps = await next_item(queue, state.scheduler)
    if isinstance(maps, BaseException):
        raise server_error(maps)
    causal = getattr(config, "causal", True)
    return JSONResponse(await asyncio.to_thread(attention_body, maps, query, state.info.id,
                                                causal))


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
