"""One Muon step over the `modern` preset's block matrices: torch.optim.Muon against tinygpt's.

    python benchmarks/bench_muon.py                      # 50 timed steps each
    python benchmarks/bench_muon.py --repeat 200 --threads 2

The matrices are those of the model `--preset modern` trains (4 layers; per layer attn.c_attn,
attn.c_proj, mlp.c_fc, mlp.c_proj), with random gradients: the cost of a step does not depend on
what the gradients say. Rows:

- ``torch.optim.Muon``: the stock optimizer; its Newton-Schulz iterations are always bfloat16,
  one matrix after another.
- ``tinygpt Muon, bf16`` / ``fp32``: tinygpt's, with the iterations forced to each precision,
  matrices of one shape stacked into one batched product. In float32 the wide stacks take the
  Gram order of the products (``newton_schulz_gram``); ``fp32, direct`` turns that off.

On a CPU without native bf16 (AVX2 only) the bf16 rows are emulated and many times slower than
fp32; tinygpt picks fp32 there by itself (the ``auto`` row shows what it picks here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tinygpt.config import TrainConfig  # noqa: E402
from tinygpt.device import native_bf16  # noqa: E402
from tinygpt.models import build_model  # noqa: E402
from tinygpt.optim import Muon, split_parameters  # noqa: E402

VOCAB = 65  # Tiny Shakespeare's characters


def modern_matrices(preset: str) -> list[torch.nn.Parameter]:
    """The block matrices Muon trains in ``preset``'s model, each with a random gradient."""
    cfg = TrainConfig.resolve({"preset": preset})
    torch.manual_seed(0)
    model = build_model(cfg.kind, cfg.model_config(VOCAB))
    matrices = [p for _, p in split_parameters(model)["matrices"]]
    for p in matrices:
        p.grad = torch.randn_like(p)
    return matrices


def time_steps(make_optimizer, params, warmup: int, repeat: int) -> list[float]:
    """Milliseconds of each of ``repeat`` steps, after ``warmup`` untimed ones."""
    opt = make_optimizer(params)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="modern")
    ap.add_argument("--repeat", type=int, default=50, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    params = modern_matrices(args.preset)
    shapes = sorted({tuple(p.shape) for p in params})
    auto = "bf16" if native_bf16("cpu") else "fp32"
    print(f"# {len(params)} matrices of shapes {shapes}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; native bf16 here: {native_bf16('cpu')} (auto -> {auto})")
    rows = {
        "torch.optim.Muon (bf16)": lambda ps: torch.optim.Muon(
            ps, lr=0.02, weight_decay=0.0, adjust_lr_fn="original"),
        "tinygpt Muon, bf16": lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.bfloat16),
        "tinygpt Muon, fp32, direct": lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32,
                                                      gram=False),
        "tinygpt Muon, fp32": lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32),
        f"tinygpt Muon, auto ({auto})": lambda ps: Muon(ps, lr=0.02),
    }
    print(f"{'optimizer':<30} {'median ms/step':>15} {'min ms/step':>12}")
    for name, make in rows.items():
        times = time_steps(make, params, args.warmup, args.repeat)
        print(f"{name:<30} {statistics.median(times):>15.2f} {min(times):>12.2f}")


if __name__ == "__main__":
    main()
