"""The lessons' training loop: the lecture's, flat and short.

Sample a batch, forward, loss, backward, AdamW step; every ``eval_interval`` steps estimate the
train and val loss on a few random batches (the lecture's ``estimate_loss``). At the end the
model is scored on the whole validation split (``tinygpt.evaluate``), which is deterministic and
comparable across models. The full training machinery (checkpoints, schedules, resuming) is
``tinygpt.train``; the lessons do not need it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.data import Corpus
from tinygpt.evaluate import evaluate_tokens
from tinygpt.models.modes import eval_mode


@dataclass
class Hyper:
    """How one model is trained (the lecture's names)."""

    batch_size: int = 32
    block_size: int = 8
    lr: float = 1e-3
    max_iters: int = 5000
    eval_interval: int = 500
    eval_iters: int = 20  # batches per estimate (the lecture uses 200; the final score is exact)
    time_limit_s: float | None = None  # stop early after this much training time

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time limit must be positive, got {self.time_limit_s!r}")


@dataclass
class Trained:
    """What training one model produced."""

    model: nn.Module
    steps: int
    seconds: float  # training time (estimates and the final score excluded)
    train_loss: float  # the last estimate on training batches
    val_loss: float  # whole validation split, nats per character
    bits_per_char: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train, val)


@torch.no_grad()
def estimate_loss(model: nn.Module, corpus: Corpus, hp: Hyper, seed: int) -> dict[str, float]:
    """Mean loss over ``eval_iters`` random batches of each split (same batches every call)."""
    out = {}
    with eval_mode(model):  # no dropout while measuring
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(seed)
            losses = [
                model(*corpus.get_batch(split, hp.batch_size, hp.block_size, gen))[1].item()
                for _ in range(hp.eval_iters)
            ]
            out[split] = sum(losses) / len(losses)
    return out


def train_model(
    model: nn.Module, corpus: Corpus, hp: Hyper, seed: int = 1337,
    on_eval: Callable[[int, nn.Module], None] | None = None,
) -> Trained:
    """Train ``model`` (any ``forward(idx, targets) -> (logits, loss)``) with AdamW on ``corpus``.

    ``on_eval(step, model)`` is called after every estimate (to record more than the loss).
    """
    corpus.check_block_size(hp.block_size)
    torch.manual_seed(seed)  # dropout
    batches = torch.Generator().manual_seed(seed)  # the same batches for every model
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr)
    curve: list[tuple[int, float, float]] = []

    def evaluate(step: int) -> None:
        est = estimate_loss(model, corpus, hp, seed + 1)
        curve.append((step, est["train"], est["val"]))
        if on_eval is not None:
            on_eval(step, model)

    model.train()
    spent = 0.0
    step = 0
    while True:
        if step % hp.eval_interval == 0 or step == hp.max_iters:
            evaluate(step)
        out_of_time = hp.time_limit_s is not None and spent >= hp.time_limit_s
        if step == hp.max_iters or out_of_time:
            if curve[-1][0] != step:
                evaluate(step)
            break
        t0 = time.perf_counter()
        xb, yb = corpus.get_batch("train", hp.batch_size, hp.block_size, batches)  # (B, T) each
        _, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        spent += time.perf_counter() - t0
        step += 1
    model.eval()
    score = evaluate_tokens(model, corpus.split("val"), hp.block_size, batch_size=256)
    return Trained(model, step, spent, curve[-1][1], score["val_loss"], score["bits_per_char"], curve)


@torch.no_grad()
def generate(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, block_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The lecture's ``generate``: extend ``idx`` (B, T) one sampled token at a time, looking at
    the last ``block_size`` tokens (the most a model with position embeddings can see)."""
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])  # (B, T, V)
            probs = F.softmax(logits[:, -1, :].float(), dim=-1)  # (B, V): the last position's guess
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
    return idx


def sample_text(model: nn.Module, corpus: Corpus, n_chars: int, block_size: int, seed: int) -> str:
    """``n_chars`` characters sampled from ``model``, starting from a newline (or the first
    character of the vocabulary if the text has no newline)."""
    tok = corpus.tokenizer
    start = "\n" if not tok.unknown_chars("\n") else tok.decode([0])
    idx = torch.tensor([tok.encode(start)], dtype=torch.long)
    out = generate(model, idx, n_chars, block_size, torch.Generator().manual_seed(seed))
    return tok.decode(out[0, 1:].tolist())


def one_line(text: str) -> str:
    """``text`` on one line: newlines shown as ⏎."""
    return text.replace("\n", "⏎")
