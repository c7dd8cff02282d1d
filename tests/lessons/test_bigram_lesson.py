"""The bigram lesson: the counted table is the optimum, the trained model approaches it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinygpt.evaluate import evaluate_tokens
from tinygpt.lessons.bigram import count_pairs, counted_probs, optimum_loss
from tinygpt.models.bigram import BigramConfig, BigramLM


def test_counts_and_optimum():
    toks = np.array([0, 1, 0, 1, 1, 2], dtype=np.uint16)
    counts = count_pairs(toks, 4)
    assert counts[0, 1] == 2 and counts[1, 0] == 1 and counts[1, 1] == 1 and counts[1, 2] == 1
    assert counts.sum() == 5
    p = counted_probs(counts)
    torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.all(p[3] == 0.25)  # never seen: uniform
    # The loss of the model whose table is log P equals the closed form, and beats others.
    expected = -(2 * np.log(1.0) + 3 * np.log(1 / 3)) / 5
    assert optimum_loss(counts) == pytest.approx(expected)
    model = BigramLM(BigramConfig(4))
    with torch.no_grad():
        model.token_embedding_table.weight.copy_(p.clamp_min(1e-12).log())
    assert evaluate_tokens(model, toks, 3)["val_loss"] == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():
        model.token_embedding_table.weight.add_(0.3 * torch.randn(4, 4))
    assert evaluate_tokens(model, toks, 3)["val_loss"] > expected


@pytest.mark.slow  # 10-30 s on a 2-core AVX2 machine
def test_bigram_command(small_text, tmp_path, cli):
    out = tmp_path / "bigram"
    proc = cli("lesson", "bigram", "--data", small_text, "--steps", "300", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "best possible on the training text" in proc.stdout
    info = json.loads((out / "bigram.json").read_text())
    assert info["learned_train_loss"] >= info["optimum_train_loss"] - 1e-6
    assert info["learned_train_loss"] - info["optimum_train_loss"] < 0.6  # approaching the optimum
    tv = [t for _, t in info["convergence"]]
    assert [s for s, _ in info["convergence"]] == list(range(0, 301, 30))
    assert tv[-1] < tv[0] / 2 and tv[-1] == info["total_variation"]  # the tables converge
    assert len(info["sample"]) == 500 and info["sample"] in proc.stdout
    assert (out / "bigram.png").read_bytes()[:4] == b"\x89PNG"
