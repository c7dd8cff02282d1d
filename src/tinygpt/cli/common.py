"""What every command shares: the parser that errs in one line, the table's ``Command`` entry,
and the flags several commands declare (``--checkpoint``, ``--device``, ``--quantize``)."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import dataclass

from tinygpt.quantize import add_quantize_flag

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exits 2, as argparse does)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One entry of the command table: ``tinygpt NAME``, its flags and what runs it.

    ``run`` is None for a command handled before parsing (``launch`` passes its arguments on)."""

    name: str
    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int] | None
    description: str | None = None
    usage: str | None = None


def add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run (default: best, else last)")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a command that loads a run's model: which checkpoint, on which device, its
    weights stored how."""
    add_checkpoint_flag(p)
    add_device_flag(p)
    add_quantize_flag(p)
