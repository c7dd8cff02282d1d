"""Slow clients: deadlines for receiving a request, the per-client cap, and ``max_connections``
counting only connections that have sent a request. Short deadlines keep each test to seconds."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import httpx
import pytest
from tests.serve.guarded import HEAD, connect, exchange, read_until_closed, responses, start

from tinygpt.serve.options import ServeLimits

FAST = ServeLimits(header_timeout=0.5, body_timeout=1.0, max_client_connections=4,
                   max_connections=8)
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def guarded(checkpoint):
    started = []

    def make(limits: ServeLimits = FAST, **kwargs):
        s = start(checkpoint, limits, **kwargs)
        started.append(s)
        return s

    yield make
    for s in started:
        s.__exit__(None, None, None)


def trickle(sock, first: bytes, line: bytes, every: float = 0.1, limit_s: float = 8.0):
    """Send ``first``, then ``line`` every ``every`` s until the server closes the connection;
    returns (what it answered, seconds the connection lived)."""
    t0 = time.monotonic()
    sock.sendall(first)
    sock.settimeout(every)
    data = b""
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                break
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - t0


def error_of(data: bytes) -> tuple[int, str]:
    [(status, body)] = responses(data)
    return status, json.loads(body)["error"]["code"]


def test_trickled_headers_get_408_at_the_header_deadline(guarded):
    s = guarded()
    data, lived = trickle(connect(s.port), HEAD, b"X-Slow: 1\r\n")
    assert error_of(data) == (408, "request_timeout")
    assert 0.4 < lived < 3.0
    assert s.watch.totals["header"] == 1


def test_a_silent_connection_is_closed_at_the_header_deadline(guarded):
    s = guarded()
    sock = connect(s.port)
    t0 = time.monotonic()
    data = read_until_closed(sock, 8.0)
    assert error_of(data) == (408, "request_timeout")
    assert 0.4 < time.monotonic() - t0 < 3.0


def test_a_trickled_body_gets_408_at_the_body_deadline(guarded):
    s = guarded()
    head = HEAD + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    data, lived = trickle(connect(s.port), head, b" ")
    assert error_of(data) == (408, "request_timeout")
    assert 0.9 < lived < 4.0
    assert s.watch.totals["body"] == 1
    assert s.watch.receiving == 0
    r = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "To", "max_tokens": 2})
    assert r.status_code == 200  # the application saw the client leave and carries on


def test_a_long_streamed_answer_is_never_cut(guarded, engines, checkpoint):
    s = guarded(engine=engines["slow"](checkpoint.model, delay=0.05))
    body = {"model": "tiny", "prompt": "To", "max_tokens": 50, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert time.monotonic() - t0 > FAST.header_timeout + FAST.body_timeout  # outlived both
    assert events[-1] == "data: [DONE]" and len(events) > 2
    assert s.watch.totals == {}


def test_a_kept_alive_connection_has_a_header_deadline_for_its_next_request(guarded):
    s = guarded()
    sock = connect(s.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.8)  # longer than the header deadline: idle time between requests is not counted
    data, lived = trickle(sock, b"GET /health HTTP/1.1\r\n", b"X-Slow: 1\r\n")
    (first, _), (second, body) = responses(data)
    assert (first, second) == (200, 408)
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.4 < lived < 3.0


def test_one_address_cannot_take_all_the_connections(guarded):
    s = guarded()
    held = [connect(s.port, "127.0.0.2") for _ in range(FAST.max_client_connections)]
    time.sleep(0.1)
    refused = read_until_closed(connect(s.port, "127.0.0.2"), 3.0)
    assert error_of(refused) == (429, "too_many_connections")
    assert httpx.get(f"{s.url}/health").status_code == 200  # another address is served
    held.pop().close()
    time.sleep(0.1)
    again = connect(s.port, "127.0.0.2")
    assert exchange(again, HEALTH)[0] == 200
    assert s.watch.totals["cap"] == 1
    for sock in [*held, again]:
        sock.close()


def test_connections_still_sending_a_request_do_not_count_against_max_connections(guarded):
    s = guarded(dataclasses.replace(FAST, header_timeout=5.0))
    waiting = [connect(s.port, f"127.0.0.{2 + i // 4}") for i in range(FAST.max_connections)]
    for sock in waiting:
        sock.sendall(HEAD)
    time.sleep(0.1)
    body = {"model": "tiny", "prompt": "To", "max_tokens": 2}
    assert httpx.post(f"{s.url}/v1/completions", json=body).status_code == 200
    # connections that have sent a request still count: idle kept-alive ones fill the limit (as
    # in uvicorn, the connection that would make max_connections gets the 503)
    idle = [connect(s.port, f"127.0.1.{1 + i // 4}") for i in range(FAST.max_connections - 1)]
    for sock in idle:
        assert exchange(sock, HEALTH)[0] == 200
    assert httpx.get(f"{s.url}/health").status_code == 503
    for sock in waiting + idle:
        sock.close()


def test_slow_connections_are_logged_in_one_line(guarded):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("uvicorn.error")
    s = guarded(report_every=1.5)
    logger.addHandler(handler)
    try:
        socks = [connect(s.port, f"127.0.2.{1 + i // 4}") for i in range(6)]
        socks += [connect(s.port, "127.0.2.9") for _ in range(FAST.max_client_connections + 2)]
        for sock in socks:
            read_until_closed(sock, 5.0)
        time.sleep(1.6)
    finally:
        logger.removeHandler(handler)
    lines = [r for r in records if r.startswith("tinygpt serve:")]
    assert lines == ["tinygpt serve: in the last 1.5 s, connections closed: 10 missed the header "
                     "deadline (0.5 s); 2 were refused over the per-client cap (4)"]


def test_the_new_limits_are_checked_and_listed(guarded):
    for bad in ({"header_timeout": 0}, {"body_timeout": float("inf")}, {"header_timeout": True},
                {"max_client_connections": 0}):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            ServeLimits(**bad)
    assert ServeLimits(max_connections=10).max_client_connections == 10  # never above the total
    s = guarded()
    limits = s.app.state.tinygpt.limits
    listed = httpx.get(f"{s.url}/v1/models").json()
    got = listed["data"][0]["tinygpt"]["limits"]
    assert {k: got[k] for k in ("header_timeout", "body_timeout", "max_client_connections")} == {
        "header_timeout": limits.header_timeout, "body_timeout": limits.body_timeout,
        "max_client_connections": limits.max_client_connections}
