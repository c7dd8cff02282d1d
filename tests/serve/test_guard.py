"""The request guard on its own: ``Guard`` called as an ASGI app, the body gate on a bare request.

No server and no model: each case builds the ASGI scope a server would, so the guard's answers
are checked before any route could see the request.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

pytest.importorskip("fastapi")

from starlette.requests import ClientDisconnect, Request  # noqa: E402

from tinygpt.serve import guard  # noqa: E402
from tinygpt.serve.guard import (  # noqa: E402
    LOOPBACK_NAMES,
    Guard,
    host_name,
    json_body,
    key_matches,
    read_body,
)
from tinygpt.serve.protocol import ApiError  # noqa: E402


def scope(path: str = "/v1/models", headers: list[tuple[bytes, bytes]] | None = None,
          method: str = "GET") -> dict:
    if headers is None:
        headers = [(b"host", b"localhost:8000")]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000)}


class Inner:
    """The app behind the guard: answers 200 "inner" and counts the requests that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"inner"})


def call(app, scope: dict) -> tuple[int, dict[bytes, bytes], bytes]:
    """Run one request through ``app``: (status, headers, body)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


def error_of(body: bytes) -> dict:
    payload = json.loads(body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in payload["error"]["message"]
    return payload["error"]


@pytest.mark.parametrize("value, name", [
    ("localhost", "localhost"), ("LocalHost:8000", "localhost"), ("127.0.0.1:1", "127.0.0.1"),
    ("[::1]", "[::1]"), ("[::1]:8000", "[::1]"), ("  my.box:80 ", "my.box"),
    ("::1", "::1"),  # an unbracketed IPv6 address has no port to strip
    ("[::1", "[::1"), ("", ""),
])
def test_host_name(value, name):
    assert host_name(value) == name


def test_a_loopback_host_passes_and_gets_nosniff():
    inner = Inner()
    status, headers, body = call(Guard(inner, None, LOOPBACK_NAMES), scope())
    assert (status, body, inner.calls) == (200, b"inner", 1)
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"content-type"] == b"text/plain"  # the app's own headers are kept


@pytest.mark.parametrize("hosts", [
    [(b"host", b"evil.example")], [(b"host", b"localhost.evil.example:8000")], [],
    [(b"host", b"localhost"), (b"host", b"localhost")],  # two Host headers: refused
    [(b"host", b"loc\xe9lhost")],
])
def test_other_hosts_are_refused_before_the_app(hosts):
    inner = Inner()
    status, headers, body = call(Guard(inner, None, LOOPBACK_NAMES), scope(headers=hosts))
    assert status == 400 and inner.calls == 0
    assert headers[b"content-type"] == b"application/json"
    err = error_of(body)
    assert err["code"] == "invalid_host" and err["type"] == "invalid_request_error"


def test_no_allowed_hosts_turns_the_check_off():
    inner = Inner()
    status, _, _ = call(Guard(inner, None, None), scope(headers=[(b"host", b"any.where")]))
    assert status == 200 and inner.calls == 1


def test_the_key_is_needed_everywhere_but_health():
    inner = Inner()
    app = Guard(inner, "s3cret", LOOPBACK_NAMES)
    status, headers, body = call(app, scope("/v1/models"))
    assert status == 401 and inner.calls == 0
    assert headers[b"www-authenticate"].startswith(b"Basic ")
    assert error_of(body)["code"] == "invalid_api_key"
    assert call(app, scope("/health"))[0] == 200
    bearer = [(b"host", b"localhost"), (b"authorization", b"Bearer s3cret")]
    assert call(app, scope("/", headers=bearer))[0] == 200
    twice = [*bearer, (b"authorization", b"Bearer s3cret")]
    assert call(app, scope("/", headers=twice))[0] == 401  # which one would count?
    assert inner.calls == 2


def test_the_host_is_checked_before_the_key():
    status, _, body = call(Guard(Inner(), "k", LOOPBACK_NAMES),
                           scope(headers=[(b"host", b"evil.example")]))
    assert status == 400 and error_of(body)["code"] == "invalid_host"


def test_other_scopes_pass_untouched():
    inner = Inner()
    asyncio.run(Guard(inner, "k", LOOPBACK_NAMES)({"type": "lifespan"}, None, None))
    assert inner.calls == 1


def basic(user_and_key: bytes) -> str:
    return "Basic " + base64.b64encode(user_and_key).decode()


@pytest.mark.parametrize("header, ok", [
    ("Bearer k3y", True), ("bearer  k3y ", True), (basic(b"me:k3y"), True), (basic(b":k3y"), True),
    (basic(b"k3y:"), False), (basic(b"me:k3y:x"), False), ("Bearer k3", False),
    ("Bearer k3yy", False), ("Token k3y", False), ("k3y", False), ("Bearer", False), ("", False),
    (None, False), ("Basic !!!", False), ("Basic \xe9\xff", False), ("Bearer k3y\xe9", False),
])
def test_key_matches(header, ok):
    assert key_matches(header, b"k3y") is ok


def test_the_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = guard.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    assert not key_matches("Bearer abd", b"abc")
    assert key_matches(basic(b"u:abc"), b"abc")
    assert calls == [(b"abd", b"abc"), (b"abc", b"abc")]


# -- the body gate ---------------------------------------------------------------------------


def request(chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None,
            disconnect: bool = False) -> Request:
    """A POST whose body arrives in ``chunks`` (then, with ``disconnect``, the client leaves)."""
    if headers is None:
        headers = [(b"content-type", b"application/json")]
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.disconnect"} if disconnect
                    else {"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return messages.pop(0)

    return Request(scope("/v1/completions", headers, "POST"), receive)


def refusal(req: Request, limit: int = 100) -> ApiError:
    with pytest.raises(ApiError) as e:
        asyncio.run(json_body(req, limit))
    assert "\n" not in e.value.message
    return e.value


def test_a_json_body_is_read():
    req = request([b'{"model": ', b'"tiny"}'])
    assert asyncio.run(json_body(req, 100)) == {"model": "tiny"}
    exact = b'{"a": "' + b"x" * 91 + b'"}'
    assert len(exact) == 100
    assert asyncio.run(read_body(request([exact]), 100)) == exact


@pytest.mark.parametrize("ctype", [None, b"text/plain", b"application/jsonx", b"multipart/form"])
def test_only_json_is_read(ctype):
    headers = [] if ctype is None else [(b"content-type", ctype)]
    err = refusal(request([b"{}"], headers))
    assert (err.status, err.code) == (415, "unsupported_media_type")


def test_content_type_parameters_are_fine():
    headers = [(b"content-type", b"Application/JSON; charset=utf-8")]
    assert asyncio.run(json_body(request([b"{}"], headers), 100)) == {}


@pytest.mark.parametrize("length, status", [
    (b"101", 413), (b"9" * 5000, 413),  # beyond the limit (and beyond int() of a string)
    (b"\xb2", 400), (b"-1", 400), (b"1,2", 400), (b"0x10", 400), (b"", 400),
    (b"\xd9\xa3", 400),  # an Arabic-Indic digit: isdigit() but not HTTP
])
def test_content_length_is_checked_before_reading(length, status):
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    err = refusal(request([b"{}"], headers))
    assert err.status == status
    assert err.code == ("request_too_large" if status == 413 else "invalid_request")


def test_a_body_without_length_is_cut_at_the_limit():
    err = refusal(request([b'{"user": "', b"x" * 60, b"x" * 60, b'"}']))
    assert (err.status, err.code) == (413, "request_too_large")
    assert "100 bytes" in err.message


def test_a_client_that_leaves_mid_body_gets_none():
    assert asyncio.run(json_body(request([b'{"mo'], disconnect=True), 100)) is None
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(request([b'{"mo'], disconnect=True), 100))


@pytest.mark.parametrize("body", [b"", b"[1]", b'{"a": NaN}', b'{"a": \xff}', b'{"a":'])
def test_a_body_that_is_not_a_json_object_is_a_400(body):
    err = refusal(request([body]))
    assert (err.status, err.code) == (400, "invalid_json")


@pytest.mark.parametrize("body", [
    rb'{"prompt": "a\ud800"}', rb'{"prompt": ["ok", "\udfff b"]}', rb'{"\udc00": 1}',
    rb'{"stop": ["\ud83d"]}',  # half of an emoji
])
def test_lone_surrogates_are_a_400(body):
    err = refusal(request([body]))
    assert (err.status, err.code) == (400, "invalid_json")
    assert "surrogate" in err.message


@pytest.mark.parametrize("body, value", [
    (rb'{"prompt": "\ud83d\ude00"}', "😀"),  # a surrogate pair is one character
    (rb'{"prompt": "\\ud800"}', "\\ud800"),  # an escaped backslash, then text
    ('{"prompt": "é😀"}'.encode(), "é😀"),
])
def test_whole_characters_pass(body, value):
    assert asyncio.run(json_body(request([body]), 100)) == {"prompt": value}
