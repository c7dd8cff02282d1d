"""Tokenise-and-train on generated corpora of growing size: throughput and peak memory.

    python benchmarks/bench_corpus.py                 # 1 MB and 300 MB
    python benchmarks/bench_corpus.py --sizes 1,50    # other sizes, in MB

For each size a text of that many bytes (words over a mixed ASCII / non-ASCII alphabet, so the
UTF-8 decoder has real work) is written to a temporary folder. A fresh Python process then
tokenises it into the memory-mapped token cache, opens the cache a second time (the cached
path), and trains a small GPT for a few steps on it. Each process reports its own peak resident
memory, so the sizes can be compared: if reading were not streamed, or the tokens not
memory-mapped, the peak would grow with the size of the text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1_000_000
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöüßéèçñøåλπΩ"


def write_text(path: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes of word-like UTF-8 text, generated and written 1 MB at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list(ALPHABET))
    words = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(5000)]
    words = np.array(words + [",", ".", "\n"] * 200)
    written = 0
    with open(path, "wb") as f:
        while written < size:
            chunk = (" ".join(rng.choice(words, 250_000)) + "\n").encode("utf-8")
            chunk = chunk[: size - written]
            while chunk and (chunk[-1] & 0xC0) == 0x80:  # do not cut a character in two
                chunk = chunk[:-1]
            if chunk and chunk[-1] >= 0xC0:
                chunk = chunk[:-1]
            if not chunk:
                break
            f.write(chunk)
            written += len(chunk)


def memory_mb() -> dict:
    """Resident memory now, split into anonymous (heap) and file-backed (mapped files) pages.

    Linux only (/proc); elsewhere just the peak. Pages of the memory-mapped token cache count as
    file-backed: the kernel can drop them at any time, unlike the heap.
    """
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        out["VmHWM"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def child(text: Path, work: Path, steps: int) -> dict:
    """Runs in its own process: tokenise, reopen, train; returns the measurements."""
    os.environ["TINYGPT_HOME"] = str(work / "home")
    import torch

    from tinygpt.config import TrainConfig
    from tinygpt.data import load_corpus
    from tinygpt.train import train

    torch.set_num_threads(1)
    after_import = memory_mb()
    size = text.stat().st_size

    t = time.perf_counter()
    corpus = load_corpus(text)
    tokenise_s = time.perf_counter() - t
    after_tokenise = memory_mb()
    n_tokens = len(corpus.tokens)
    del corpus

    t = time.perf_counter()
    corpus = load_corpus(text)  # the cache is valid: only a stat() of the text and a memory map
    reopen_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # random windows all over the cache, as training draws them
        corpus.get_batch("train", 16, 64, gen)
    after_batches = memory_mb()
    del corpus

    cfg = TrainConfig.resolve({
        "data": str(text), "out": str(work / "run"), "n_layer": 2, "n_head": 2, "n_embd": 32,
        "block_size": 64, "batch_size": 16, "max_steps": steps, "eval_interval": steps,
        "eval_iters": 2, "warmup_steps": 0, "sample_chars": 0, "device": "cpu",
    })
    t = time.perf_counter()
    train(cfg, log=lambda s: None, progress_bar=False, handle_signals=False)
    train_s = time.perf_counter() - t
    after_train = memory_mb()
    return {
        "mb": size / MB, "tokens": n_tokens, "tokenise_s": tokenise_s,
        "tokenise_mb_per_s": size / MB / tokenise_s, "reopen_s": reopen_s,
        "train_s": train_s, "peak_rss_mb": peak_rss_mb(),
        "after_import": after_import, "after_tokenise": after_tokenise,
        "after_batches": after_batches, "after_train": after_train,
        "token_cache_mb": sum(p.stat().st_size for p in (work / "home").rglob("tokens.bin")) / MB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,300", help="text sizes in MB (default: 1,300)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default: 5)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", nargs=2, metavar=("TEXT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.steps)))
        return 0

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="tinygpt-bench-") as tmp:
        for mb in [float(s) for s in args.sizes.split(",")]:
            work = Path(tmp) / f"{mb:g}MB"
            work.mkdir()
            text = work / "corpus.txt"
            t = time.perf_counter()
            write_text(text, int(mb * MB))
            gen_s = time.perf_counter() - t
            proc = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--child", str(text),
                 str(work)], env=env, capture_output=True, text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append({**measured, "generate_s": gen_s})
            for p in sorted(work.rglob("*"), reverse=True):  # free the disk before the next size
                p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    base = results[0]

    def heap(r: dict) -> float:
        return r["after_batches"].get("RssAnon", math.nan)

    def mapped(r: dict) -> float:
        return r["after_batches"].get("RssFile", math.nan) - r["after_tokenise"].get(
            "RssFile", math.nan)

    print(f"{'text MB':>8} {'tokens':>12} {'tokenise s':>10} {'MB/s':>6} {'reopen s':>8} "
          f"{f'{args.steps}-step s':>9} {'peak RSS':>8} {'vs first':>8} {'heap':>6} "
          f"{'vs first':>8} {'mapped':>7}")
    for r in results:
        print(f"{r['mb']:>8.0f} {r['tokens']:>12,} {r['tokenise_s']:>10.2f} "
              f"{r['tokenise_mb_per_s']:>6.1f} {r['reopen_s']:>8.3f} {r['train_s']:>9.2f} "
              f"{r['peak_rss_mb']:>8.0f} {r['peak_rss_mb'] - base['peak_rss_mb']:>+8.0f} "
              f"{heap(r):>6.0f} {heap(r) - heap(base):>+8.0f} {mapped(r):>7.0f}")
    print("MB. peak RSS: the whole process (tokenise, 200 batches, training). heap: anonymous "
          "resident memory after\ntokenising and drawing 200 batches; mapped: pages of the "
          "memory-mapped token cache resident then\n(file-backed: the kernel drops them under "
          "memory pressure; they are not a copy of the corpus).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
