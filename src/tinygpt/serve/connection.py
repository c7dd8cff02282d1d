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
  those still sending theirs cannot lock honest requests out. Those are bounded on their own, from
  all addresses together: at most ``max_receiving_connections``; beyond, the one that has been
  sending longest makes room (``503`` and close), so a quick honest request still gets in;
* strictness (``StrictConnection``): a request with both ``Content-Length`` and
  ``Transfer-Encoding``, or with an obsolete folded header line, is answered ``400`` and closed;
* a lingering close after each of these refusals (``linger``): the answer is written, the
  sending side shut (a FIN), and what the client still sends is read and dropped for at most
  ``LINGER_S`` seconds and ``LINGER_BYTES`` bytes. Closed at once, a socket with unread data
  makes the kernel reset the connection, and a reset can drop the answer before the client has
  read it.

Connections closed for being slow or refused over a cap are counted in the log every
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
LINGER_S = 2.0  # how long a refused connection is read and drained before it is closed
LINGER_BYTES = 1 << 20  # and how much of what the client still sends is read, at most


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

    problem = ""  # why the request was refused, once it was

    def next_event(self) -> Any:
        try:
            return self._next_event()
        except h11.RemoteProtocolError as e:
            self.problem = str(e)
            raise

    def _next_event(self) -> Any:
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
    address, those receiving a request (oldest first) and those lingering after a refusal, and
    the tally of those closed for being slow or refused (logged in one line, at most every
    ``report_every`` seconds)."""

    def __init__(self, limits: ServeLimits, report_every: float = 10.0) -> None:
        self.limits = limits
        self.report_every = report_every
        self.per_client: Counter[str] = Counter()
        self.receiving: dict[GuardedH11Protocol, None] = {}  # in the order they began
        self.lingering: set[GuardedH11Protocol] = set()
        self.totals: Counter[str] = Counter()  # since the server started
        self._tally: Counter[str] = Counter()  # since the last report
        self._report: asyncio.TimerHandle | None = None

    def start_receiving(self, protocol: GuardedH11Protocol) -> None:
        """``protocol`` begins receiving a request; at the cap, the oldest receiving makes room."""
        if len(self.receiving) >= self.limits.max_receiving_connections:
            next(iter(self.receiving)).make_room()
        self.receiving[protocol] = None

    def count(self, what: str, loop: asyncio.AbstractEventLoop) -> None:
        """One more connection closed for ``what``: "header", "body", "cap" or "room"."""
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
            f"{tally['room']} made room for newer ones over the cap on connections still sending "
            f"a request ({limits.max_receiving_connections})",
        ]
        shown = [part for part, key in zip(parts, ("header", "body", "cap", "room")) if tally[key]]
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
        self.linger_left: int | None = None  # bytes still to drop while lingering, else None
        self.linger_end: asyncio.TimerHandle | None = None

    # the connection: the per-client cap
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        client = get_remote_addr(transport)
        address = client[0] if client else None
        cap = self.watch.limits.max_client_connections
        if address is not None and self.watch.per_client[address] >= cap:
            self.transport = transport
            transport.write(answer(self.conn, 429, f"too many connections from {address} "
                                   f"(at most {cap})", "too_many_connections"))
            self.watch.count("cap", self.loop)
            self.linger()
            return
        self.address = address
        if address is not None:
            self.watch.per_client[address] += 1
        super().connection_made(transport)
        self.arm("header")

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.watch.lingering.discard(self)
        if self.linger_end is not None:
            self.linger_end.cancel()
            self.linger_end = None
        if self.address is not None:
            self.watch.per_client[self.address] -= 1
            if not self.watch.per_client[self.address]:
                del self.watch.per_client[self.address]
            self.address = None
        super().connection_lost(exc)

    # receiving a request: the deadlines
    def data_received(self, data: bytes) -> None:
        if self.linger_left is not None:  # answered and shut: what still comes is dropped
            self.linger_left -= len(data)
            if self.linger_left < 0:
                self.transport.close()
            return
        if self.flow is None:  # refused over the cap (and closed at once)
            return
        if self.phase is None and self.conn.their_state is h11.IDLE:
            self.arm("header")  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        self.follow()

    def handle_events(self) -> None:
        # uvicorn answers 503 when its open connections reach max_connections; those still
        # sending a request (other than this one) and those lingering are not counted.
        if self.config.limit_concurrency is not None:
            watch = self.watch
            others = len(watch.receiving) - (self.phase is not None) + len(watch.lingering)
            self.limit_concurrency = self.config.limit_concurrency + others
        super().handle_events()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's, in the OpenAI error shape and with h11's reason, then a lingering close
        reason = self.conn.problem or "malformed request"
        try:
            self.transport.write(answer(self.conn, 400, f"invalid HTTP request: {reason}",
                                        "invalid_request"))
        except h11.LocalProtocolError:  # an answer had started: it cannot be followed by a 400
            pass
        self.linger()

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
        """Start (or move on to) the deadline for receiving the request's ``phase``."""
        if self.receipt is not None:
            self.receipt.cancel()
        if self.phase is None:  # it begins receiving a request (keeps its place for the body)
            self.watch.start_receiving(self)
        limits = self.watch.limits
        seconds = limits.header_timeout if phase == "header" else limits.body_timeout
        self.phase = phase
        self.receipt = self.loop.call_later(seconds, self.expired)

    def disarm(self) -> None:
        if self.receipt is not None:
            self.receipt.cancel()
            self.receipt = None
        if self.phase is not None:
            self.phase = None
            self.watch.receiving.pop(self, None)

    def expired(self) -> None:
        """The request did not arrive in time: a 408 if no answer has started; close."""
        phase = self.phase
        seconds = getattr(self.watch.limits, f"{phase}_timeout")
        self.refuse(phase, 408, f"the request's {phase} did not arrive within {seconds:g} s",
                    "request_timeout")

    def make_room(self) -> None:
        """Too many connections are sending a request: this one, sending longest, is closed."""
        cap = self.watch.limits.max_receiving_connections
        self.refuse("room", 503, f"the server has too many connections still sending a request "
                    f"(at most {cap}); this one was the slowest", "too_many_connections")

    def refuse(self, what: str, status: int, message: str, code: str) -> None:
        """Stop receiving this request: answer it if no answer has started, count it, close."""
        self.disarm()
        if self.transport.is_closing():
            return
        self.watch.count(what, self.loop)
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if cycle is None or not cycle.response_started:
            try:
                self.transport.write(answer(self.conn, status, message, code))
            except h11.LocalProtocolError:
                pass
        self.linger()

    # closing after a refusal
    def linger(self) -> None:
        """Close gracefully: shut the sending side once the answer is out, drop what the client
        still sends, close when it is done (its FIN), after ``LINGER_S`` or ``LINGER_BYTES``.

        Closing a socket at once while the client's bytes are still arriving makes the kernel
        reset the connection, and the reset can discard the answer before the client reads it.
        A lingering connection holds only its socket; at most ``max_receiving_connections``
        linger at a time (beyond, they are closed at once).
        """
        transport, watch = self.transport, self.watch
        self.disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the application writes no more
            cycle.disconnected = True
            cycle.message_event.set()
        if transport.is_closing() or self.linger_left is not None:
            return
        if len(watch.lingering) >= watch.limits.max_receiving_connections or (
                not transport.can_write_eof()):
            transport.close()
            return
        watch.lingering.add(self)
        self.linger_left = LINGER_BYTES
        transport.write_eof()  # sent once the answer has gone out
        transport.resume_reading()  # (uvicorn pauses reading behind a pipelined request)
        self.linger_end = self.loop.call_later(LINGER_S, transport.close)


def protocol_factory(watch: Watch) -> functools.partial:
    """What ``uvicorn.Config(http=...)`` takes: ``GuardedH11Protocol`` bound to ``watch``."""
    return functools.partial(GuardedH11Protocol, watch=watch)
