"""Regenerate the pictures of docs/course.md (docs/course/*.png).

    python docs/make_pictures.py                 # lessons, a short GPT run, its attention
    python docs/make_pictures.py --run-ladder    # also re-run the whole ladder (~15 CPU minutes)

Without --run-ladder, ladder.png is redrawn from docs/course/ladder.json (the full run quoted in
docs/course.md). Needs Tiny Shakespeare (``--data``, default: the built-in ``shakespeare``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from tinygpt.cli import main as tinygpt
from tinygpt.data import load_corpus
from tinygpt.lessons.bigram import run_bigram
from tinygpt.lessons.ladder import run_ladder, write_outputs
from tinygpt.lessons.no_mask import format_results, run_no_mask
from tinygpt.plots import plot_ladder, plot_run

OUT = Path(__file__).resolve().parent / "course"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--run-ladder", action="store_true", help="re-run the ladder (slow)")
    args = ap.parse_args()
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.data)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The bigram table (week 4's mid-term), and the no-mask lesson.
        lesson = run_bigram(corpus, out_dir=tmp / "bigram")
        print(f"bigram: train {lesson.learned_loss:.4f}, optimum {lesson.optimum_loss:.4f}, "
              f"val {lesson.val_loss:.4f}, total variation {lesson.total_variation:.3f}")
        shutil.copy(tmp / "bigram" / "bigram.png", OUT / "bigram.png")
        print(format_results(run_no_mask(corpus, out_dir=tmp / "no-mask")))
        for name in ("no_mask.png", "attention-causal.png", "attention-no-mask.png"):
            shutil.copy(tmp / "no-mask" / name, OUT / name)
        # A short GPT run: its loss curve and where its heads look.
        run = tmp / "gpt"
        code = tinygpt(["train", "--data", args.data, "--preset", "cpu", "--out", str(run),
                        "--max-steps", "600", "--eval-interval", "100", "--sample-chars", "0"])
        assert code == 0
        plot_run(run, OUT / "loss.png")
        code = tinygpt(["attention", str(run), "--prompt", "ROMEO:\nBut soft, what light", "--out",
                        str(OUT / "attention-gpt.png")])
        assert code == 0

    if args.run_ladder:
        results = run_ladder(corpus)
        write_outputs(results, OUT, note="docs/make_pictures.py --run-ladder")
        (OUT / "ladder.md").unlink()
    else:
        rungs = json.loads((OUT / "ladder.json").read_text(encoding="utf-8"))["rungs"]
        plot_ladder(rungs, OUT / "ladder.png")
    for png in sorted(OUT.glob("*.png")):
        print(f"{png.relative_to(OUT.parent.parent)}  {png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
