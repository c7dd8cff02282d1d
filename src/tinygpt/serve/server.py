"""``tinygpt serve``: load a checkpoint, listen on a socket, run the app under uvicorn."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from tinygpt.checkpoint import Checkpoint, load_checkpoint
from tinygpt.engine import Engine
from tinygpt.errors import TinyGPTError
from tinygpt.quantize import quantize_model
from tinygpt.serve.app import LOOPBACK_NAMES, ModelInfo, create_app
from tinygpt.serve.connection import Watch, protocol_factory
from tinygpt.serve.options import ServeLimits, ServeOptions


def model_info(ckpt: Checkpoint, name: str) -> ModelInfo:
    model = ckpt.model
    state = ckpt.state
    try:
        created = int((ckpt.path / "state.json").stat().st_mtime)
    except OSError:
        created = 0
    return ModelInfo(
        id=name, kind=ckpt.model_kind, num_params=sum(p.numel() for p in model.parameters()),
        vocab_size=ckpt.tokenizer.vocab_size, block_size=ckpt.block_size or 1, created=created,
        step=state.get("step"), val_loss=state.get("val_loss"),
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: the system picks a free one)."""
    if not 0 <= port <= 65535:
        raise TinyGPTError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TinyGPTError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError as e:
        sock.close()
        raise TinyGPTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(sock: socket.socket) -> bool:
    address = sock.getsockname()[0].split("%")[0]  # drop an IPv6 zone id
    return ipaddress.ip_address(address).is_loopback


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def uvicorn_config(app, limits: ServeLimits, access_log: bool = False, *,
                   watch: Watch | None = None, graceful_s: float = 5) -> uvicorn.Config:
    """How uvicorn runs ``app``: on h11 with tinygpt's connection guards (deadlines for receiving
    a request, a per-client cap, strict parsing: ``tinygpt.serve.connection``; ``watch`` holds
    their tally), never websockets."""
    return uvicorn.Config(
        app, http=protocol_factory(watch or Watch(limits)), ws="none",
        log_level="info" if access_log else "warning", access_log=access_log,
        limit_concurrency=limits.max_connections, timeout_graceful_shutdown=graceful_s,
        server_header=False,
    )


def serve(options: ServeOptions) -> None:
    """Load the checkpoint, bind the socket, serve until interrupted (checked options: see
    ``ServeOptions``)."""
    import torch

    from tinygpt.device import pick_device

    o, limits = options, options.limits
    if o.threads:
        torch.set_num_threads(o.threads)
    ckpt = load_checkpoint(Path(o.run_dir), o.checkpoint, pick_device(o.device))
    quantize_model(ckpt.model, o.quantize)
    name = o.model_name or Path(o.run_dir).resolve().name or "tinygpt"
    sock = bind(o.host, o.port)  # after loading: a bad run directory should not hold a port
    loopback = is_loopback(sock)
    if not loopback and o.api_key is None:
        print(f"tinygpt serve: warning: listening on {o.host} without --api-key: anyone who can "
              f"reach this port can use the model", file=sys.stderr, flush=True)
    check_hosts = loopback or bool(o.allowed_hosts)  # other addresses: only when names are given
    hosts = [*LOOPBACK_NAMES, *o.allowed_hosts] if check_hosts else None
    app = create_app(Engine(ckpt.model), ckpt.tokenizer, model_info(ckpt, name), limits,
                     o.api_key, hosts, o.chat_assistant)
    config = uvicorn_config(app, limits, o.access_log)
    print(f"tinygpt serve: model {name} ({ckpt.model_kind}, {ckpt.path}) at {url_of(sock)}"
          f"{' (API key required)' if o.api_key else ''}", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed Ctrl-C on
        print("tinygpt serve: stopped", file=sys.stderr, flush=True)
    finally:
        sock.close()
