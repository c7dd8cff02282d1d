"""Screen weight averaging for a run: an exponential moving average (EMA) of the weights, and the
average of the last checkpoints, evaluated beside the trained weights themselves.

Neither changes what the optimizer does, so one run measures all three: the run's own training
steps (``tinygpt.train.training_step``, the preset's schedule and budget), and at every
evaluation the whole val split under the trained weights, under each EMA, and at the end under
the mean of the weights of the last K evaluations. The EMA's update is timed and added to the
training time of its rows, so "time to val 1.886" is what the EMA would cost in a real run.

    python benchmarks/screen_averaging.py --budget 92s --eval-interval 20 \\
        --ema 0.99 --ema 0.995 --average-last 5 --average-last 10 [--set KEY=VALUE ...]

Prints one row per variant: time to the target, best and final val.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setting_value  # noqa: E402

from tinygpt.config import TrainConfig, parse_duration  # noqa: E402
from tinygpt.evaluate import evaluate_tokens  # noqa: E402
from tinygpt.runs import build_run  # noqa: E402
from tinygpt.train import LoopState, training_step  # noqa: E402

TARGET = 1.886  # the val loss the classic recipe ends at (docs/modern.md)


def full_val(run, weights: list[torch.Tensor] | None = None) -> float:
    """The whole val split's loss, under ``weights`` (in parameter order) if given."""
    params = list(run.model.parameters())
    saved = None
    if weights is not None:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], weights)
    try:
        return evaluate_tokens(run.model, run.corpus.split("val"), run.cfg.model.block_size,
                               batch_size=64, device=run.device)["val_loss"]
    finally:
        if saved is not None:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], saved)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="modern")
    ap.add_argument("--budget", default="92s", help="training time, e.g. 92s or 15m")
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--ema", type=float, action="append", default=[], metavar="DECAY")
    ap.add_argument("--average-last", type=int, action="append", default=[], metavar="K")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="/tmp/tinygpt-screen")
    args = ap.parse_args(argv)
    settings = {"preset": args.preset, "max_time": args.budget, "out": args.out,
                "overwrite": True, "sample_chars": 0}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = setting_value(value)
    cfg = TrainConfig.resolve(settings)
    run = build_run(cfg, None, lambda m: print(m, file=sys.stderr), log=lambda m: None)
    budget = parse_duration(args.budget)
    params = list(run.model.parameters())
    emas = {d: [p.detach().clone() for p in params] for d in args.ema}
    ema_time = 0.0
    snapshots: list[list[torch.Tensor]] = []
    rows: dict[str, dict] = {name: {"hit": None, "best": math.inf, "final": math.nan}
                             for name in ["trained", *(f"EMA {d}" for d in args.ema)]}
    state = LoopState(lr=0.0, saved_at=time.monotonic())

    def record(name: str, val: float, t: float) -> None:
        row = rows[name]
        if row["hit"] is None and val <= TARGET:
            row["hit"] = t
        row["best"], row["final"] = min(row["best"], val), val

    while True:
        done = state.elapsed >= budget
        if state.step % args.eval_interval == 0 or done:
            record("trained", full_val(run), state.elapsed)
            for d, w in emas.items():
                record(f"EMA {d}", full_val(run, w), state.elapsed + ema_time)
            snapshots = [*snapshots, [p.detach().clone() for p in params]][-max(args.average_last
                                                                                 or [1]):]
            print(f"step {state.step}: {state.elapsed:.1f}s trained {rows['trained']['final']:.4f} "
                  + " ".join(f"{n} {r['final']:.4f}" for n, r in rows.items() if n != "trained"),
                  file=sys.stderr)
        if done:
            break
        training_step(run, state)
        t0 = time.perf_counter()
        with torch.no_grad():
            for d, w in emas.items():
                torch._foreach_lerp_(w, [p.detach() for p in params], 1.0 - d)
        ema_time += time.perf_counter() - t0
    for k in args.average_last:
        last = snapshots[-k:]
        mean = [torch.stack(ws).mean(0) for ws in zip(*last)]
        name = f"mean of the last {len(last)} evaluations' weights"
        rows[name] = {"hit": None, "best": math.nan, "final": full_val(run, mean)}
    print(f"{state.step} steps in {state.elapsed:.1f}s of training; EMA updates "
          f"{ema_time / max(len(emas), 1):.2f}s each")
    print("| variant | time to val 1.886 | best val | final val |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        hit = "—" if r["hit"] is None else f"{r['hit']:.1f} s"
        best = "—" if math.isnan(r["best"]) else f"{r['best']:.4f}"
        print(f"| {name} | {hit} | {best} | {r['final']:.4f} |")


if __name__ == "__main__":
    main()
