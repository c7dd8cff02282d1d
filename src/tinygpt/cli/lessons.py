"""The lecture's lessons on the command line: ``tinygpt ladder``, ``lesson``, ``plot`` (loss
curves) and ``attention`` (attention weights as a picture)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygpt.cli.common import Command, add_checkpoint_flag
from tinygpt.errors import TinyGPTError


def add_ladder_flags(p: argparse.ArgumentParser) -> None:
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


def add_plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", metavar="RUN", nargs="+")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG to write (default: RUN/loss.png for one run, loss-compare.png for several)")


def add_attention_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True, help="text to look at (at most the model's context)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG to write (default: RUN_DIR/attention.png)")
    add_checkpoint_flag(p)


def add_lesson_flags(p: argparse.ArgumentParser) -> None:
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

    from tinygpt.checkpoint import load_checkpoint, resolve_run_path
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
    # Beside the checkpoint it read: RUN/best as a pointer file (no symbolic links) is its folder.
    out = Path(args.out) if args.out else resolve_run_path(Path(args.run_dir)) / "attention.png"
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
        print(f"wrote {out / 'no_mask.png'}, {out / 'attention-causal.png'}, "
              f"{out / 'attention-no-mask.png'} and {out / 'no_mask.json'}")
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
    print(f"wrote {out / 'bigram.png'} and {out / 'bigram.json'}")
    return 0


LADDER = Command(
    "ladder", "the lecture's climb from bigram to GPT, one idea per rung", add_ladder_flags,
    cmd_ladder,
    description="Train the lecture's steps one after another on the same data (bigram, one "
    "head, multi-head, feed-forward, blocks + residual, LayerNorm, then the GPT) and compare "
    "their whole-split val loss with the lecture's. Writes ladder.md, ladder.json, ladder.png.",
)
PLOT = Command("plot", "loss curves of one or more runs as a PNG", add_plot_flags, cmd_plot)
ATTENTION = Command(
    "attention", "attention weights of every layer and head over a prompt, as a PNG",
    add_attention_flags, cmd_attention,
)
LESSON = Command(
    "lesson", "a lesson with pictures: no-mask or bigram", add_lesson_flags, cmd_lesson,
    description="no-mask: the same small GPT trained with and without the causal mask, "
    "their reported and honest losses, samples and attention pictures. bigram: the bigram "
    "model's learned next-character table next to the counted one, and a large sample.",
)
