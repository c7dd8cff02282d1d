"""The corpus-sized recipe against a small grid: best val loss for each corpus and setting.

    python benchmarks/recipe_corpora.py /tmp/corpora        # the texts (Debian fortune packages)
    python benchmarks/bench_recipe.py /tmp/corpora/*.txt --jobs 2
    python benchmarks/bench_recipe.py FILE --grid "n_layer=4,n_embd=128,dropout=0.2,max_steps=300"

For each corpus it trains (a) the recipe ``tinygpt train --data FILE`` chooses by itself and
(b) every setting of the grid, each a fresh ``tinygpt train`` process with one thread (``--jobs``
of them side by side) and the same seed, evaluated on the whole validation split (``--full-val``)
at every evaluation. The figure per run is the best validation loss over the run -- the
checkpoint that ``tinygpt sample`` and the end-of-training sample use -- with its step and the
training time. Results are appended to ``--results`` (JSON lines), so an interrupted grid
resumes where it stopped, and printed as one table per corpus with each run's distance from
the corpus's best.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Each grid point sets everything the recipe would choose, so the recipe stays out of it.
DEFAULT_GRID = [
    "n_layer=4,n_embd=128,dropout=0.0,max_steps=600",   # the fixed modern default
    "n_layer=4,n_embd=128,dropout=0.2,max_steps=300",
    "n_layer=4,n_embd=128,dropout=0.2,max_steps=600",
    "n_layer=4,n_embd=128,dropout=0.1,max_steps=300",
    "n_layer=4,n_embd=64,dropout=0.1,max_steps=600",
]
RECIPE = "recipe"


def parse_point(text: str) -> dict[str, str]:
    point = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    point.setdefault("eval_interval", str(max(25, int(point.get("max_steps", 600)) // 12)))
    return point


def train(corpus: Path, point: dict[str, str] | None, seed: int) -> dict:
    """One ``tinygpt train`` run; its best val loss (step), final losses and training time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(corpus), "--out",
               f"{tmp}/run", "--full-val", "--sample-chars", "0", "--seed", str(seed)]
        for key, value in (point or {}).items():
            cmd += [f"--{key.replace('_', '-')}", value]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text()
                .splitlines()]
        config = json.loads(Path(f"{tmp}/run/config.json").read_text())
    evals = [r for r in rows if r.get("val_loss") is not None]
    best = min(evals, key=lambda r: r["val_loss"])
    recipe_line = next((line for line in out.stdout.splitlines() + out.stderr.splitlines()
                        if line.startswith("recipe")), "")
    return {"corpus": corpus.name, "point": RECIPE if point is None else ",".join(
        f"{k}={v}" for k, v in point.items() if k != "eval_interval"),
        "best_val": best["val_loss"], "best_step": best["step"], "final_train": evals[-1][
        "train_loss"], "final_val": evals[-1]["val_loss"], "train_s": rows[-1]["elapsed_s"],
        "chosen": {k: config[k] for k in ("n_layer", "n_embd", "dropout", "max_steps",
                                          "eval_interval")}, "recipe_line": recipe_line}


def table(results: list[dict]) -> str:
    lines = []
    for corpus in dict.fromkeys(r["corpus"] for r in results):
        rows = sorted((r for r in results if r["corpus"] == corpus), key=lambda r: r["best_val"])
        best = rows[0]["best_val"]
        lines += [f"\n{corpus}", "| setting | best val (step) | final train / val | +best | s |",
                  "|---|---|---|---|---|"]
        for r in rows:
            c = r["chosen"]
            name = r["point"] if r["point"] != RECIPE else (
                f"**recipe**: {c['n_layer']}x{c['n_embd']}, dropout {c['dropout']}, "
                f"{c['max_steps']} steps")
            lines.append(f"| {name} | {r['best_val']:.3f} ({r['best_step']}) | "
                         f"{r['final_train']:.3f} / {r['final_val']:.3f} | "
                         f"{r['best_val'] - best:+.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpora", nargs="+", type=Path)
    p.add_argument("--grid", action="append", help="k=v,k=v (repeatable; default: a 5-point grid)")
    p.add_argument("--no-recipe", action="store_true", help="only the grid")
    p.add_argument("--only-recipe", action="store_true", help="only the recipe's own choice")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--results", type=Path, default=Path("recipe-results.jsonl"))
    args = p.parse_args()
    points = [] if args.only_recipe else [parse_point(g) for g in args.grid or DEFAULT_GRID]
    done = {(r["corpus"], r["point"]) for r in map(json.loads, args.results.read_text()
            .splitlines())} if args.results.exists() else set()
    todo = [(c, pt) for c in args.corpora for pt in ([] if args.no_recipe else [None]) + points]

    def run(item):
        corpus, point = item
        key = RECIPE if point is None else ",".join(f"{k}={v}" for k, v in point.items()
                                                    if k != "eval_interval")
        if (corpus.name, key) in done:
            return
        result = train(corpus, point, args.seed)
        with args.results.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{corpus.name} {key}: best {result['best_val']:.4f} at {result['best_step']}, "
              f"{result['train_s']:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))
    print(table([json.loads(line) for line in args.results.read_text().splitlines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
