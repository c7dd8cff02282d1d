"""Data-parallel training against one process: tokens per second and the loss curve.

    python benchmarks/bench_ddp.py                  # CPU: 1 process x 2 threads vs 2 x 1 thread
    python benchmarks/bench_ddp.py --gpus 2         # GPU machine: 1 GPU vs 2 GPUs (NCCL)

Both runs train the same model on the same global batches (the batch of a step depends only on
the seed and the step), so their loss curves should agree up to float summation order. Tokens
per second are training tokens over training time (evaluations and checkpoints not counted), as
``metrics.jsonl`` records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], threads: int | None) -> None:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--gpus", type=int, default=0, help="compare 1 GPU with this many (NCCL)")
    args = ap.parse_args()

    common = ["--preset", args.preset, "--data", args.data, "--max-steps", str(args.steps),
              "--eval-interval", str(max(args.steps // 6, 1)), "--eval-iters", "20",
              "--sample-chars", "0", "--overwrite"]
    if args.gpus:
        common += ["--device", "cuda"]
        n, label_one, label_many = args.gpus, "1 GPU", f"{args.gpus} GPUs"
        one_threads = None
    else:
        common += ["--device", "cpu"]
        n, label_one, label_many = 2, "1 process x 2 threads", "2 processes x 1 thread"
        one_threads = 2
    py = [sys.executable, "-m", "tinygpt"]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        run([*py, "train", *common, "--out", str(one)], one_threads)
        run([*py, "launch", "--standalone", f"--nproc-per-node={n}", "train", *common,
             "--out", str(many)], None)
        a, b = metrics(one), metrics(many)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, preset "
          f"{args.preset}, {args.steps} steps")
    rate = {}
    for label, m in ((label_one, a), (label_many, b)):
        rate[label] = m[-1]["tokens"] / m[-1]["elapsed_s"]
        print(f"  {label:<24} {rate[label]:>10,.0f} tokens/s   final val {m[-1]['val_loss']:.4f}")
    print(f"  ratio {rate[label_many] / rate[label_one]:.2f}x")
    print("  step   val (one)   val (many)")
    for x, y in zip(a, b):
        print(f"  {x['step']:>4}   {x['val_loss']:.4f}      {y['val_loss']:.4f}")
    gap = max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(a, b))
    print(f"  largest val-loss gap {gap:.2e}")


if __name__ == "__main__":
    main()
