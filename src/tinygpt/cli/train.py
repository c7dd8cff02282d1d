"""``tinygpt train`` and ``tinygpt launch``: flags and TOML keys made from the settings of
``tinygpt.config`` (one source of truth), resolved into a run by ``tinygpt.resolve``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tinygpt.cli.common import Command
from tinygpt.errors import TinyGPTError

LAUNCH_USAGE = "tinygpt launch [torchrun options] train [train flags]"


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--resume``, then one flag per setting (``tinygpt.config.SETTINGS``)."""
    from tinygpt.config import SETTINGS, help_text, resume_flags

    p.add_argument("--config", metavar="FILE", help="TOML file of settings")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue this run from its newest complete checkpoint, with its own settings "
        f"(only {resume_flags()} may change; --data may name the same text at a new place); "
        "a run with no checkpoint yet starts again from step 0",
    )
    groups = {part: p.add_argument_group(title) for part, title in _GROUPS.items()}
    for s in SETTINGS.values():
        group = groups[s.part]
        kwargs: dict = {"dest": s.key, "default": argparse.SUPPRESS, "help": help_text(s.key)}
        if s.type is bool:
            group.add_argument(s.flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if s.choices:
            kwargs["choices"] = s.choices
        arg_type = _model_arg if s.key == "model" else s.type
        group.add_argument(s.flag, type=arg_type, metavar=s.metavar or s.key.upper(), **kwargs)


def _model_arg(text: str) -> str:
    from tinygpt.config import model_kind

    try:
        return model_kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# The parts of TrainConfig, as the help shows them.
_GROUPS = {
    None: "what to train",
    "model": "the model's shape (cfg.model, a GPTConfig)",
    "data": "the text, its tokens and the batches (cfg.data)",
    "optim": "optimizer and learning-rate schedule (cfg.optim)",
    "run": "length, evaluations, checkpoints and hardware (cfg.run)",
}


def read_toml_settings(path: str) -> dict:
    """Settings from a TOML file: keys are the flags' names (underscores or dashes)."""
    from tinygpt.config import SETTINGS

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise TinyGPTError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TinyGPTError(f"cannot read config file {path}: {e}") from None
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in SETTINGS:
            raise TinyGPTError(f"{path}: unknown setting {key!r}")
        t = SETTINGS[name].type
        ok = isinstance(value, t) and not (t is int and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise TinyGPTError(f"{path}: {key} must be a {t.__name__}, got {value!r}")
        out[name] = value
    return out


def resolve_args(args: argparse.Namespace):
    """What ``tinygpt train ARGS`` starts from (``tinygpt.resolve.Start``): flags over TOML."""
    from tinygpt.resolve import resolve_start

    settings = read_toml_settings(args.config) if args.config else {}
    settings.update(
        {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    )
    return resolve_start(settings, resume=args.resume)


def cmd_train(args: argparse.Namespace) -> int:
    from tinygpt import distributed
    from tinygpt.train import train

    start = resolve_args(args)
    if start.recipe and distributed.env_from_torchrun().is_main:
        print(start.recipe)
    # a torchrun worker keeps its process group (see tinygpt.cli.main)
    result = train(start.cfg, resume=start.resume, init=start.init)
    if not distributed.env_from_torchrun().is_main:
        return 0  # rank 0 reports for a torchrun job
    _print_summary(result)
    print(f"sample more with: tinygpt sample {result.run_dir}")
    return 0


def _print_summary(result) -> None:
    """How the run ended, which checkpoint the sample comes from, the sample and its copying."""
    best = "" if result.best_step is None else f" at step {result.best_step}"
    print(f"done: {result.step} steps, val loss {result.val_loss:.4f} "
          f"(best {result.best_val_loss:.4f}{best})")
    if result.stopped_for_overfitting:
        print(f"stopped at step {result.step}: the model began to overfit "
              f"(--stop-when-overfitting)")
    if result.sample:
        if result.best_step is not None:
            print(f"the sample comes from the best checkpoint, step {result.best_step} (val loss "
                  f"{result.best_val_loss:.4f}), as tinygpt sample's does")
        print("--- sample ---")
        print(result.sample)
        print("--------------")
        if result.copying is not None:
            print(result.copying.describe(result.copying_reference))


def launch(argv: list[str], build_parser: Callable[[], argparse.ArgumentParser]) -> int:
    """``tinygpt launch [torchrun options] train ...``: torchrun, with tinygpt's exit codes.

    The train command is checked once here, before any process starts, so that a bad flag or data
    path is one line and exit status 2; then ``torch.distributed.run`` starts the processes. A
    failed process gives its exit status (2 for a bad input, 128 + N for signal N), SIGTERM or
    SIGINT to the launcher stops every process after it saved its checkpoint (143, 130).
    """
    if "train" not in argv:
        raise TinyGPTError(f"give the train command after torchrun's options: {LAUNCH_USAGE}")
    i = argv.index("train")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch_args = get_args_parser().parse_args([*argv[:i], "--module", "tinygpt", *argv[i:]])
    _check_before_launch(build_parser().parse_args(argv[i:]), launch_args)
    try:
        run(launch_args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def _check_before_launch(args: argparse.Namespace, launch_args) -> None:
    from tinygpt.data import resolve_sources
    from tinygpt.distributed import DistEnv
    from tinygpt.runs import check_batch_split

    cfg = resolve_args(args).cfg
    resolve_sources(cfg.data.source, cfg.data.glob)
    nodes = str(launch_args.nnodes).split(":")[-1]
    per_node = str(launch_args.nproc_per_node)
    if nodes.isdigit() and per_node.isdigit():
        check_batch_split(cfg, DistEnv(world_size=int(nodes) * int(per_node)))


TRAIN = Command(
    "train", "train a model", add_train_flags, cmd_train,
    description="Train a bigram or GPT model, or a model class of your own (--model "
    "FILE.py:NAME, see docs/course.md). Flags override the preset; --config reads a TOML "
    "file with the same names (flags win).",
)
LAUNCH = Command(
    "launch", "train on several processes or machines (torchrun with tinygpt's exit codes)",
    lambda p: None, None, usage=LAUNCH_USAGE,
    description="Data-parallel training: torchrun's options (--nproc-per-node N, --nnodes, "
    "--node-rank, --rdzv-endpoint, --standalone, ...), then the train command. The train "
    "command is checked once before any process starts. See docs/distributed.md.",
)
