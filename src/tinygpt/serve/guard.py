"""The request guard: what every request passes before a route sees it.

``Guard`` is ASGI middleware around the whole app: the Host header check (against DNS
rebinding: a web page on another site must not reach a server on loopback), the API key
(Bearer, or HTTP Basic with the key as password for a browser) and ``nosniff`` on every
answer. ``json_body`` is the request body's gate: JSON only, at most ``--max-body-bytes``.
Each refusal is a 4xx in the OpenAI error shape; none of them reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Iterable
from contextlib import suppress

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinygpt.serve.errors import error_response
from tinygpt.serve.protocol import ApiError, parse_json

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
MAX_LENGTH_DIGITS = 18  # a longer Content-Length is larger than any limit (and than int64)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800 to \udfff in a JSON string


def host_name(host: str) -> str:
    """The name part of a Host header value, lower-cased (``[::1]:8000`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def key_matches(header: str | None, key: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``key``, compared in constant time.

    ``Bearer KEY``, or ``Basic base64(user:KEY)`` with any user name (a browser's login).
    """
    scheme, _, value = (header or "").partition(" ")
    given = b""
    if scheme.lower() == "bearer":
        given = value.strip().encode("utf-8", "replace")
    elif scheme.lower() == "basic":
        with suppress(binascii.Error, ValueError):
            given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
    return hmac.compare_digest(given, key)


def header_values(scope: Scope, name: bytes) -> list[str]:
    """Every value of the header ``name`` (lower-case) in an HTTP scope."""
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


class Guard:
    """ASGI middleware: Host header check, API key (not for ``/health``), ``nosniff``.

    ``allowed_hosts=None`` turns the Host check off, ``api_key=None`` the key check.
    """

    def __init__(self, app: ASGIApp, api_key: str | None,
                 allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.key = api_key.encode("utf-8") if api_key is not None else None
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def refusal(self, scope: Scope) -> Response | None:
        """The 400 or 401 for a request that may not pass; None when it may."""
        if self.allowed is not None:
            hosts = header_values(scope, b"host")
            if len(hosts) != 1 or host_name(hosts[0]) not in self.allowed:
                shown = hosts[0][:100] if hosts else ""
                return error_response(ApiError(
                    400, f"Host header {shown!r} is not allowed: this server listens on "
                    f"loopback (see --allowed-host)", code="invalid_host"))
        if self.key is not None and scope["path"] != "/health":
            auth = header_values(scope, b"authorization")
            if not key_matches(auth[0] if len(auth) == 1 else None, self.key):
                return error_response(ApiError(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Basic realm="tinygpt", charset="UTF-8"'}))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response = self.refusal(scope)
        if response is not None:
            return await response(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _check_headers(request: Request, limit: int) -> None:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype[:100]!r}",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is None:
        return
    length = length.strip()
    if not (length.isascii() and length.isdigit()):
        raise ApiError(400, "invalid Content-Length header", code="invalid_request")
    if len(length) > MAX_LENGTH_DIGITS or int(length) > limit:
        raise _too_big(limit)


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (see "
                    f"--max-body-bytes)", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request, at most ``limit`` bytes (415, 400 or 413 otherwise).

    A body without Content-Length (chunked) is counted as it arrives and cut at the limit.
    """
    _check_headers(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def check_text(body: bytes, obj: dict) -> None:
    """Refuse a JSON object holding a string that is not Unicode text.

    UTF-8 cannot spell a lone surrogate, but a JSON escape can (``"\\ud800"``); such a string
    would fail later in a tokenizer or in the UTF-8 of the answer, so it is a 400 here.
    """
    if not SURROGATE_ESCAPE.search(body):  # the only way to write one in a UTF-8 body
        return
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("unicode_escape").decode("ascii")
        raise ApiError(400, f"the request body is not valid JSON text: it holds the unpaired "
                       f"surrogate {bad[:20]} (a string must be Unicode text)",
                       code="invalid_json") from None
    except (RecursionError, ValueError):
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply",
                       code="invalid_json") from None


async def json_body(request: Request, limit: int) -> dict | None:
    """The request's JSON object (``ApiError`` if it is not one); None if the client left."""
    try:
        body = await read_body(request, limit)
    except ClientDisconnect:
        return None
    obj = parse_json(body)
    check_text(body, obj)
    return obj
