"""Characters vs byte-level BPE on Tiny Shakespeare: the same training time, bits per character.

    python benchmarks/bench_tokenizers.py                          # char, BPE 512/1024/2048, 5 min each
    python benchmarks/bench_tokenizers.py --budget 2m --vocab-sizes 384,1024 --set n_layer=6
    python benchmarks/bench_tokenizers.py --budget 5s --steps 3    # a functional check only

Every run trains the same model shape (the ``cpu`` preset unless ``--preset``/``--set`` say
otherwise) for the same training time; only the tokenizer differs. BPE is trained on the train
split only. Loss per token cannot be compared across tokenizers (a BPE token carries several
characters), so each run is scored on the whole val split -- the same text for every tokenizer --
in bits per character: the total loss in nats over the val text, divided by its number of
characters and by ln 2. The context is ``block_size`` tokens, so BPE models see more characters of
context for the same compute per token; that is part of what a tokenizer buys.

Printed: one Markdown table (tokenizer, vocabulary, parameters, steps, tokens/s, characters per
token, val loss per token, val bits per character) and, with ``--json``, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import setting_value

from tinygpt.config import TrainConfig, parse_duration
from tinygpt.data import load_corpus
from tinygpt.evaluate import evaluate_tokens
from tinygpt.train import train


def run(name: str, settings: dict, tmp: Path) -> dict:
    cfg = TrainConfig.resolve({**settings, "out": str(tmp / name), "sample_chars": 0,
                               "device": "cpu", "keep": 0})
    print(f"# {name}: {json.dumps(settings)}", file=sys.stderr)
    result = train(cfg, log=lambda s: print("#", s, file=sys.stderr), progress_bar=False,
                   handle_signals=False)
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    tokenizer = result.tokenizer
    corpus = load_corpus(cfg.data.source, cfg.data.encoding_errors, tokenizer=tokenizer)
    val = corpus.split("val")
    ev = evaluate_tokens(result.model, val, cfg.model.block_size, 32, "cpu", tokenizer=tokenizer)
    return {
        "name": name, "tokenizer": cfg.data.tokenizer, "vocab_size": tokenizer.vocab_size,
        "params": sum(p.numel() for p in result.model.parameters()), "steps": result.step,
        "train_time_s": last["elapsed_s"], "tokens_per_s": last["tokens"] / last["elapsed_s"],
        "chars_per_token": ev["chars"] / ev["tokens"], "val_loss_per_token": ev["val_loss"],
        "val_bits_per_char": ev["bits_per_char"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| tokenizer | vocabulary | params | steps | tokens/s | chars/token | val loss/token | "
        "val bits/char |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['vocab_size']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
            f"{r['tokens_per_s']:,.0f} | {r['chars_per_token']:.2f} | "
            f"{r['val_loss_per_token']:.4f} | **{r['val_bits_per_char']:.4f}** |"
        )
    best = min(rows, key=lambda r: r["val_bits_per_char"])
    lines.append("")
    lines.append(f"Lowest bits/char: {best['name']} ({best['val_bits_per_char']:.4f}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--budget", default="5m", help="training time of every run (default: 5m)")
    p.add_argument("--steps", type=int, default=None,
                   help="also stop every run after this many steps (functional checks)")
    p.add_argument("--vocab-sizes", default="512,1024,2048", help="BPE vocabularies to try")
    p.add_argument("--no-char", action="store_true", help="skip the character-level run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting for every run (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = parse_duration(args.budget)
    common = {"preset": args.preset, "data": args.data, "max_time": budget, "full_val": True}
    if args.steps is not None:
        common["max_steps"] = args.steps
        common["eval_interval"] = max(1, args.steps)
    for item in args.set:
        key, _, value = item.partition("=")
        common[key.replace("-", "_")] = setting_value(value)

    runs = [] if args.no_char else [("char", {"tokenizer": "char"})]
    for size in (int(s) for s in args.vocab_sizes.split(",") if s.strip()):
        runs.append((f"bpe-{size}", {"tokenizer": "bpe", "vocab_size": size}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs:
            rows.append(run(name, {**common, **extra}, Path(tmp)))
    print(f"{len(rows)} runs of {budget:g} s training time each on {args.data} "
          f"({torch.get_num_threads()} threads)\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
