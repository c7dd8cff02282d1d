"""``tinygpt serve``: one flag per field of ``ServeOptions`` and of its ``ServeLimits``."""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import fields

from tinygpt.cli.common import Command, add_load_flags
from tinygpt.errors import TinyGPTError


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from tinygpt.serve.options import ServeLimits, ServeOptions

    hints = typing.get_type_hints(ServeOptions)
    for f in fields(ServeOptions):
        meta = f.metadata
        if f.name == "limits" or (meta.get("shared") and f.name != "checkpoint"):
            continue
        if meta.get("shared"):  # --checkpoint and --device: declared once for every command
            add_load_flags(p)
        elif meta.get("positional"):
            p.add_argument(f.name, metavar=meta["metavar"])
        else:
            _add_option(p, f, hints[f.name])
    for f in fields(ServeLimits):
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
            metavar="S" if f.name == "timeout" else "N",
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def _add_option(p: argparse.ArgumentParser, f, hint) -> None:
    """The flag of one ``ServeOptions`` field (see its metadata)."""
    meta = f.metadata
    flag = "--" + meta.get("flag", f.name).replace("_", "-")
    if hint is bool:
        p.add_argument(flag, action="store_true", dest=f.name, help=meta["help"])
        return
    kwargs = {"dest": f.name, "metavar": meta.get("metavar")}
    if meta.get("append"):
        p.add_argument(flag, action="append", default=[], help=meta["help"], **kwargs)
        return
    if "env" in meta:  # its help says where the default comes from
        p.add_argument(flag, default=os.environ.get(meta["env"]), help=meta["help"], **kwargs)
        return
    shown = "" if f.default is None else f" (default: {f.default})"
    p.add_argument(flag, type=type(f.default) if f.default is not None else str,
                   default=f.default, help=meta["help"] + shown, **kwargs)


def options_from_args(args: argparse.Namespace):
    """The ``ServeOptions`` the parsed flags describe (checked: ``ValueError`` if not valid)."""
    from tinygpt.serve.options import ServeLimits, ServeOptions

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})
    given = {f.name: getattr(args, f.name) for f in fields(ServeOptions) if f.name != "limits"}
    return ServeOptions(**given, limits=limits)


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the settings, then serve until interrupted."""
    options = options_from_args(args)
    try:
        from tinygpt.serve.server import serve
    except ImportError as e:
        raise TinyGPTError(
            f"tinygpt serve needs FastAPI and uvicorn ({e.name} is missing): "
            f"pip install 'tinygpt[serve]'"
        ) from None
    serve(options)
    return 0


SERVE = Command(
    "serve", "serve a model over HTTP (OpenAI-compatible API + playground)", add_serve_flags,
    cmd_serve,
    description="Serve a trained model: an OpenAI-compatible /v1/completions API and a web "
    "playground at /. Listens on 127.0.0.1 unless --host says otherwise.",
)
