"""Classic vs modern on the CPU: the same wall-clock budget, the same evaluation.

    python benchmarks/bench_cpu_recipe.py                  # classic 2000 steps, then modern
    python benchmarks/bench_cpu_recipe.py --only modern --budget 15m
    python benchmarks/bench_cpu_recipe.py --only modern --budget 110s --set n_layer=6 --set lr=3e-3

(a) ``classic``: the lecture architecture at nanoGPT's CPU recipe -- 4 layers, 4 heads, 128 wide,
    context 64, batch 12, AdamW lr 1e-3 with cosine decay to 1e-4, no dropout, 2000 steps.
(b) ``modern``: the ``modern`` preset, trained for the training time (a) took.

Both are evaluated the same way: the loss over the whole val split in consecutive windows of the
block size (the ``tinygpt eval`` definition), every ``--eval-every`` seconds of training time or
so; evaluation time is not counted. Printed for each: val loss against training time, the time
to reach val 1.886, the final val loss, tokens/s, FLOPs per token and MFU against this machine's
measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from common import setting_value

from tinygpt.config import TrainConfig, parse_duration
from tinygpt.device import native_bf16
from tinygpt.perf import flops_per_token, measure_matmul_peak
from tinygpt.train import train

TARGET = 1.886
# Set these to measure how an AVX2-only CPU behaves on one with AMX: the libraries then use AVX2
# kernels only (a bf16 matrix product becomes emulated, tens of times slower than float32), and
# tinygpt's native-bf16 decision says no.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
CLASSIC = {
    "preset": "cpu", "batch_size": 12, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128,
    "dropout": 0.0, "lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 100, "max_steps": 2000,
    "optimizer": "adamw", "schedule": "cosine",
}


def time_to(rows: list[dict], target: float) -> float | None:
    """Training seconds at which val loss first reaches ``target`` (linear between evals)."""
    for prev, row in zip(rows, rows[1:]):
        if row["val_loss"] <= target:
            a, b = prev["val_loss"], row["val_loss"]
            frac = (a - target) / (a - b) if a != b else 1.0
            return prev["elapsed_s"] + frac * (row["elapsed_s"] - prev["elapsed_s"])
    return None


def run(name: str, settings: dict, data: str, eval_every_steps: int, tmp: Path, peak: float) -> dict:
    cfg = TrainConfig.resolve({
        **settings, "data": data, "out": str(tmp / name), "full_val": True,
        "eval_interval": eval_every_steps, "sample_chars": 0, "device": "cpu", "keep": 0,
    })
    print(f"# {name}: {json.dumps({k: v for k, v in settings.items()})}", file=sys.stderr)
    result = train(cfg, log=lambda s: print("#", s, file=sys.stderr), progress_bar=False,
                   handle_signals=False)
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    tok_s = last["tokens"] / last["elapsed_s"]
    fpt = flops_per_token(result.model, cfg.model.block_size)
    return {
        "name": name, "settings": cfg.to_dict(), "params": sum(p.numel() for p in result.model.parameters()),
        "curve": [{k: r[k] for k in ("step", "elapsed_s", "val_loss")} for r in rows],
        "time_to_target_s": time_to(rows, TARGET), "final_val_loss": last["val_loss"],
        "train_time_s": last["elapsed_s"], "steps": last["step"], "tokens_per_s": tok_s,
        "flops_per_token": fpt, "mfu": fpt * tok_s / peak,
    }


def report(r: dict) -> None:
    print(f"\n== {r['name']}: {r['params'] / 1e6:.2f}M params, {r['steps']} steps in "
          f"{r['train_time_s']:.1f} s")
    print(f"{'time_s':>8} {'step':>6} {'val':>7}")
    for c in r["curve"]:
        print(f"{c['elapsed_s']:8.1f} {c['step']:6d} {c['val_loss']:7.4f}")
    ttt = r["time_to_target_s"]
    print(f"time to val {TARGET}: {'not reached' if ttt is None else f'{ttt:.1f} s'}; final val "
          f"{r['final_val_loss']:.4f}; {r['tokens_per_s']:,.0f} tokens/s; "
          f"{r['flops_per_token'] / 1e6:.2f} MFLOP/token; MFU {100 * r['mfu']:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--only", choices=("classic", "modern"), default=None)
    ap.add_argument("--budget", default=None, help="modern's training time (default: classic's)")
    ap.add_argument("--preset", default="modern", help="preset of the modern run (default: modern)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the modern run (repeatable)")
    ap.add_argument("--evals", type=int, default=20, help="evaluations per run (default: 20)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()

    peak = measure_matmul_peak()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s", file=sys.stderr)
    print(f"# {cpu_name()}; native bf16: {'yes' if native_bf16('cpu') else 'no'}"
          + "".join(f"; {k}={os.environ[k]}" for k in ISA_LIMITS if k in os.environ),
          file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        budget = parse_duration(args.budget) if args.budget else None
        if args.only != "modern":
            classic = run("classic", CLASSIC, args.data, max(CLASSIC["max_steps"] // args.evals, 1),
                          Path(tmp), peak)
            results.append(classic)
            report(classic)
            budget = budget or classic["train_time_s"]
        if args.only != "classic":
            if budget is None:
                ap.error("--only modern needs --budget")
            settings = {"preset": args.preset, "max_time": f"{budget:.3f}s"}
            settings.update(dict(kv.split("=", 1) for kv in args.set))
            settings = {k: setting_value(v) if isinstance(v, str) and k not in ("max_time", "preset") else v
                        for k, v in settings.items()}
            # Evaluate about --evals times: estimate the step rate from a short warm-up run.
            probe = TrainConfig.resolve({**settings, "max_time": None, "max_steps": 1})
            steps_guess = _estimate_steps(probe, args.data, budget)
            modern = run("modern", settings, args.data, max(steps_guess // args.evals, 1),
                         Path(tmp), peak)
            results.append(modern)
            report(modern)
    if len(results) == 2 and results[0]["time_to_target_s"] and results[1]["time_to_target_s"]:
        c, m = results[0]["time_to_target_s"], results[1]["time_to_target_s"]
        print(f"\nmodern reaches {TARGET} in {m:.1f} s vs classic {c:.1f} s: {c / m:.1f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "runs": results}, indent=1))


def _estimate_steps(cfg: TrainConfig, data: str, budget: float) -> int:
    """How many steps ``budget`` seconds hold for this model (timed over a few steps); only
    used to space the evaluations."""
    import time

    from tinygpt.data import load_corpus
    from tinygpt.device import autocast_dtype
    from tinygpt.models import build_model
    from tinygpt.runs import configure_optimizer

    corpus = load_corpus(data)
    model = build_model(cfg.kind, cfg.model_config(corpus.tokenizer.vocab_size))
    opt = configure_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    amp = autocast_dtype(cfg.run.dtype, torch.device("cpu"))
    times = []
    for _ in range(8):
        x, y = corpus.get_batch("train", cfg.data.batch_size, cfg.model.block_size, gen)
        t = time.perf_counter()
        with torch.autocast("cpu", amp, enabled=amp is not None):
            _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    per_step = sorted(times)[len(times) // 2]
    if cfg.run.compile:  # not compiled here (that would warm the compile cache); a rough guess
        per_step /= 1.6
    return max(int(budget / per_step), 1)


if __name__ == "__main__":
    main()
