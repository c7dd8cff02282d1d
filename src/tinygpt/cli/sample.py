"""``tinygpt sample`` (text from a trained model, streamed) and ``tinygpt eval`` (loss over a
whole split)."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from tinygpt.cli.common import Command, add_load_flags
from tinygpt.errors import TinyGPTError
from tinygpt.quantize import quantize_model
from tinygpt.sampling import add_sampling_flags, sampling_from_args


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    add_sampling_flags(p)  # --num-chars --temperature --top-k --top-p --seed --stop
    p.add_argument("--num-samples", type=int, default=1,
                   help="independent samples, decoded in one batch; sample i uses seed + i. "
                   "The first is streamed, the others follow as soon as it ends (default: 1)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context for every character (the reference "
                   "path: same text, slower)")
    p.add_argument("--window-shift", type=int, default=None, metavar="N",
                   help="once the text outgrows the context, the window jumps N characters at "
                   "a time (cached and --no-cache alike); 1 is the lecture's crop at every step, "
                   "which leaves the cache nothing to reuse (default: half the context)")
    p.add_argument("--verbose", action="store_true", help="report characters per second on stderr")
    p.add_argument("--tinygpt-sampler", action="store_true",
                   help="a model class of your own (trained with --model FILE.py:NAME) samples "
                   "with its own generate(); this uses tinygpt's sampler instead (--temperature, "
                   "--top-k, --top-p, --stop)")
    p.add_argument("--copying", action="store_true",
                   help="report on stderr how much of each sample is copied from the training "
                   "text: its longest run found there, and its share in copied runs of 20+ "
                   "characters (and the same for as much unseen val text); needs the run's text")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="also draw the sample as a picture (monospace, wrapped, with the model, "
                   "its step and val loss in a caption)")
    add_load_flags(p)


def _check_sample_args(args: argparse.Namespace) -> None:
    """Reject bad flags before anything is loaded."""
    if args.num_samples < 1:
        raise TinyGPTError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.window_shift is not None and args.window_shift < 1:
        raise TinyGPTError(f"--window-shift must be >= 1, got {args.window_shift}")
    if not args.prompt:
        raise TinyGPTError("--prompt must not be empty")
    if args.png is not None:
        folder = Path(args.png).expanduser().parent
        if not folder.is_dir():
            raise TinyGPTError(f"--png {args.png}: no such folder {folder}")


def _load_for_sampling(args: argparse.Namespace, device):
    """The checkpoint to sample from, checked against the prompt and ``--window-shift``."""
    from tinygpt.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(args.run_dir), args.checkpoint, device)
    quantize_model(ckpt.model, args.quantize)
    unknown = ckpt.tokenizer.unknown_chars(args.prompt)
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
    return ckpt


def _base_seed(seed: int | None) -> int:
    import torch

    if seed is not None:
        return seed
    seed = int(torch.seed() % (2**31))
    # said, so that a good sample can be made again
    print(f"seed {seed} (--seed {seed} gives this text again)", file=sys.stderr)
    return seed


def _print_samples(out: typing.TextIO, pieces, prompt: str, n: int) -> list[str]:
    """Write ``n`` samples one after another; returns the text generated for each.

    All samples are decoded together, but printed in turn: the sample being printed is streamed,
    the text of later ones waits in a buffer until their turn."""
    buffered = [""] * n
    finished = [False] * n
    shown = 0  # the sample being printed

    def start(i: int) -> None:
        if n > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(prompt + buffered[i])
        out.flush()

    texts = [""] * n
    start(0)
    for piece in pieces:
        texts[piece.sample] += piece.text
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
    return texts


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    from tinygpt.device import pick_device
    from tinygpt.sequence import stream

    settings = sampling_from_args(args)  # one definition of every sampling setting
    _check_sample_args(args)
    device = pick_device(args.device)
    ckpt = _load_for_sampling(args, device)
    seed = _base_seed(settings.seed)
    if not args.tinygpt_sampler and _own_generate(ckpt, args, settings, seed, device):
        return 0
    # On a terminal, model output must not drive it: control characters are shown escaped.
    # Redirected to a file or a pipe, the text is written exactly as generated.
    out = TerminalSafe(sys.stdout) if sys.stdout.isatty() else sys.stdout
    t0 = time.perf_counter()
    n = args.num_samples
    pieces = stream(
        ckpt.model, ckpt.tokenizer, args.prompt, settings.max_tokens, settings.sampling,
        num_samples=n, seed=seed, stop=settings.stop, use_cache=args.use_cache,
        window_shift=args.window_shift,
    )
    texts = _print_samples(out, pieces, args.prompt, n)
    chars = sum(len(t) for t in texts)
    reports = _report_copying(ckpt, texts) if args.copying else None
    if args.png:
        _draw_samples(args, ckpt, texts, settings, seed, reports)
    if args.verbose:
        elapsed = time.perf_counter() - t0
        path = "key/value cache" if args.use_cache else "no cache"
        print(
            f"{chars} chars in {elapsed:.2f} s: {chars / max(elapsed, 1e-9):,.0f} chars/s "
            f"({n} sample{'s' if n > 1 else ''}, {path}, {device})",
            file=sys.stderr,
        )
    return 0


def _own_generate(ckpt, args: argparse.Namespace, settings, seed: int, device) -> bool:
    """Samples from a learner's class with its own ``generate`` (sample i: seed + i); False for
    tinygpt's own models."""
    from tinygpt.generate import visible_controls
    from tinygpt.learner.source import learner_config, own_generate

    if learner_config(ckpt.model) is None:
        return False
    ids = ckpt.tokenizer.encode(args.prompt)
    for i in range(args.num_samples):
        new = own_generate(ckpt.model, ids, settings.max_tokens, seed + i, device)
        text = args.prompt + ckpt.tokenizer.decode(new)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(visible_controls(text) if sys.stdout.isatty() else text, flush=True)
    return True


def _report_copying(ckpt, texts: list[str]) -> list:
    """The copying meter of each sample, on stderr (see ``tinygpt.copying``)."""
    from tinygpt.copying import corpus_index, reference_report

    corpus = _run_corpus(ckpt, None, "--copying needs the training text")
    index = corpus_index(corpus)
    reports = [index.report(t) for t in texts]
    ref = reference_report(corpus, index, max(len(t) for t in texts))
    for i, r in enumerate(reports):
        label = f"sample {i + 1}: " if len(texts) > 1 else ""
        print(label + r.describe(ref), file=sys.stderr)
    return reports


def _draw_samples(args, ckpt, texts: list[str], settings, seed: int, reports) -> None:
    """``--png``: the samples as a picture, with what made them in the caption."""
    from tinygpt.plots import plot_sample

    st = ckpt.state
    parts = [f"{st.get('model', '?')} model", f"step {st.get('step', '?')} "
             f"({args.checkpoint} checkpoint)"]
    if isinstance(st.get("val_loss"), (int, float)):
        parts.append(f"val loss {st['val_loss']:.3f}")
    parts.append(f"seed {seed}, temperature {settings.sampling.temperature:g}")
    if reports:
        parts.append(f"longest run copied from the training text: {reports[0].longest} "
                     f"characters, {reports[0].copied_share:.0%} in copied runs of 20+")
    if len(texts) == 1:
        body = args.prompt + texts[0]
    else:
        body = "\n".join(f"--- sample {i + 1} ---\n{args.prompt}{t}" for i, t in enumerate(texts))
    title = f"tinygpt sample {Path(args.run_dir).name}"
    try:
        out = plot_sample(body.lstrip("\n"), Path(args.png).expanduser(), " · ".join(parts), title)
    except OSError as e:
        raise TinyGPTError(f"cannot write --png {args.png}: {e}") from None
    print(f"picture: {out}", file=sys.stderr)


def _run_corpus(ckpt, data: str | None, missing: str):
    """The text a checkpoint was trained on (or ``data``), encoded with its tokenizer."""
    from tinygpt.data import load_corpus

    record = ckpt.state.get("data", {})
    spec = data or record.get("spec")
    if spec is None:
        raise TinyGPTError(f"the checkpoint does not record its corpus; {missing}")
    errors = record.get("encoding_errors", "strict")
    corpus = load_corpus(spec, errors)
    if corpus.tokenizer != ckpt.tokenizer:  # encode it with the model's tokenizer
        corpus = load_corpus(spec, errors, tokenizer=ckpt.tokenizer)
    if data is None and corpus.fingerprint != record.get("fingerprint"):
        print(f"note: {spec} has changed since the model was trained", file=sys.stderr)
    return corpus


class TerminalSafe:
    """A text stream that writes control characters (but newline and tab) as ``\\xNN``."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from tinygpt.generate import visible_controls

        return self.stream.write(visible_controls(text))

    def flush(self) -> None:
        self.stream.flush()


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--data", default=None, help="evaluate on this text instead of the run's corpus")
    p.add_argument("--split", choices=("val", "train"), default="val", help="(default: val)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="windows per forward pass (default: 32)")
    add_load_flags(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.device import pick_device
    from tinygpt.evaluate import evaluate_tokens

    if args.batch_size < 1:
        raise TinyGPTError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    ckpt = load_checkpoint(Path(args.run_dir), args.checkpoint, device)
    quantize_model(ckpt.model, args.quantize)
    corpus = _run_corpus(ckpt, args.data, "pass --data PATH")
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


SAMPLE = Command("sample", "generate text from a trained model", add_sample_flags, cmd_sample)
EVAL = Command("eval", "loss over the whole validation split", add_eval_flags, cmd_eval)
