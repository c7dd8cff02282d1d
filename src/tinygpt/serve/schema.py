"""The API's published schema: the OpenAPI document served at ``/openapi.json``.

The routes read their bodies themselves (to answer every problem in the OpenAI error shape), so
FastAPI cannot see what they take or give. This module says it: the request bodies are the very
pydantic models the routes check requests with (``protocol.CompletionRequest``,
``chat.ChatRequest``, ``protocol.AttentionRequest``), the answers are described by the models
below, and every error is ``ErrorResponse``. The request fields carry the values the server takes
(``ranges``: the sampling rules and this server's limits), so a client can check a request
before sending it. A route declares its own with ``body(...)`` and
``answers(...)``; ``openapi(app)`` builds the document with the request models' definitions in
its components. A test runs a property-based API tester against a live server with it.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from tinygpt.sampling import INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_TEMPERATURE
from tinygpt.serve.chat import ChatRequest
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.protocol import AttentionRequest, CompletionRequest

REQUESTS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatRequest, AttentionRequest)
REF = "#/components/schemas/{model}"


class Shape(BaseModel):
    """An answer's shape: exactly these fields (a field more is a schema violation)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Shape):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Shape):
    """Every error, whatever the status: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class Health(Shape):
    status: Literal["ok", "error"]
    error: ErrorDetail | None = None  # why the server cannot answer (with status "error")


class ModelDetails(Shape):
    kind: str
    num_params: int
    vocab_size: int
    block_size: int
    step: int | None
    val_loss: float | None
    limits: dict[str, float]  # the server's limits (``tinygpt serve --help``)


class ModelCard(Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    tinygpt: ModelDetails


class ModelList(Shape):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Shape):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first character of an echoed prompt
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Shape):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(Shape):
    """``POST /v1/completions`` unstreamed (each server-sent event of a stream has this shape,
    with ``finish_reason`` null until a choice ends and ``usage`` only in the last)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(Shape):
    role: Literal["assistant"]
    content: str
    refusal: None


class TopLogprob(Shape):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Shape):
    content: list[ChatTokenLogprob]
    refusal: None


class ChatChoice(Shape):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(Shape):
    """``POST /v1/chat/completions`` unstreamed (a stream's events are ``chat.completion.chunk``s
    with a ``delta`` in place of the ``message``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class AttentionResponse(Shape):
    object: Literal["tinygpt.attention"]
    model: str
    text: str
    tokens: list[str]
    causal: bool
    layers: list[int]
    heads: list[int]
    weights: list[list[list[list[float]]]]  # [layer][head][query] -> weights of the keys


STREAM = {"text/event-stream": {"schema": {"type": "string", "description":
          "server-sent events: 'data: {chunk}' lines, then 'data: [DONE]'"}}}
ERRORS = {  # what each status means on this server
    400: "the request is not valid (a message names the parameter), or the Host header is not "
         "allowed",
    401: "missing or wrong API key",
    404: "no such model",
    413: "the body is larger than --max-body-bytes",
    415: "the body is not application/json",
    429: "the server is busy: retry after Retry-After seconds",
    500: "a bug in the server",
    503: "the server is shutting down, or its worker stopped",
}


def body(model: type[BaseModel]) -> dict:
    """A route's ``openapi_extra``: its JSON request body is ``model``."""
    ref = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def answers(ok: type[BaseModel], *errors: int, stream: bool = False) -> dict:
    """A route's ``responses``: ``ok`` with 200 (or server-sent events, with ``stream``), and
    ``ErrorResponse`` with each of ``errors``."""
    out: dict = {200: {"model": ok, "description": "OK"}}
    if stream:
        out[200]["content"] = STREAM
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": ERRORS[status]}
    return out


def ranges(limits: ServeLimits) -> dict[str, dict]:
    """The values of each request field that this server takes (the rules of
    ``tinygpt.sampling`` and the server's limits), as JSON Schema keywords."""
    logprobs = {"minimum": 0, "maximum": MAX_LOGPROBS}
    tokens = {"minimum": 1, "maximum": limits.max_tokens}
    return {
        "temperature": {"minimum": 0, "maximum": MAX_TEMPERATURE},
        "top_p": {"exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"minimum": 0},
        "seed": {"minimum": INT64_MIN, "maximum": INT64_MAX},
        "n": {"minimum": 1, "maximum": limits.max_n},
        "max_tokens": tokens, "max_completion_tokens": tokens,
        "logprobs": logprobs, "top_logprobs": logprobs,
        "prompt": {"minLength": 1, "maxLength": limits.max_prompt_chars, "minItems": 1,
                   "maxItems": limits.max_n},
        "stop": {"minLength": 1, "maxLength": limits.max_stop_chars, "maxItems": limits.max_stop},
        "text": {"minLength": 1},
        "presence_penalty": {"enum": [0]}, "frequency_penalty": {"enum": [0]},
        "logit_bias": {"maxProperties": 0},
    }


def _narrow(schema: dict, words: dict) -> None:
    """Put the keywords of ``words`` that fit each branch of a field's schema into it."""
    for branch in schema.get("anyOf", [schema]):
        kind = branch.get("type")
        if kind == "array":
            branch.update({k: v for k, v in words.items() if k in ("minItems", "maxItems")})
            _narrow(branch.get("items", {}), words)
        elif kind == "string":
            branch.update({k: v for k, v in words.items() if k in ("minLength", "maxLength")})
        elif kind in ("integer", "number"):
            branch.update({k: v for k, v in words.items()
                           if k in ("minimum", "maximum", "exclusiveMinimum", "enum")})
        elif kind == "object":
            branch.update({k: v for k, v in words.items() if k == "maxProperties"})


def request_schema(model: type[BaseModel], limits: ServeLimits) -> dict:
    """The JSON Schema of a request model, with the values this server takes."""
    spec = model.model_json_schema(ref_template=REF)
    bounds = ranges(limits)
    for name, field in spec["properties"].items():
        if name in bounds and not (name == "logprobs" and model is ChatRequest):
            _narrow(field, bounds[name])
    return spec


def openapi(app: FastAPI) -> dict:
    """The OpenAPI document of ``app`` (built once): FastAPI's, with the request models'
    definitions added and FastAPI's own 422 removed (a body this server refuses is a 400)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description=app.description)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        limits = app.state.tinygpt.limits
        for model in REQUESTS:
            spec = request_schema(model, limits)
            schemas.update(spec.pop("$defs", {}))
            schemas[model.__name__] = spec
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = doc
    return app.openapi_schema
