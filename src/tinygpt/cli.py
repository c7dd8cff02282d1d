"""Command-line interface: ``tinygpt train | sample | eval | serve``.

The flags of ``train`` are generated from the fields of ``TrainConfig`` (one source of truth);
``--config run.toml`` reads the same names from a TOML file. User errors print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from tinygpt.errors import TinyGPTError, TrainingInterrupted

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exits 2, as argparse does)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_type(f) -> type:
    """The concrete type of a dataclass field (``int | None`` -> ``int``)."""
    hints = typing.get_type_hints(_train_config_cls())
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _train_config_cls():
    from tinygpt.config import TrainConfig

    return TrainConfig


def _preset_note(name: str) -> str:
    from tinygpt.config import PRESETS

    vals = [f"{p}={v[name]}" for p, v in PRESETS.items() if name in v]
    return f"presets: {', '.join(vals)}" if vals else ""


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(_train_config_cls()):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        default = f.default if f.default is not MISSING else None
        shown = "" if default is None else f"default: {default}"
        note = "; ".join(x for x in (shown, _preset_note(f.name)) if x)
        help_text = f.metadata.get("help", "") + (f" ({note})" if note else "")
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        metavar = f.metadata.get("metavar", f.name.upper())
        p.add_argument(flag, type=t, metavar=metavar, **kwargs)


def read_toml_settings(path: str) -> dict:
    """Settings from a TOML file: keys are TrainConfig field names (dashes allowed)."""
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
    known = {f.name: f for f in fields(_train_config_cls())}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise TinyGPTError(f"{path}: unknown setting {key!r}")
        t = _field_type(known[name])
        ok = isinstance(value, t) and not (t is int and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise TinyGPTError(f"{path}: {key} must be a {t.__name__}, got {value!r}")
        out[name] = value
    return out


def _resume_flags() -> str:
    from tinygpt.runs import RESUME_MAY_CHANGE

    return ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinygpt",
        description="Train, sample and evaluate character-level language models.",
    )
    from tinygpt import __version__

    parser.add_argument("--version", action="version", version=f"tinygpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train", help="train a model",
        description="Train a bigram or GPT model. Flags override the preset; --config reads a "
        "TOML file with the same names (flags win).",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file of settings")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue this run from its newest complete checkpoint, with its own settings "
        f"(only {_resume_flags()} may change; --data may name the same text at a new place); "
        "a run with no checkpoint yet starts again from step 0",
    )
    _add_train_flags(p)

    p = sub.add_parser("sample", help="generate text from a trained model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-chars", type=int, default=500,
                   help="tokens to generate: characters for a character model (default: 500)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="independent samples, decoded in one batch; sample i uses seed + i. "
                   "The first is streamed, the others follow as soon as it ends (default: 1)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a sample where STR first appears, STR excluded (repeatable)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context for every character (the reference "
                   "path: same text, slower)")
    p.add_argument("--window-shift", type=int, default=None, metavar="N",
                   help="once the text outgrows the context, the window jumps N characters at "
                   "a time (cached and --no-cache alike); 1 is the lecture's crop at every step, "
                   "which leaves the cache nothing to reuse (default: half the context)")
    p.add_argument("--verbose", action="store_true", help="report characters per second on stderr")
    _add_load_flags(p)

    p = sub.add_parser("eval", help="loss over the whole validation split")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--data", default=None, help="evaluate on this text instead of the run's corpus")
    p.add_argument("--split", choices=("val", "train"), default="val", help="(default: val)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="windows per forward pass (default: 32)")
    _add_load_flags(p)

    _add_serve_parser(sub)
    sub.add_parser(
        "launch", help="train on several processes or machines (torchrun with tinygpt's exit codes)",
        usage=LAUNCH_USAGE,
        description="Data-parallel training: torchrun's options (--nproc-per-node N, --nnodes, "
        "--node-rank, --rdzv-endpoint, --standalone, ...), then the train command. The train "
        "command is checked once before any process starts. See docs/distributed.md.",
    )
    _add_hf_parsers(sub)
    _add_lesson_parsers(sub)
    return parser


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run (default: best, else last)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def _train_config(args: argparse.Namespace):
    """The configuration (and checkpoint to continue) that ``tinygpt train ARGS`` asks for."""
    from tinygpt.config import TrainConfig
    from tinygpt.distributed import restart_count
    from tinygpt.runs import has_checkpoint, prepare_resume, settings_for_init_from

    settings = read_toml_settings(args.config) if args.config else {}
    settings.update(
        {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    )
    if args.resume:
        return prepare_resume(Path(args.resume), settings)
    if settings.get("init_from"):
        settings = settings_for_init_from(settings)
    cfg = TrainConfig.resolve(settings)
    if restart_count() > 0 and has_checkpoint(Path(cfg.run_dir)):
        # torchrun --max-restarts runs the same command again after a failure: continue the run
        # from its newest checkpoint instead of refusing to overwrite it.
        same = {k: v for k, v in settings.items() if k not in ("overwrite", "init_from")}
        return prepare_resume(Path(cfg.run_dir), same)
    return cfg, None


def cmd_train(args: argparse.Namespace) -> int:
    from tinygpt import distributed
    from tinygpt.train import train

    cfg, ckpt = _train_config(args)
    result = train(cfg, resume=ckpt)  # a torchrun worker keeps its process group (see main)
    if not distributed.env_from_torchrun().is_main:
        return 0  # rank 0 reports for a torchrun job
    print(
        f"done: {result.step} steps, val loss {result.val_loss:.4f} "
        f"(best {result.best_val_loss:.4f})"
    )
    if result.sample:
        print("--- sample ---")
        print(result.sample)
        print("--------------")
    print(f"sample more with: tinygpt sample {result.run_dir}")
    return 0


LAUNCH_USAGE = "tinygpt launch [torchrun options] train [train flags]"


def launch(argv: list[str]) -> int:
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

    cfg, _ = _train_config(args)
    resolve_sources(cfg.data, cfg.glob)
    nodes = str(launch_args.nnodes).split(":")[-1]
    per_node = str(launch_args.nproc_per_node)
    if nodes.isdigit() and per_node.isdigit():
        check_batch_split(cfg, DistEnv(world_size=int(nodes) * int(per_node)))

def cmd_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.device import pick_device
    from tinygpt.generate import SamplingConfig
    from tinygpt.sequence import TextStream, stream

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.num_chars < 0:
        raise TinyGPTError(f"--num-chars must be >= 0, got {args.num_chars}")
    if args.num_samples < 1:
        raise TinyGPTError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.window_shift is not None and args.window_shift < 1:
        raise TinyGPTError(f"--window-shift must be >= 1, got {args.window_shift}")
    if not args.prompt:
        raise TinyGPTError("--prompt must not be empty")
    TextStream(args.stop)  # reject empty stop strings before loading anything
    device = pick_device(args.device)
    ckpt = load_checkpoint(Path(args.run_dir), args.checkpoint, device)
    tok = ckpt.tokenizer
    unknown = tok.unknown_chars(args.prompt)
    if unknown:
        raise TinyGPTError(
            f"the prompt has characters the model does not know: "
            f"{', '.join(repr(c) for c in unknown)}"
        )
    block_size = ckpt.block_size or 1
    if args.window_shift is not None and args.window_shift > block_size:
        raise TinyGPTError(
            f"--window-shift must be at most the context length {block_size}, "
            f"got {args.window_shift}"
        )
    base_seed = args.seed if args.seed is not None else int(torch.seed() % (2**31))
    if args.seed is None:  # say it, so that a good sample can be made again
        print(f"seed {base_seed} (--seed {base_seed} gives this text again)", file=sys.stderr)
    n = args.num_samples
    # On a terminal, model output must not drive it: control characters are shown escaped.
    # Redirected to a file or a pipe, the text is written exactly as generated.
    out = _TerminalSafe(sys.stdout) if sys.stdout.isatty() else sys.stdout

    # All samples are decoded together, but printed one after another: the sample being
    # printed is streamed, the text of later ones waits in a buffer until their turn.
    buffered = [""] * n
    finished = [False] * n
    shown = 0  # the sample being printed

    def start(i: int) -> None:
        if n > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(args.prompt + buffered[i])
        out.flush()

    t0 = time.perf_counter()
    chars = 0
    start(0)
    pieces = stream(
        ckpt.model, tok, args.prompt, args.num_chars, sampling, num_samples=n, seed=base_seed,
        stop=args.stop, use_cache=args.use_cache, window_shift=args.window_shift,
    )
    for piece in pieces:
        chars += len(piece.text)
        if piece.sample == shown:
            out.write(piece.text)
            out.flush()
        else:
            buffered[piece.sample] += piece.text
        if piece.finish:
            finished[piece.sample] = True
        while shown < n and finished[shown]:
            out.write("\n")
            shown += 1
            if shown < n:
                start(shown)
    out.flush()
    if args.verbose:
        elapsed = time.perf_counter() - t0
        path = "key/value cache" if args.use_cache else "no cache"
        print(
            f"{chars} chars in {elapsed:.2f} s: {chars / max(elapsed, 1e-9):,.0f} chars/s "
            f"({n} sample{'s' if n > 1 else ''}, {path}, {device})",
            file=sys.stderr,
        )
    return 0


class _TerminalSafe:
    """A text stream that writes control characters (but newline and tab) as ``\\xNN``."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from tinygpt.generate import visible_controls

        return self.stream.write(visible_controls(text))

    def flush(self) -> None:
        self.stream.flush()


def cmd_eval(args: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.data import load_corpus
    from tinygpt.device import pick_device
    from tinygpt.evaluate import evaluate_tokens

    if args.batch_size < 1:
        raise TinyGPTError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    ckpt = load_checkpoint(Path(args.run_dir), args.checkpoint, device)
    data = ckpt.state.get("data", {})
    spec = args.data or data.get("spec")
    if spec is None:
        raise TinyGPTError("the checkpoint does not record its corpus; pass --data PATH")
    errors = data.get("encoding_errors", "strict")
    corpus = load_corpus(spec, errors)
    if corpus.tokenizer != ckpt.tokenizer:  # encode it with the model's tokenizer
        corpus = load_corpus(spec, errors, tokenizer=ckpt.tokenizer)
    if args.data is None and corpus.fingerprint != data.get("fingerprint"):
        print(f"note: {spec} has changed since the model was trained", file=sys.stderr)
    block_size = ckpt.block_size or ckpt.state["train_config"].get("block_size", 256)
    tokens = corpus.split(args.split)
    result = evaluate_tokens(ckpt.model, tokens, block_size, args.batch_size, device,
                             tokenizer=ckpt.tokenizer)
    result = {
        "split": args.split, **result, "step": ckpt.state.get("step"),
        "checkpoint": str(ckpt.path),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.split} loss {result['val_loss']:.4f} nats/token, "
            f"{result['bits_per_char']:.4f} bits/char over {result['tokens']:,} tokens "
            f"({result['chars']:,} characters; {ckpt.path}, step {result['step']})"
        )
    return 0


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``serve``: its own flags, then one flag per field of ``ServeLimits``."""
    import os

    from tinygpt.serve.options import API_KEY_ENV, ServeLimits

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
    _add_load_flags(p)
    for f in fields(ServeLimits):
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
            metavar="S" if f.name == "timeout" else "N",
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the settings, then serve until interrupted."""
    from tinygpt.serve.options import ServeLimits

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})
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


def _add_hf_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run as a Hugging Face transformers model directory",
        description="Write a run's model and tokenizer as a directory that transformers loads "
        "(AutoModelForCausalLM / AutoTokenizer .from_pretrained): GPT-2 for learned positions, "
        "Llama, Qwen3 or Persimmon for rotary ones. Options with no exact equivalent are refused.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run (default: best, else last)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT_DIR")

    p = sub.add_parser(
        "import", help="turn a GPT-2-format model directory into a tinygpt run",
        description="Read a GPT-2-format directory (config.json, model.safetensors or "
        "pytorch_model.bin, tokenizer.json or vocab.json + merges.txt) and write it as a run "
        "that samples, evaluates, serves and fine-tunes with --init-from.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def cmd_export(args: argparse.Namespace) -> int:
    from tinygpt.hf import export_run

    result = export_run(Path(args.run_dir), Path(args.out_dir), args.checkpoint, args.overwrite)
    print(f"wrote {result.architecture} to {result.out_dir} ({', '.join(result.files)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tinygpt.hf import import_hf

    folder = import_hf(Path(args.hf_dir), Path(args.out), args.overwrite)
    print(f"wrote {folder}; sample with: tinygpt sample {args.out}")
    return 0


# ------------------------------------------------------- lessons: ladder, plot, attention, lesson


def _add_lesson_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ladder", help="the lecture's climb from bigram to GPT, one idea per rung",
        description="Train the lecture's steps one after another on the same data (bigram, one "
        "head, multi-head, feed-forward, blocks + residual, LayerNorm, then the GPT) and compare "
        "their whole-split val loss with the lecture's. Writes ladder.md, ladder.json, ladder.png.",
    )
    p.add_argument("--data", default="shakespeare", help="text to train on (default: shakespeare)")
    p.add_argument("--out", default="runs/ladder", help="output folder (default: runs/ladder)")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--steps", type=int, default=None,
                       help="steps for every rung (default: the lecture's: 3000 for the bigram, "
                       "5000 for the small rungs, 1000 for the GPT)")
    limit.add_argument("--budget", default=None, metavar="DURATION",
                       help="training time per rung, e.g. 30s or 2m (each rung also stops at its "
                       "step count)")
    p.add_argument("--seed", type=int, default=1337, help="(default: 1337)")

    p = sub.add_parser("plot", help="loss curves of one or more runs as a PNG")
    p.add_argument("run_dirs", metavar="RUN", nargs="+")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG to write (default: RUN/loss.png for one run, loss-compare.png for several)")

    p = sub.add_parser("attention", help="attention weights of every layer and head over a prompt, as a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True, help="text to look at (at most the model's context)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG to write (default: RUN_DIR/attention.png)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run (default: best, else last)")

    p = sub.add_parser(
        "lesson", help="a lesson with pictures: no-mask or bigram",
        description="no-mask: the same small GPT trained with and without the causal mask, "
        "their reported and honest losses, samples and attention pictures. bigram: the bigram "
        "model's learned next-character table next to the counted one, and a large sample.",
    )
    p.add_argument("name", choices=("no-mask", "bigram"))
    p.add_argument("--data", default="shakespeare", help="text to train on (default: shakespeare)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: no-mask 600, bigram 3000)")
    p.add_argument("--out", default=None, help="output folder (default: runs/lesson-NAME)")
    p.add_argument("--seed", type=int, default=1337, help="(default: 1337)")


def _positive_steps(steps: int | None) -> None:
    if steps is not None and steps < 1:
        raise TinyGPTError(f"--steps must be >= 1, got {steps}")


def cmd_ladder(args: argparse.Namespace) -> int:
    import torch

    from tinygpt.config import parse_duration
    from tinygpt.data import load_corpus
    from tinygpt.lessons.ladder import format_table, run_ladder, write_outputs
    from tinygpt.lessons.training import one_line

    _positive_steps(args.steps)
    budget = parse_duration(args.budget) if args.budget is not None else None
    corpus = load_corpus(args.data)
    limit = (f"{args.steps} steps per rung" if args.steps else
             f"at most {args.budget} per rung" if budget else "the lecture's steps")
    note = (f"Data: {args.data}; {limit}; seed {args.seed}; small rungs on 1 CPU thread, the GPT on "
            f"{torch.get_num_threads()}; val loss over the whole validation split.")
    print(note, flush=True)

    def progress(r) -> None:
        print(f"  {r.name:<16} {r.params:>9,} params  {r.steps:>5} steps  val {r.val_loss:.3f}  "
              f"{r.seconds:.0f} s", flush=True)

    results = run_ladder(corpus, args.steps, budget, args.seed, on_rung=progress)
    print()
    print(format_table(results))
    print("\nsamples (⏎ is a newline):")
    for r in results:
        print(f"  {r.name:<16} {one_line(r.sample)[:90]}")
    paths = write_outputs(results, Path(args.out), note)
    print(f"\nwrote {paths['md']}, {paths['json']} and {paths['png']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from tinygpt.plots import plot_run, plot_runs

    if len(args.run_dirs) == 1:
        out = plot_run(Path(args.run_dirs[0]), Path(args.out) if args.out else None)
    else:
        out = plot_runs([Path(d) for d in args.run_dirs], Path(args.out or "loss-compare.png"))
    print(f"wrote {out}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    import torch

    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.models.attention_maps import attention_maps
    from tinygpt.plots import plot_attention

    if not args.prompt:
        raise TinyGPTError("--prompt must not be empty")
    ckpt = load_checkpoint(Path(args.run_dir), args.checkpoint, "cpu")
    if ckpt.model_kind != "gpt":
        raise TinyGPTError(f"{args.run_dir} holds a {ckpt.model_kind} model, which has no attention")
    tok = ckpt.tokenizer
    unknown = tok.unknown_chars(args.prompt)
    if unknown:
        raise TinyGPTError(
            f"the prompt has characters the model does not know: {', '.join(repr(c) for c in unknown)}"
        )
    ids = tok.encode(args.prompt)
    if len(ids) > ckpt.block_size:
        raise TinyGPTError(
            f"the prompt is {len(ids)} tokens long; the model's context is {ckpt.block_size}"
        )
    maps = attention_maps(ckpt.model, torch.tensor(ids, dtype=torch.long))
    out = Path(args.out) if args.out else Path(args.run_dir) / "attention.png"
    labels = [tok.decode([i]) for i in ids]
    plot_attention(maps, labels, out, title=f"{Path(args.run_dir).name}: attention over the prompt")
    print(f"wrote {out} ({maps.shape[0]} layers x {maps.shape[1]} heads, {len(ids)} tokens)")
    return 0


def cmd_lesson(args: argparse.Namespace) -> int:
    from tinygpt.data import load_corpus
    from tinygpt.lessons.training import one_line

    _positive_steps(args.steps)
    out = Path(args.out or f"runs/lesson-{args.name}")
    corpus = load_corpus(args.data)
    if args.name == "no-mask":
        from tinygpt.lessons.no_mask import DEFAULT_STEPS, format_results, run_no_mask

        results = run_no_mask(corpus, args.steps or DEFAULT_STEPS, args.seed, out)
        print(format_results(results))
        print("train/val loss: one forward pass, each position sees what its mask allows (the "
              "no-mask model sees the answer);\nhonest loss: each position predicted from its "
              "prefix alone, as when generating.\n")
        for r in results:
            print(f"--- sample from the {r.name} model ---\n{r.sample}\n")
        print(f"wrote {out}/no_mask.png, {out}/attention-causal.png, {out}/attention-no-mask.png "
              f"and {out}/no_mask.json")
        return 0
    from tinygpt.lessons.bigram import DEFAULT_STEPS, run_bigram

    lesson = run_bigram(corpus, args.steps or DEFAULT_STEPS, args.seed, out)
    print(f"bigram model after {lesson.steps} steps: train loss {lesson.learned_loss:.4f}, "
          f"val loss {lesson.val_loss:.4f} nats/char")
    print(f"best possible on the training text (counted table): {lesson.optimum_loss:.4f}; "
          f"gap {lesson.learned_loss - lesson.optimum_loss:.4f}")
    trail = ", ".join(f"{step}: {tv:.3f}" for step, tv in lesson.convergence)
    print(f"learned vs counted probabilities (total variation, 0 = equal), by step: {trail}")
    bar = "=" * 72
    print(f"\n{bar}\n  generated by the bigram model (one character at a time)\n{bar}")
    print(lesson.sample)
    print(f"{bar}\n(one line: {one_line(lesson.sample)[:60]}...)")
    print(f"wrote {out}/bigram.png and {out}/bigram.json")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "serve": cmd_serve,
            "export": cmd_export, "import": cmd_import}
COMMANDS.update(ladder=cmd_ladder, plot=cmd_plot, attention=cmd_attention, lesson=cmd_lesson)


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
            return launch(argv[1:])
        except (TinyGPTError, ValueError) as e:
            print(f"tinygpt launch: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
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
