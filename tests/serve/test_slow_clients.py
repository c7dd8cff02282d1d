"""Slow clients: deadlines for receiving a request, the per-client cap, and ``max_connections``
counting only connections that have sent a request. Short deadlines keep each test to seconds."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import httpx
import pytest
from tests.serve.guarded import (
    HEAD,
    connect,
    exchange,
    keep_sending,
    read_until_closed,
    responses,
    start,
)

from tinygpt.serve.connection import LINGER_BYTES, LINGER_S
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
    assert not s.watch.receiving
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


def test_a_client_still_sending_after_its_408_reads_the_answer(guarded):
    # the server answers while the client waits, then the client's bytes arrive: closed at
    # once, the socket answers them with a reset and the client loses its 408
    s = guarded()
    for i in range(4):
        data = keep_sending(s.port, f"127.0.3.{1 + i}", HEAD, FAST.header_timeout + 0.2)
        assert error_of(data) == (408, "request_timeout")
    assert s.watch.totals["header"] == 4


def test_a_client_sending_at_once_over_the_cap_reads_its_429(guarded):
    s = guarded(dataclasses.replace(FAST, header_timeout=5.0))
    held = [connect(s.port, "127.0.3.9") for _ in range(FAST.max_client_connections)]
    time.sleep(0.1)
    for _ in range(4):
        data = keep_sending(s.port, "127.0.3.9", HEAD, 0.2)
        assert error_of(data) == (429, "too_many_connections")
    for sock in held:
        sock.close()


def test_lingering_after_an_answer_is_bounded(guarded):
    s = guarded()
    silent = connect(s.port, "127.0.3.20")  # reads its 408, then neither sends nor closes
    assert error_of(read_until_closed(silent, 8.0)) == (408, "request_timeout")
    answered = time.monotonic()
    endless = connect(s.port, "127.0.3.21")  # never stops sending
    endless.sendall(HEAD)
    time.sleep(FAST.header_timeout + 0.1)
    endless.settimeout(0.05)
    sent, lived = 0, time.monotonic()
    while time.monotonic() - lived < 3 * LINGER_S:
        try:
            sent += endless.send(b"X" * 65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    lived = time.monotonic() - lived
    assert lived < LINGER_S + 1.0  # cut by the byte budget or the time limit
    assert sent < LINGER_BYTES + (8 << 20)  # (what the two kernels' buffers hold beyond it)
    time.sleep(max(0.0, answered + LINGER_S + 0.5 - time.monotonic()))
    assert not s.watch.lingering  # the silent one was closed after LINGER_S
    for sock in (silent, endless):
        sock.close()


def test_lingering_connections_are_bounded(guarded):
    s = guarded(dataclasses.replace(FAST, header_timeout=5.0, max_client_connections=1,
                                    max_receiving_connections=1))
    held = connect(s.port, "127.0.3.30")
    time.sleep(0.1)
    refused = [connect(s.port, "127.0.3.30") for _ in range(3)]  # none of them closes its side
    answers = [error_of(read_until_closed(sock, 3.0)) for sock in refused]
    assert answers == [(429, "too_many_connections")] * 3  # each got its answer
    assert len(s.watch.lingering) == 1  # one lingers; beyond the cap, closed at once
    for sock in [held, *refused]:
        sock.close()


def test_connections_still_sending_are_bounded_from_all_addresses(guarded):
    s = guarded(dataclasses.replace(FAST, header_timeout=5.0, max_receiving_connections=3))
    slow = [connect(s.port, f"127.0.4.{1 + i}") for i in range(3)]
    for sock in slow:
        sock.sendall(HEAD)
        time.sleep(0.05)  # (so that their order is known)
    body = {"model": "tiny", "prompt": "To", "max_tokens": 2}
    assert httpx.post(f"{s.url}/v1/completions", json=body).status_code == 200
    # the honest request's connection made room: the one that had been sending longest went
    assert error_of(read_until_closed(slow[0], 3.0)) == (503, "too_many_connections")
    assert s.watch.totals["room"] == 1 and len(s.watch.receiving) == 2
    for sock in slow:
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
                {"max_client_connections": 0}, {"max_receiving_connections": 0}):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            ServeLimits(**bad)
    assert ServeLimits(max_connections=10).max_client_connections == 10  # never above the total
    s = guarded()
    limits = s.app.state.tinygpt.limits
    listed = httpx.get(f"{s.url}/v1/models").json()
    got = listed["data"][0]["tinygpt"]["limits"]
    names = ("header_timeout", "body_timeout", "max_client_connections",
             "max_receiving_connections")
    assert {k: got[k] for k in names} == {k: getattr(limits, k) for k in names}
