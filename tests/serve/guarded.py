"""Servers run the way ``tinygpt serve`` runs them (``uvicorn_config``: the connection guards),
and raw sockets to talk to them byte by byte, from any loopback address."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import h11
import uvicorn
from tests.serve.conftest import ServerThread, _build_app

from tinygpt.serve.connection import Watch
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.server import uvicorn_config

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class GuardedServer(ServerThread):
    """A ``ServerThread`` on ``uvicorn_config``; ``watch`` holds the guards' tally."""

    def __init__(self, app, limits: ServeLimits, report_every: float = 10.0) -> None:
        super().__init__(app)
        self.watch = Watch(limits, report_every)
        config = uvicorn_config(app, limits, watch=self.watch, graceful_s=2)
        config.log_level = "warning"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)


def start(checkpoint, limits: ServeLimits, engine=None, report_every: float = 10.0):
    app = _build_app(checkpoint, engine=engine, limits=limits)
    return GuardedServer(app, limits, report_every).__enter__()


def connect(port: int, address: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout, source_address=(address, 0))
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (at most ``limit_s``)."""
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def responses(data: bytes, closed: bool = False) -> list[tuple[int, bytes]]:
    """The (status, body) of each response in ``data``, in order (parsed by h11); ``closed``:
    the server closed the connection after ``data`` (which may end a body)."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes]] = []
    if not data:  # (to h11, no bytes would mean the connection closed)
        return out
    conn.receive_data(data)
    if closed:
        conn.receive_data(b"")
    status, body = None, b""
    while True:
        if conn.our_state is h11.IDLE:  # h11 needs a request sent to read each response
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
            if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
                break
            conn.start_next_cycle()
    return out


def exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` and read until one whole response has arrived; its (status, body)."""
    sock.sendall(request)
    data = b""
    while not responses(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return responses(data)[0]


def keep_sending(port: int, address: str, first: bytes, wait: float) -> bytes:
    """Send ``first``, wait ``wait`` s (the server answers meanwhile), send 256 KiB more as a
    client still sending its request would, then read what the server answered until it closed.

    The client is asyncio's streams: once the server's reset has been seen, their reader
    raises instead of returning what had arrived before it -- an answer lost to a reset reads
    as ``b""``.
    """

    async def talk() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(address, 0))
        try:
            writer.write(first)
            await asyncio.sleep(wait)
            for _ in range(4):
                writer.write(b"X" * 65536)
                await writer.drain()
                await asyncio.sleep(0.05)
        except OSError:
            pass
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except OSError:
            return b""
        finally:
            writer.close()

    return asyncio.run(talk())
