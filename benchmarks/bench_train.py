"""Train a preset for a fixed wall-clock budget and report val loss against time and tokens/s.

    python benchmarks/bench_train.py --preset cpu --budget 2m
    python benchmarks/bench_train.py --model bigram --budget 30s

The periodic val losses are the training loop's estimates (fixed random batches); the final line
is the deterministic loss over the whole val split (the ``tinygpt eval`` definition).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from tinygpt.config import TrainConfig
from tinygpt.data import load_corpus
from tinygpt.evaluate import evaluate_tokens
from tinygpt.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gpt", choices=("gpt", "bigram"))
    ap.add_argument("--preset", default=None)
    ap.add_argument("--budget", default="2m", help="wall-clock training budget (default: 2m)")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--eval-interval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.resolve(
            {
                "model": args.model,
                "preset": args.preset,
                "data": args.data,
                "max_time": args.budget,
                "out": str(Path(tmp) / "run"),
                "eval_interval": args.eval_interval,
                "sample_chars": 0,
                "seed": args.seed,
                "device": "cpu",
            }
        )
        print(
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}; model {cfg.kind}, preset {cfg.preset}, "
            f"budget {args.budget}",
            file=sys.stderr,
        )
        result = train(cfg, log=lambda s: print("#", s, file=sys.stderr), progress_bar=False)
        rows = [
            json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        corpus = load_corpus(cfg.data.source)
        block = getattr(result.model.config, "block_size", cfg.model.block_size)
        final = evaluate_tokens(result.model, corpus.split("val"), block, 64)

    print(f"{'time_s':>8} {'step':>7} {'train':>7} {'val':>7} {'tok/s':>9}")
    for r in rows:
        print(
            f"{r['elapsed_s']:8.1f} {r['step']:7d} {r['train_loss']:7.4f} {r['val_loss']:7.4f} "
            f"{r['tokens_per_s']:9.0f}"
        )
    rates = [r["tokens_per_s"] for r in rows if r["step"] > 0]
    mean_rate = sum(rates) / len(rates) if rates else 0.0
    print(
        f"whole-split val loss {final['val_loss']:.4f} ({final['bits_per_char']:.3f} bits/char) "
        f"after {result.step} steps; mean {mean_rate:,.0f} tokens/s"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": cfg.kind,
                    "preset": cfg.preset,
                    "budget": args.budget,
                    "steps": result.step,
                    "val_loss": final["val_loss"],
                    "tokens_per_s": mean_rate,
                    "curve": rows,
                }
            )
        )


if __name__ == "__main__":
    main()
