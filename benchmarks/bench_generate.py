"""Generation speed: the key/value cache against the reference loop that recomputes everything.

    python benchmarks/bench_generate.py                  # lecture-size model, 2000 chars, B=1 and 8
    python benchmarks/bench_generate.py --chars 300 --batch 1 --threads 1
    python benchmarks/bench_generate.py --batch 1 --decode-layout auto model linear transposed packed bag
    python benchmarks/bench_generate.py --batch 1 --no-int8     # without the int8 row

The model has the shape of the lecture's final one (6 layers, 6 heads, 384 wide, context 256,
vocabulary 65) with random weights: speed does not depend on what the weights say. Decoding is
greedy, so the two paths must produce the same tokens. The cached path is fed the reference's
text (its own choice is still computed at every step), so the logits of every step are compared
and must agree within --atol; its choice must be the reference's, except where the reference's
two best logits are themselves within 2 x --atol -- a tie that summation order may break either
way (a model with random weights has many near ties). It reports characters per second summed
over the batch, and, measured in the same run, how close each path comes to what the memory
allows: the memory's read bandwidth (a sum over a 512 MB tensor), the weights-read ceiling (one
``x @ W^T`` over every weight matrix of the model, the least work a cached step at batch 1 must
do, in each decode layout: the fastest is the ceiling) and, per path, its model-bandwidth
utilisation (MBU: the weight bytes a step reads times its steps per second, over the read
bandwidth) and its share of the ceiling. Both paths slide the context window the same way once
the text outgrows it (by --window-shift characters, default half the context); --window-shift 1
is the lecture's crop at every step, where the cache has nothing to reuse past the context
length.

--decode-layout picks how the cached path runs a step of one new token per sequence (one row
each): ``auto`` (the default: the model's forward on the engine's lean stand-ins of its layers,
each weight shape in the layout measured fastest on this CPU, printed below), ``linear`` /
``transposed`` / ``packed`` / ``bag`` (forced), ``model`` (the model itself, nn.Modules and all).

The int8 row (``--int8``, on by default) times the cached path (auto) over a copy of the model
with int8 weight-only linear layers (``--quantize int8``). Its MBU counts the int8 bytes it reads
(its own, smaller, weights); its ``ceil`` column is still the share of the float32 ceiling (the
int8 tables' own one-pass figure is printed above the table). It is another model, so its
tokens are compared with the float32 reference's but need not match: the check column says how
many steps chose the same token, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tinygpt.engine import DECODE_LAYOUTS, Engine  # noqa: E402
from tinygpt.engine.decode import LAYOUT_KERNELS, available_layouts  # noqa: E402
from tinygpt.engine.quantize import (  # noqa: E402
    Int8Linear,
    int8_linear,
    int8_weight_bytes,
    quantize_int8,
)
from tinygpt.generate import SamplingConfig, generate_tokens  # noqa: E402
from tinygpt.models import GPT, GPTConfig  # noqa: E402


def reference(model: GPT, prompts: torch.Tensor, n: int, window_shift: int | None = None
              ) -> tuple[float, list, list]:
    """The no-cache loop (generate_tokens), timed; also its tokens and last-position logits."""
    seen: list[torch.Tensor] = []
    # A copy of the last position's row: a view would keep every position's logits alive (at
    # 2000 chars, 133 MB per sequence), which slows the timed run that follows.
    hook = model.register_forward_hook(
        lambda m, args, out: seen.append(out[0][:, -1].float().clone()))
    try:
        t0 = time.perf_counter()
        steps = generate_tokens(model, prompts, n, SamplingConfig(temperature=0), None,
                                model.config.block_size, window_shift)
        tokens = [t.tolist() for t in steps]
        elapsed = time.perf_counter() - t0
    finally:
        hook.remove()
    return elapsed, tokens, seen


def cached(model: GPT, prompts: torch.Tensor, n: int, window_shift: int | None = None,
           layout: str = "auto", follow: list[list[int]] | None = None):
    """The engine, greedy, timed; also its tokens and logits per step. With ``follow`` (the
    reference's tokens per step) it appends those instead of its own choices, so that its
    logits can be compared with the reference's at every step."""
    engine = Engine(model, window_shift=window_shift, decode_layout=layout)
    t0 = time.perf_counter()
    states = [engine.new_sequence(p) for p in prompts.tolist()]
    tokens, seen = [], []
    for i in range(n):
        logits = engine.step(states)
        chosen = logits.argmax(dim=-1).tolist()
        for s, t in zip(states, chosen if follow is None else follow[i], strict=True):
            engine.append(s, t)
        tokens.append(chosen)
        seen.append(logits)
    elapsed = time.perf_counter() - t0
    if engine._decoder is not None and layout == "auto" and engine._decoder.choice:
        print("       auto layout: " + ", ".join(
            f"{o}x{i} {c}" for (o, i), c in sorted(engine._decoder.choice.items())))
    return elapsed, tokens, seen


def weight_matrices(model: GPT) -> list[torch.Tensor]:
    """Every weight matrix a decode step multiplies by: the model's own, its shapes and dtype."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


def best_seconds(fn, rounds: int = 20) -> float:
    """The shortest of ``rounds`` timed calls of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def one_pass_rate(kernels: list, in_features: list[int], dtype: torch.dtype, device) -> float:
    """Passes per second of ``kernels`` (x -> x @ W^T each), called in order on one row each."""
    xs = {k: torch.randn(1, k, dtype=dtype, device=device) for k in set(in_features)}

    def one_pass() -> None:
        for run, k in zip(kernels, in_features):
            run(xs[k])

    return 1.0 / best_seconds(one_pass)


def weights_ceilings(weights: list[torch.Tensor]) -> dict[str, float]:
    """Steps per second, per available decode layout, of the least work a cached step at batch 1
    must do: one ``x @ W^T`` over every weight matrix in that layout, in the model's order, each
    read once from memory. The best of them is the ceiling."""
    ks = [w.shape[1] for w in weights]
    return {layout: one_pass_rate([LAYOUT_KERNELS[layout](w, None)[0] for w in weights], ks,
                                  weights[0].dtype, weights[0].device)
            for layout in available_layouts()}


def int8_ceiling(model: torch.nn.Module) -> float:
    """The same for the int8 layers of ``model``: one pass of their kernel over every table."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    kernels = [functools.partial(int8_linear, packed=m.weight_packed, parts=m.parts)
               for m in layers]  # as a decode step calls them: no nn.Module in between
    return one_pass_rate(kernels, [m.in_features for m in layers], torch.float32, "cpu")


def read_bandwidth(mbytes: int = 512) -> float:
    """Bytes per second the memory delivers to a reduction over a tensor far larger than the
    caches (``mbytes`` MB of float32, summed)."""
    t = torch.ones(mbytes * 2**20 // 4)
    return t.numel() * 4 / best_seconds(t.sum, rounds=5)


def compare_choices(tokens: list[list[int]], ref_tokens: list[list[int]],
                    ref_logits: list[torch.Tensor], tie: float) -> tuple[int, int]:
    """(near ties, real differences) among the rows where the cached path chose another token
    than the reference: a near tie is a row whose two best reference logits are within ``tie``."""
    ties = wrong = 0
    for step, ref_step, logits in zip(tokens, ref_tokens, ref_logits, strict=True):
        for row, (a, b) in enumerate(zip(step, ref_step, strict=True)):
            if a != b:
                top2 = logits[row].topk(2).values
                if (top2[0] - top2[1]).item() <= tie:
                    ties += 1
                else:
                    wrong += 1
    return ties, wrong


def int8_row(model: GPT, prompts: torch.Tensor, args, tok_ref, lg_ref, t_ref: float, use) -> str:
    """The table's row of the cached path over int8 weights (its tokens need not match)."""
    t, toks, lgs = cached(model, prompts, args.chars, args.window_shift, "auto", follow=tok_ref)
    worst = max((a - b).abs().max().item() for a, b in zip(lgs, lg_ref, strict=True))
    same = sum(a == b for step, ref in zip(toks, tok_ref) for a, b in zip(step, ref))
    total = prompts.size(0) * args.chars
    return (f"{prompts.size(0):>5}  {'kv cache (int8, auto)':<28} {t:8.2f} {total / t:9.1f} "
            f"{t_ref / t:8.2f} {use(t, int8_weight_bytes(model))}  {same / total:.1%} of the "
            f"tokens the same, max |dlogit| {worst:.1e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chars", type=int, default=2000, help="characters per sample (default 2000)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--pos", choices=("learned", "rope"), default="learned")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--window-shift", type=int, default=None,
                   help="characters the window jumps by past the context (default: half of it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--decode-layout", nargs="+", default=["auto"], choices=DECODE_LAYOUTS,
                   help="cached paths to time (default: auto)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the cached path over int8 weights (default: yes)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    cfg = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0,
                    pos_embedding=args.pos)
    model = GPT(cfg).to(args.device).eval()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {args.pos} positions, context "
          f"{cfg.block_size}; {args.chars} chars per sample; device {args.device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    weights = weight_matrices(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    bandwidth = read_bandwidth()
    ceilings = weights_ceilings(weights)
    ceiling = max(ceilings.values())
    print(f"memory: {bandwidth / 1e9:.1f} GB/s read (a sum over 512 MB); weights {len(weights)} "
          f"matrices, {weight_bytes / 1e6:.1f} MB: ceiling {ceiling:,.0f} steps/s at batch 1 "
          f"(one x @ W^T over each, {ceiling * weight_bytes / 1e9:.1f} GB/s)")
    print("  one pass by layout: " + ", ".join(
        f"{name} {rate:,.0f}/s ({rate * weight_bytes / 1e9:.1f} GB/s)"
        for name, rate in ceilings.items()))
    int8_model = quantize_int8(copy.deepcopy(model)) if args.int8 else None
    if int8_model is not None and args.device == "cpu":
        rate, nbytes = int8_ceiling(int8_model), int8_weight_bytes(int8_model)
        print(f"  one pass over the int8 tables ({nbytes / 1e6:.1f} MB): {rate:,.0f}/s "
              f"({rate * nbytes / 1e9:.1f} GB/s)")
    print("  MBU: weight bytes a step reads x steps/s over the memory's read bandwidth; "
          "ceiling: steps/s over the ceiling's")
    print(f"{'batch':>5}  {'path':<28} {'seconds':>8} {'chars/s':>9} {'speed-up':>8} "
          f"{'steps/s':>8} {'MBU':>5} {'ceil':>5}  check")

    def use(seconds: float, nbytes: int = weight_bytes) -> str:
        steps = args.chars / seconds
        return (f"{steps:8.1f} {steps * nbytes / bandwidth:5.0%} "
                f"{steps / ceiling:5.0%}")
    ok = True
    for B in args.batch:
        prompts = torch.arange(B, device=args.device)[:, None] % cfg.vocab_size  # (B, 1)
        t_ref, tok_ref, lg_ref = reference(model, prompts, args.chars, args.window_shift)
        total = B * args.chars
        print(f"{B:>5}  {'no cache (generate_tokens)':<28} {t_ref:8.2f} {total / t_ref:9.1f} "
              f"{1.0:8.2f} {use(t_ref)}")
        for layout in args.decode_layout:
            t, toks, lgs = cached(model, prompts, args.chars, args.window_shift, layout,
                                  follow=tok_ref)
            worst = max((a - b).abs().max().item() for a, b in zip(lgs, lg_ref, strict=True))
            ties, wrong = compare_choices(toks, tok_ref, lg_ref, 2 * args.atol)
            ok &= not wrong and worst <= args.atol
            verdict = ("DIFFER" if wrong else "identical" if not ties
                       else f"identical but {ties} near-tie(s)")
            print(f"{B:>5}  {'kv cache (' + layout + ')':<28} {t:8.2f} {total / t:9.1f} "
                  f"{t_ref / t:8.2f} {use(t)}  tokens {verdict}, max |dlogit| {worst:.1e}")
            sys.stdout.flush()
        if int8_model is not None:
            print(int8_row(int8_model, prompts, args, tok_ref, lg_ref, t_ref, use))
    if not ok:
        print("MISMATCH: the cached path does not reproduce the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
