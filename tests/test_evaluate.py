import math

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.evaluate import evaluate_tokens
from tinygpt.models import GPT, GPTConfig


def test_whole_split_loss_equals_the_window_by_window_reference():
    """Every token after the first is predicted once, in non-overlapping windows of T."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    tokens = np.random.default_rng(0).integers(0, 9, size=61).astype(np.uint16)
    result = evaluate_tokens(model, tokens, block_size=8, batch_size=3)
    total, count = 0.0, 0
    t = torch.from_numpy(tokens.astype(np.int64))
    for start in range(0, 60, 8):
        x = t[start : min(start + 8, 60)]
        y = t[start + 1 : min(start + 9, 61)]
        logits, _ = model(x[None])
        total += F.cross_entropy(logits[0], y, reduction="sum").item()
        count += len(y)
    assert result["tokens"] == count == 60
    assert math.isclose(result["val_loss"], total / count, rel_tol=1e-6)
    assert math.isclose(result["bits_per_char"], result["val_loss"] / math.log(2))


def test_evaluation_is_deterministic_and_batch_size_independent():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.3))
    model.train()  # evaluation must switch dropout off by itself
    tokens = np.random.default_rng(1).integers(0, 9, size=100).astype(np.uint16)
    a = evaluate_tokens(model, tokens, 8, batch_size=1)
    b = evaluate_tokens(model, tokens, 8, batch_size=64)
    assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-6)
    assert model.training
