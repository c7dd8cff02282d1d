"""The no-mask lesson: the honest loss sees through a model built to cheat, equals the usual
loss for a causal model, and the command shows the gap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from tinygpt.lessons.no_mask import honest_loss, reported_loss
from tinygpt.models.gpt import GPT, GPTConfig

V = 7


class Cheater(nn.Module):
    """Predicts each next token by reading it from the input (position t + 1): perfect when it
    can see the future, a uniform guess at the last position, where there is none."""

    def forward(self, idx, targets=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, V)
        nxt = nn.functional.one_hot(idx[:, 1:], V).float() * 50.0  # (B, T-1, V)
        logits[:, :-1] = nxt
        return logits, None


def tokens(n=400, seed=0):
    return np.random.default_rng(seed).integers(0, V, n).astype(np.uint16)


def test_cheater_looks_perfect_but_is_honestly_uniform():
    toks = tokens()
    T = 8
    assert reported_loss(Cheater(), toks, T) == pytest.approx((T - 1) / T * 0 + math.log(V) / T, abs=1e-4)
    # From the prefix alone, every prediction is made at the last position: ln V each.
    assert honest_loss(Cheater(), toks, T) == pytest.approx(math.log(V), abs=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_honest_equals_reported_only_for_a_causal_model(causal):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                          causal=causal))
    toks = tokens()
    a, b = reported_loss(model, toks, 8, n_windows=16), honest_loss(model, toks, 8, n_windows=16)
    if causal:
        assert a == pytest.approx(b, abs=1e-5)
    else:
        assert abs(a - b) > 1e-4


@pytest.mark.slow  # 25-60 s on a 2-core AVX2 machine
def test_no_mask_command(small_text, tmp_path, cli):
    out = tmp_path / "lesson"
    proc = cli("lesson", "no-mask", "--data", small_text, "--steps", "120", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "honest loss" in proc.stdout and "sample from the no-mask model" in proc.stdout
    results = {r["name"]: r for r in json.loads((out / "no_mask.json").read_text())["results"]}
    causal, cheat = results["causal"], results["no-mask"]
    # Already after 120 steps the cheating model reports a far lower loss than it achieves
    # honestly; for the causal model the two are the same number.
    assert cheat["honest_loss"] - cheat["val_loss"] > 0.3
    assert abs(causal["honest_loss"] - causal["val_loss"]) < 1e-4
    for name in ("no_mask.png", "attention-causal.png", "attention-no-mask.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
