"""Settings of ``tinygpt serve``: the limits that keep one server safe, and their CLI flags.

Every limit has a conservative default; all of them can be raised on the command line.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields

API_KEY_ENV = "TINYGPT_API_KEY"


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 256 * 1024  # request body size; larger requests get 413
    max_tokens: int = 1024  # upper bound of a request's max_tokens
    default_max_tokens: int = 16  # max_tokens when a request leaves it out (as in the OpenAI API)
    max_prompt_chars: int = 4096  # characters per prompt
    max_n: int = 8  # completions per request (n times the number of prompts)
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 64  # characters per stop string
    max_batch: int = 32  # sequences decoded together
    max_queue: int = 64  # requests waiting for a place in the batch; more get 429
    timeout: float = 60.0  # seconds a request may take, from arrival to its last token
    max_connections: int = 256  # open connections; uvicorn answers 503 beyond this

    def __post_init__(self) -> None:
        minimum = {"max_queue": 0}
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "timeout":
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


_HELP = {
    "max_body_bytes": "largest request body in bytes (413 beyond)",
    "max_tokens": "largest max_tokens a request may ask for",
    "default_max_tokens": "max_tokens of a request that leaves it out",
    "max_prompt_chars": "longest prompt in characters",
    "max_n": "most completions per request (n x number of prompts)",
    "max_stop": "most stop strings per request",
    "max_stop_chars": "longest stop string in characters",
    "max_batch": "most sequences decoded together",
    "max_queue": "most requests waiting for the batch (429 beyond)",
    "timeout": "seconds a request may run before its output is cut",
    "max_connections": "most open connections (503 beyond)",
}


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``serve`` subcommand and its flags."""
    p = sub.add_parser(
        "serve", help="serve a model over HTTP (OpenAI-compatible API + playground)",
        description="Serve a trained model: an OpenAI-compatible /v1/completions API and a web "
        "playground at /. Listens on 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000,
                   help="port; 0 picks a free one (default: 8000)")
    p.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
        help=f"require this key (Authorization: Bearer KEY) on every route but /health "
        f"(default: ${API_KEY_ENV}, else none)",
    )
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="model id in the API (default: RUN_DIR's name)")
    p.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="also accept this Host header name (repeatable); on other addresses than "
        "loopback, giving it turns the Host check on",
    )
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for the model; 0 keeps torch's default (default: 0)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run (default: best, else last)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    defaults = ServeLimits()
    for f in fields(ServeLimits):
        default = getattr(defaults, f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=type(default), default=default,
            metavar="S" if f.name == "timeout" else "N",
            help=f"{_HELP[f.name]} (default: {default})",
        )
    return p


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    return ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})


def run_serve(args: argparse.Namespace) -> int:
    """``tinygpt serve``: check the settings, then serve until interrupted."""
    from tinygpt.errors import TinyGPTError

    limits = limits_from_args(args)
    if not 0 <= args.threads <= 1024:
        raise TinyGPTError(f"--threads must be between 0 and 1024, got {args.threads}")
    try:
        from tinygpt.serve.server import serve
    except ImportError as e:
        raise TinyGPTError(
            f"tinygpt serve needs FastAPI and uvicorn ({e.name} is missing): "
            f"pip install 'tinygpt[serve]'"
        ) from None
    serve(
        args.run_dir, args.host, args.port, args.api_key, limits, args.model_name,
        args.allowed_host, args.checkpoint, args.device, args.access_log, args.threads,
    )
    return 0
