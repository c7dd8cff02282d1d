"""What ``tinygpt serve`` is told: ``ServeOptions`` (where to listen, which model, the key) and the
``ServeLimits`` that keep one server safe.

Every field is a flag of ``tinygpt serve`` (made from the fields in ``tinygpt.cli.serve``; help in
the field metadata). Every limit has a conservative default; all of them can be raised on the
command line (``tinygpt serve --max-tokens N ...``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from tinygpt.quantize import check_quantize

API_KEY_ENV = "TINYGPT_API_KEY"


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


def _option(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServeLimits:
    """The limits of one server; ``tinygpt serve`` has a flag for each (help in ``metadata``)."""

    max_body_bytes: int = _limit(256 * 1024, "largest request body in bytes (413 beyond)")
    max_tokens: int = _limit(1024, "largest max_tokens a request may ask for")
    default_max_tokens: int = _limit(16, "max_tokens of a request that leaves it out")
    max_prompt_chars: int = _limit(4096, "longest prompt in characters")
    max_n: int = _limit(8, "most completions per request (n x number of prompts)")
    max_stop: int = _limit(4, "most stop strings per request")
    max_stop_chars: int = _limit(64, "longest stop string in characters")
    max_batch: int = _limit(32, "most sequences decoded together")
    max_queue: int = _limit(64, "most requests waiting for the batch (429 beyond)")
    timeout: float = _limit(60.0, "seconds a request may run before its output is cut")
    max_connections: int = _limit(
        256, "most open connections that have sent a request (503 beyond)")
    max_client_connections: int = _limit(
        64, "most open connections from one client address (429 beyond; at most "
        "--max-connections; raise it behind a proxy)")
    max_receiving_connections: int = _limit(
        512, "most open connections still sending a request, from all addresses together "
        "(beyond, the one that has been sending longest is answered 503 and closed)")
    header_timeout: float = _limit(
        10.0, "seconds a client may take to send a request line and headers (408 beyond)")
    body_timeout: float = _limit(
        30.0, "seconds a client may take to send a request body after its headers (408 beyond)")

    def __post_init__(self) -> None:
        minimum = {"max_queue": 0}
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(f.default, float):  # seconds
                ok = (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and 0 < value <= 24 * 3600
                )
                if not ok:
                    raise ValueError(
                        f"{flag} must be a number of seconds in (0, 86400], got {value!r}"
                    )
                continue
            low = minimum.get(f.name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10**9:
                raise ValueError(f"{flag} must be an integer in [{low}, 1000000000], got {value!r}")
        if self.max_n > self.max_batch:
            raise ValueError(
                f"--max-n ({self.max_n}) cannot exceed --max-batch ({self.max_batch}): all "
                f"completions of a request are decoded in the same batch"
            )
        if self.default_max_tokens > self.max_tokens:
            object.__setattr__(self, "default_max_tokens", self.max_tokens)
        if self.max_client_connections > self.max_connections:
            object.__setattr__(self, "max_client_connections", self.max_connections)


@dataclass(frozen=True)
class ServeOptions:
    """One server: the run it serves, where it listens, who may use it, and its limits.

    Field metadata: ``help``; ``flag`` when the flag's name is not the field's; ``positional``;
    ``metavar``; ``append`` (a repeatable flag); ``env`` (the default comes from that variable);
    ``shared`` (the flag is declared once for every command, in ``tinygpt.cli.common``).
    """

    run_dir: str = field(metadata={"help": "the run to serve", "positional": True,
                                   "metavar": "RUN_DIR"})
    host: str = _option("127.0.0.1", "address to listen on")
    port: int = _option(8000, "port; 0 picks a free one")
    api_key: str | None = _option(
        None, "require this key (Authorization: Bearer KEY) on every route but /health "
        f"(default: ${API_KEY_ENV}, else none)", metavar="KEY", env=API_KEY_ENV,
    )
    model_name: str | None = _option(None, "model id in the API (default: RUN_DIR's name)",
                                     metavar="NAME")
    chat_assistant: str = _option("assistant", "speaker of the chat replies in the chat template "
                                  "(a play script: see docs/serving.md)", metavar="NAME")
    allowed_hosts: tuple[str, ...] = _option(
        (), "also accept this Host header name (repeatable); on other addresses than loopback, "
        "giving it turns the Host check on", flag="allowed_host", metavar="NAME", append=True,
    )
    threads: int = _option(0, "CPU threads for the model; 0 keeps torch's default", metavar="N")
    access_log: bool = _option(False, "log every request")
    checkpoint: str = _option("best", "which checkpoint of the run", shared=True)
    device: str = _option("auto", "device to run the model on", shared=True)
    quantize: str = _option("none", "how the weights are stored: none or int8", shared=True)
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", self.api_key):
            raise ValueError("--api-key must be printable ASCII without spaces (and not empty)")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not (
                0 <= self.threads <= 1024):
            raise ValueError(f"--threads must be between 0 and 1024, got {self.threads}")
        check_quantize(self.quantize)
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
