"""Command-line interface: ``tinygpt train | sample | eval | serve | launch | export | import |
ladder | plot | attention | lesson | check``.

``COMMANDS`` is the one table of commands; each family lives in its own module (``train``:
training and ``launch``; ``sample``: sampling and evaluation; ``serve``; ``hf``: export and import;
``lessons``: the lecture's lessons, plots and attention pictures; ``check``: a learner's own
model checked). User errors print one line and
exit with status 2.
"""

from __future__ import annotations

import os
import sys

from tinygpt.cli import check, hf, lessons, sample, serve, train
from tinygpt.cli.common import EXIT_USAGE, Command, Parser
from tinygpt.errors import TinyGPTError, TrainingInterrupted

COMMANDS: tuple[Command, ...] = (
    train.TRAIN, sample.SAMPLE, sample.EVAL, serve.SERVE, train.LAUNCH, hf.EXPORT, hf.IMPORT,
    lessons.LADDER, lessons.PLOT, lessons.ATTENTION, lessons.LESSON, check.CHECK,
)

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser() -> Parser:
    from tinygpt import __version__

    parser = Parser(
        prog="tinygpt",
        description="Train, sample, evaluate and serve small GPT language models (on characters "
        "or byte-level BPE tokens).",
    )
    parser.add_argument("--version", action="version", version=f"tinygpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           usage=command.usage)
        command.add_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(sys.argv[1:] if argv is None else list(argv))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # A worker of a torchrun job leaves with its process group, and without the interpreter's
        # shutdown: ending either while gloo's threads finish a collective can hang or abort it
        # after a finished run (see tinygpt.distributed.leave).
        from tinygpt.distributed import leave

        leave(code)
    return code


def _main(argv: list[str]) -> int:
    if argv[:1] == ["launch"] and not set(argv[1:2]) & {"-h", "--help"}:
        try:
            return train.launch(argv[1:], build_parser)
        except (TinyGPTError, ValueError) as e:
            print(f"tinygpt launch: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    args = build_parser().parse_args(argv)
    run = {c.name: c.run for c in COMMANDS}[args.command]
    try:
        return run(args)
    except (TinyGPTError, ValueError) as e:
        print(f"tinygpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as e:
        try:
            if os.environ.get("RANK", "0") == "0":  # rank 0 reports for a torchrun job
                print(f"tinygpt {args.command}: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # yet another Ctrl-C: the checkpoint is safe, just leave
            pass
        return e.exit_code
    except KeyboardInterrupt:
        print(f"tinygpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
