"""One HTTP/1.1 connection of ``tinygpt serve``: uvicorn's h11 protocol, with what it lacks.

uvicorn has no deadline for *receiving* a request (its keep-alive timer covers only the idle
time between requests, and any byte resets it), and ASGI middleware runs only once the headers
are parsed; so a client that trickles its headers or body holds a connection as long as it likes.
``GuardedH11Protocol`` adds, below the application:

* deadlines for receiving a request: ``header_timeout`` seconds for the request line and headers
  (from the connection's opening, or from the first byte of a later request on it) and then
  ``body_timeout`` seconds for the body. Both are disarmed once the request is in, so an answer
  streamed for minutes is never cut. A connection that misses one gets a ``408`` if no answer has
  started yet, and is closed;
* a cap of ``max_client_connections`` open connections per client address (``429`` and close
  beyond), and uvicorn's ``max_connections`` counting only connections that have sent a request:
  those still sending theirs cannot lock honest requests out;
* strictness (``StrictConnection``): a request with both ``Content-Length`` and
  ``Transfer-Encoding``, or with an obsolete folded header line, is answered ``400`` and closed.

Connections closed for being slow or refused over the cap are counted in the log every
``report_every`` seconds (one line, not one per socket): ``Watch``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections import Counter
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from tinygpt.serve.options import ServeLimits
from tinygpt.serve.protocol import ApiError

log = logging.getLogger("uvicorn.error")

HEAD_END = re.compile(rb"\n\r?\n")
LINE_END = re.compile(rb"\r?\n")


def head_problem(buffered: bytes) -> str | None:
    """Why the request head at the start of ``buffered`` must be refused; None when it may pass
    (or is not complete yet: it is judged once its blank line has arrived)."""
    end = HEAD_END.search(buffered)
    if end is None:
        return None
    lines = LINE_END.split(buffered[: end.start()])
    if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
        return "obsolete line folding in the request headers"
    return None


class StrictConnection(h11.Connection):
    """An h11 server connection that also refuses what RFC 9112 lets a server refuse and h11
    accepts: folded header lines (h11 unfolds them) and ``Content-Length`` together with
    ``Transfer-Encoding`` (h11 lets the latter win), the stuff of request smuggling."""

    def next_event(self) -> Any:
        if self.their_state is h11.IDLE:  # what is buffered starts with the next request's head
            problem = head_problem(self.trailing_data[0])
            if problem:
                raise h11.RemoteProtocolError(problem, 400)
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                raise h11.RemoteProtocolError("Content-Length together with Transfer-Encoding", 400)
        return event


class Watch:
    """What the connections of one server share: its limits, the open connections per client
    address, how many are receiving a request, and the tally of those closed for being slow or
    refused (logged in one line, at most every ``report_every`` seconds)."""

    def __init__(self, limits: ServeLimits, report_every: float = 10.0) -> None:
        self.limits = limits
        self.report_every = report_every
        self.per_client: Counter[str] = Counter()
        self.receiving = 0
        self.totals: Counter[str] = Counter()  # since the server started
        self._tally: Counter[str] = Counter()  # since the last report
        self._report: asyncio.TimerHandle | None = None

    def count(self, what: str, loop: asyncio.AbstractEventLoop) -> None:
        """One more connection closed for ``what``: "header", "body" or "cap"."""
        self.totals[what] += 1
        self._tally[what] += 1
        if self._report is None:
            self._report = loop.call_later(self.report_every, self.report)

    def report(self) -> None:
        self._report = None
        tally, self._tally = self._tally, Counter()
        limits = self.limits
        parts = [
            f"{tally['header']} missed the header deadline ({limits.header_timeout:g} s)",
            f"{tally['body']} missed the body deadline ({limits.body_timeout:g} s)",
            f"{tally['cap']} were refused over the per-client cap ({limits.max_client_connections})",
        ]
        shown = [part for part, key in zip(parts, ("header", "body", "cap")) if tally[key]]
        if shown:
            log.warning("tinygpt serve: in the last %g s, connections closed: %s",
                        self.report_every, "; ".join(shown))


def answer(conn: h11.Connection, status: int, message: str, code: str) -> bytes:
    """The bytes of a complete error answer in the OpenAI shape that closes the connection."""
    body = json.dumps(ApiError(status, message, None, code).body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    reason = HTTPStatus(status).phrase.encode()
    return b"".join([conn.send(h11.Response(status_code=status, headers=headers, reason=reason)),
                     conn.send(h11.Data(data=body)), conn.send(h11.EndOfMessage())])


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request-receipt deadlines, a per-client cap and strict parsing
    (see the module's docstring). Made by ``protocol_factory``."""

    def __init__(self, config, server_state, app_state, _loop=None, *, watch: Watch) -> None:
        super().__init__(config, server_state, app_state, _loop)
        size = config.h11_max_incomplete_event_size
        self.conn = StrictConnection(
            h11.SERVER, **({} if size is None else {"max_incomplete_event_size": size}))
        self.watch = watch
        self.address: str | None = None  # counted in watch.per_client while open
        self.phase: str | None = None  # "header" or "body" while receiving a request
        self.receipt: asyncio.TimerHandle | None = None

    # the connection: the per-client cap
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        client = get_remote_addr(transport)
        address = client[0] if client else None
        cap = self.watch.limits.max_client_connections
        if address is not None and self.watch.per_client[address] >= cap:
            self.transport = transport
            transport.write(answer(self.conn, 429, f"too many connections from {address} "
                                   f"(at most {cap})", "too_many_connections"))
            transport.close()
            self.watch.count("cap", self.loop)
            return
        self.address = address
        if address is not None:
            self.watch.per_client[address] += 1
        super().connection_made(transport)
        self.arm("header")

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.address is not None:
            self.watch.per_client[self.address] -= 1
            if not self.watch.per_client[self.address]:
                del self.watch.per_client[self.address]
            self.address = None
        super().connection_lost(exc)

    # receiving a request: the deadlines
    def data_received(self, data: bytes) -> None:
        if self.flow is None:  # refused over the cap
            return
        if self.phase is None and self.conn.their_state is h11.IDLE:
            self.arm("header")  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        self.follow()

    def handle_events(self) -> None:
        # uvicorn answers 503 when its open connections reach max_connections; those still
        # sending a request (other than this one) are not counted.
        if self.config.limit_concurrency is not None:
            others = self.watch.receiving - (self.phase is not None)
            self.limit_concurrency = self.config.limit_concurrency + others
        super().handle_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            if self.phase is None and self.conn.trailing_data[0]:  # a pipelined request, partly in
                self.arm("header")
        else:
            self.follow()

    def follow(self) -> None:
        """Move the deadline along with h11's view of the request being received."""
        state = self.conn.their_state
        if self.transport.is_closing():
            self.disarm()
        elif state is h11.IDLE:
            return
        elif state is h11.SEND_BODY:
            if self.phase == "header":
                self.arm("body")
        else:
            self.disarm()

    def arm(self, phase: str) -> None:
        self.disarm()
        limits = self.watch.limits
        seconds = limits.header_timeout if phase == "header" else limits.body_timeout
        self.phase = phase
        self.watch.receiving += 1
        self.receipt = self.loop.call_later(seconds, self.expired)

    def disarm(self) -> None:
        if self.receipt is not None:
            self.receipt.cancel()
            self.receipt = None
        if self.phase is not None:
            self.phase = None
            self.watch.receiving -= 1

    def expired(self) -> None:
        """The request did not arrive in time: a 408 if no answer has started; close."""
        phase = self.phase
        self.receipt = None
        self.disarm()
        if self.transport.is_closing():
            return
        self.watch.count(phase, self.loop)
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if cycle is None or not cycle.response_started:
            seconds = getattr(self.watch.limits, f"{phase}_timeout")
            try:
                self.transport.write(answer(self.conn, 408, f"the request's {phase} did not "
                                            f"arrive within {seconds:g} s", "request_timeout"))
            except h11.LocalProtocolError:
                pass
        if cycle is not None:  # the application sees the client gone and writes nothing more
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def protocol_factory(watch: Watch) -> functools.partial:
    """What ``uvicorn.Config(http=...)`` takes: ``GuardedH11Protocol`` bound to ``watch``."""
    return functools.partial(GuardedH11Protocol, watch=watch)
