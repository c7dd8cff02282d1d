import json
import math

import numpy as np
import pytest
import torch

from tinygpt.data import load_corpus
from tinygpt.models import BigramConfig, BigramLM


def test_bigram_logits_depend_only_on_the_current_token():
    model = BigramLM(BigramConfig(vocab_size=7))
    idx = torch.tensor([[1, 2, 3, 2]])
    logits, _ = model(idx)
    assert logits.shape == (1, 4, 7)
    assert torch.equal(logits[0, 1], logits[0, 3])  # same token -> same row of the table


def test_initial_loss_is_ln_vocab_on_shakespeare(shakespeare):
    corpus = load_corpus("shakespeare")
    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=corpus.tokenizer.vocab_size))
    x, y = corpus.get_batch("val", 32, 8, torch.Generator().manual_seed(0))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


def count_bigram_val_loss(train: np.ndarray, val: np.ndarray, vocab: int, alpha: float) -> float:
    """Val cross-entropy of the count-based bigram fitted on ``train`` (add-alpha smoothing).

    This is the closed-form maximum-likelihood solution the trained table approaches; a small
    alpha only keeps bigrams unseen in train from costing infinity on val.
    """
    counts = np.full((vocab, vocab), alpha)
    np.add.at(counts, (train[:-1], train[1:]), 1)
    probs = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log(probs[val[:-1], val[1:]]).mean())


@pytest.mark.slow  # 25-60 s on a 2-core AVX2 machine
def test_cli_bigram_reaches_the_count_based_optimum(shakespeare, cli, tmp_path):
    """The mid-term assignment through the CLI: within 0.03 of the closed-form optimum."""
    run = tmp_path / "bigram"
    proc = cli("train", "--model", "bigram", "--data", "shakespeare", "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert "--- sample ---" in proc.stdout
    result = json.loads(cli("eval", run, "--json", check=True).stdout)
    corpus = load_corpus("shakespeare")
    train = np.asarray(corpus.split("train"), dtype=np.int64)
    val = np.asarray(corpus.split("val"), dtype=np.int64)
    optimum = count_bigram_val_loss(train, val, corpus.tokenizer.vocab_size, alpha=0.01)
    assert 2.4 < optimum < 2.55
    assert abs(result["val_loss"] - optimum) < 0.03, (result, optimum)
    assert result["tokens"] == len(val) - 1


@pytest.mark.parametrize("alpha", [1e-3, 1e-2])
def test_count_bigram_optimum_beats_uniform(alpha, small_text):
    corpus = load_corpus(small_text)
    tokens = np.asarray(corpus.tokens, dtype=np.int64)
    loss = count_bigram_val_loss(tokens, tokens, corpus.tokenizer.vocab_size, alpha)
    assert loss < math.log(corpus.tokenizer.vocab_size)
