"""HTTP strictness below the application: what could smuggle a request is refused with a 400
and a closed connection; pipelined requests are answered in order."""

from __future__ import annotations

import json

import pytest
from tests.serve.guarded import connect, keep_sending, read_until_closed, responses, start

from tinygpt.serve.connection import head_problem
from tinygpt.serve.options import ServeLimits

BODY = b'{"model": "tiny", "prompt": "To", "max_tokens": 2}'
POST = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def strict_server(checkpoint):
    s = start(checkpoint, ServeLimits(header_timeout=5.0, body_timeout=5.0))
    yield s
    s.__exit__(None, None, None)


def send(server, data: bytes) -> list[tuple[int, bytes]]:
    sock = connect(server.port)
    sock.sendall(data)
    try:
        return responses(read_until_closed(sock, 8.0), closed=True)
    finally:
        sock.close()


CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
REFUSED = {
    "content-length then transfer-encoding":
        POST + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(CHUNKED) + CHUNKED,
    "transfer-encoding then content-length":
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + CHUNKED,
    "folded header (space)": POST + b"Content-Length: %d\r\nX-Note: one\r\n two\r\n\r\n" % len(BODY)
        + BODY,
    "folded header (tab)": POST + b"X-Note: one\r\n\ttwo\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        + BODY,
    "two different content-lengths": POST + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    "transfer-encoding other than chunked": POST + b"Transfer-Encoding: gzip\r\n\r\n" + BODY,
}


@pytest.mark.parametrize("name", REFUSED)
def test_ambiguous_requests_get_400_and_a_closed_connection(strict_server, name):
    # the connection is closed after the 400: a request pipelined behind is never answered
    answers = send(strict_server, REFUSED[name] + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert [status for status, _ in answers] == [400]


def test_a_client_still_sending_after_its_400_reads_the_answer(strict_server):
    # the 400 comes as soon as the head is read, while the rest of a large request is still
    # arriving: closed at once, the socket would answer it with a reset that eats the 400
    head = REFUSED["content-length then transfer-encoding"]
    for _ in range(4):
        answers = responses(keep_sending(strict_server.port, "127.0.0.1", head, 0.2), closed=True)
        assert [status for status, _ in answers] == [400]
        assert "Content-Length together with Transfer-Encoding" in json.loads(
            answers[0][1])["error"]["message"]


@pytest.mark.parametrize("body", [BODY, None])
def test_a_plain_or_chunked_body_is_still_served(strict_server, body):
    if body is None:
        request = POST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + CHUNKED
    else:
        request = POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    [(status, answer)] = send(strict_server, request)
    assert status == 200 and json.loads(answer)["object"] == "text_completion"


def test_pipelined_requests_are_answered_in_order(strict_server):
    requests = [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        POST + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    ]
    answers = send(strict_server, b"".join(requests))
    assert [status for status, _ in answers] == [200, 200, 200, 404, 200]
    bodies = [json.loads(body) for _, body in answers]
    assert bodies[0] == bodies[4] == {"status": "ok"}
    assert bodies[1]["object"] == "text_completion"
    assert bodies[2]["object"] == "list"
    assert bodies[3]["error"]["code"] == "not_found"


def test_head_problem():
    assert head_problem(b"GET / HTTP/1.1\r\nA: 1\r\n B\r\n\r\n") is not None
    assert head_problem(b"GET / HTTP/1.1\nA: 1\n\tB\n\n") is not None
    assert head_problem(b"GET / HTTP/1.1\r\nA: 1\r\n B") is None  # not complete: judged later
    assert head_problem(b"GET / HTTP/1.1\r\nA: 1 B\r\n\r\n body\r\n") is None  # body is not head
