"""Deterministic evaluation: the loss over a whole split, not over random batches.

The split is cut into consecutive, non-overlapping windows of ``block_size`` tokens (the last one
may be shorter); every token after the first is predicted exactly once. The mean cross-entropy
is reported in nats per token (``val_loss``) and in bits per character: the total loss in nats
over the predicted tokens, divided by the number of characters they spell and by ln 2. With one
token per character the two differ only by the factor ln 2; with BPE a token spells several
characters, and bits per character is the figure that compares tokenizers fairly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.models.modes import eval_mode
from tinygpt.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    tokenizer: Tokenizer | None = None,
) -> dict:
    """Mean loss of ``model`` over ``tokens`` (a 1-D array) in windows of ``block_size``.

    ``tokenizer`` tells how many characters the predicted tokens spell (default: one each).
    """
    n = len(tokens) - 1  # number of predictions
    if n < 1:
        raise ValueError("need at least two tokens to evaluate")
    total = 0.0
    n_full = n // block_size
    with eval_mode(model):
        starts = np.arange(n_full) * block_size
        offsets = np.arange(block_size + 1)
        for i in range(0, n_full, batch_size):
            idx = starts[i : i + batch_size, None] + offsets[None, :]  # (b, T+1)
            chunk = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            total += _sum_loss(model, chunk)
        tail = n - n_full * block_size
        if tail:
            last = np.asarray(tokens[n_full * block_size :], dtype=np.int64)
            total += _sum_loss(model, torch.from_numpy(last)[None, :].to(device))
    loss = total / n
    chars = n if tokenizer is None else count_chars(tokenizer, tokens[1:])
    return {"val_loss": loss, "bits_per_char": total / max(chars, 1) / math.log(2), "tokens": n,
            "chars": chars}


def count_chars(tokenizer: Tokenizer, tokens: np.ndarray, chunk: int = 1 << 16) -> int:
    """Characters that ``tokens`` decode to, counted chunk by chunk (a long split never becomes
    one Python string)."""
    if tokenizer.kind == "char":
        return len(tokens)
    decoder = tokenizer.text_decoder()
    n = 0
    for i in range(0, len(tokens), chunk):
        n += len(decoder.push_many(np.asarray(tokens[i : i + chunk]).tolist()))
    return n + len(decoder.flush())


def _sum_loss(model: nn.Module, chunk: torch.Tensor) -> float:
    x, y = chunk[:, :-1], chunk[:, 1:]
    logits, _ = model(x)
    logits = logits.reshape(-1, logits.size(-1)).float()
    loss = F.cross_entropy(logits, y.reshape(-1), reduction="sum")
    return loss.item()
