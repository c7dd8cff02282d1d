"""The training loop: sample a batch, compute the loss, backpropagate, step the optimizer.

Around that core: a learning-rate schedule (linear warmup, then cosine decay), gradient clipping,
periodic evaluation on fixed batches, a progress bar, ``metrics.jsonl`` and checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from tinygpt.checkpoint import save_checkpoint
from tinygpt.config import TrainConfig
from tinygpt.data import BUILTIN_DATASETS, Corpus, load_corpus
from tinygpt.errors import TinyGPTError
from tinygpt.generate import SamplingConfig, generate_tokens, make_generator
from tinygpt.models import build_model
from tinygpt.tokenizer import CharTokenizer


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TinyGPTError(f"--device {name} asked for, but CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TinyGPTError("--device mps asked for, but MPS is not available here")
    return torch.device(name)


def lr_at(step: int, progress: float, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate for ``step``: linear warmup over ``warmup_steps``, then cosine decay.

    ``progress`` in [0, 1] is how far through the run we are (steps done / max steps, or time used
    / time budget), so the same curve stretches over a step count or a wall-clock budget.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and embeddings, none on biases and norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    model: nn.Module
    tokenizer: CharTokenizer
    sample: str


def _data_record(cfg: TrainConfig, corpus: Corpus) -> dict:
    spec = cfg.data
    if not (spec in BUILTIN_DATASETS and not Path(spec).exists()):
        spec = str(Path(spec).expanduser().resolve())
    return {
        "spec": spec,
        "fingerprint": corpus.fingerprint,
        "encoding_errors": cfg.encoding_errors,
        "num_tokens": len(corpus.tokens),
    }


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    existing = [run_dir / n for n in ("last", "best", "metrics.jsonl") if (run_dir / n).exists()]
    if existing and not overwrite:
        raise TinyGPTError(
            f"{run_dir} already holds a run; choose another --out or pass --overwrite to replace it"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def estimate_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    progress_bar: bool | None = None,
) -> TrainResult:
    """Train a model as ``cfg`` says; returns the final model and its losses.

    ``progress_bar=None`` shows the bar only when stderr is a terminal.
    """
    run_dir = Path(cfg.run_dir)
    device = pick_device(cfg.device)
    corpus = load_corpus(cfg.data, cfg.encoding_errors)
    corpus.check_block_size(cfg.block_size)
    tokenizer = corpus.tokenizer
    _prepare_run_dir(run_dir, cfg.overwrite)

    torch.manual_seed(cfg.seed)
    model_config = cfg.model_config(tokenizer.vocab_size)
    model = build_model(cfg.model, model_config).to(device)
    optimizer = configure_optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model {cfg.model} ({cfg.preset}): {n_params / 1e6:.3f}M parameters, vocab "
        f"{tokenizer.vocab_size}, {len(corpus.tokens):,} tokens, device {device}, run {run_dir}"
    )

    # Batches come from their own generators: training draws never depend on evaluation.
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    B, T = cfg.batch_size, cfg.block_size
    eval_batches = {
        split: [
            tuple(t.to(device) for t in corpus.get_batch(split, B, T, eval_gen))
            for _ in range(cfg.eval_iters)
        ]
        for split in ("train", "val")
    }

    max_steps, max_time = cfg.max_steps, cfg.max_time_s
    min_lr = cfg.lr * cfg.min_lr_ratio
    base_state = {
        "model": cfg.model,
        "model_config": model_config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "train_config": cfg.to_dict(),
        "data": _data_record(cfg, corpus),
    }
    metrics_path = run_dir / "metrics.jsonl"
    best_val = math.inf
    train_loss = val_loss = math.nan
    tokens_per_s = 0.0

    def progress_of(step: int, elapsed: float) -> float:
        p = 0.0
        if max_steps:
            span = max(max_steps - cfg.warmup_steps, 1)
            p = max(p, (step - cfg.warmup_steps) / span)
        if max_time:
            p = max(p, elapsed / max_time)
        return p

    def evaluate_and_save(step: int, elapsed: float, lr: float) -> None:
        nonlocal best_val, train_loss, val_loss
        train_loss = estimate_loss(model, eval_batches["train"])
        val_loss = estimate_loss(model, eval_batches["val"])
        record = {
            "step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
            "tokens": step * B * T, "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 1),
        }
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        state = {**base_state, "step": step, "train_loss": train_loss, "val_loss": val_loss,
                 "best_val_loss": best_val, "elapsed_s": elapsed}
        save_checkpoint(run_dir / "last", model, optimizer, state)
        if improved:
            save_checkpoint(run_dir / "best", model, None, state)
        bar.write(f"step {step:>6}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")

    total = max_steps if max_time is None else None
    bar = tqdm(total=total, disable=(not progress_bar) if progress_bar is not None else None,
               unit="step", dynamic_ncols=True, leave=False)
    model.train()
    step, elapsed = 0, 0.0
    lr = lr_at(0, 0.0, cfg.lr, min_lr, cfg.warmup_steps)
    t0 = time.perf_counter()
    try:
        while True:
            elapsed = time.perf_counter() - t0
            done = (max_steps is not None and step >= max_steps) or (
                max_time is not None and elapsed >= max_time
            )
            if step % cfg.eval_interval == 0 or done:
                evaluate_and_save(step, elapsed, lr)
            if done:
                break

            lr = lr_at(step, progress_of(step, elapsed), cfg.lr, min_lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t_step = time.perf_counter()
            x, y = corpus.get_batch("train", B, T, batch_gen)
            x, y = x.to(device), y.to(device)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = torch.zeros(())
            loss_value = loss.item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
                raise TinyGPTError(
                    f"loss became {loss_value} (gradient norm {grad_norm.item()}) at step {step}; "
                    f"training stopped before the update -- try a lower --lr"
                )
            optimizer.step()
            step += 1
            dt = time.perf_counter() - t_step
            rate = B * T / max(dt, 1e-9)
            tokens_per_s = rate if step == 1 else 0.9 * tokens_per_s + 0.1 * rate
            bar.update(1)
            postfix = {"loss": f"{loss_value:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if max_time is not None:
                postfix["left"] = f"{max(max_time - elapsed, 0):.0f}s"
            bar.set_postfix(postfix, refresh=False)
    finally:
        bar.close()

    sample = ""
    if cfg.sample_chars:
        sample = sample_text(model, tokenizer, cfg.sample_chars, seed=cfg.seed, device=device,
                             block_size=getattr(model_config, "block_size", 1))
    return TrainResult(run_dir, step, train_loss, val_loss, best_val, model, tokenizer, sample)


def sample_text(
    model: nn.Module,
    tokenizer: CharTokenizer,
    num_chars: int,
    seed: int,
    device: torch.device | str = "cpu",
    block_size: int = 1,
    prompt: str = "\n",
) -> str:
    """A sample started from ``prompt`` (a newline if the vocabulary has one)."""
    ids = tokenizer.encode(prompt) if not tokenizer.unknown_chars(prompt) else [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = make_generator(seed, device)
    out = [int(t[0]) for t in generate_tokens(model, idx, num_chars, SamplingConfig(), gen, block_size)]
    return tokenizer.decode(out)
