import math

import pytest
import torch

from tinygpt.data import load_corpus
from tinygpt.models import GPT, GPTConfig


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"block_size": -3}, "block_size"),
        ({"n_head": 2.0}, "n_head"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_validation_is_actionable(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_forward_shapes_and_loss():
    model = GPT(tiny())
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 11) and loss.ndim == 0
    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, 11) and loss is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_initial_loss_is_ln_vocab_on_shakespeare(shakespeare):
    """Small GPT-2 style init gives near-uniform predictions, so the loss starts at ln(65)."""
    corpus = load_corpus("shakespeare")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    model.eval()
    x, y = corpus.get_batch("val", 16, 64, torch.Generator().manual_seed(0))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 11, (2, 16))
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 11
        a, b = _logits(model, idx), _logits(model, changed)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_without_the_mask_the_future_leaks_into_the_past():
    torch.manual_seed(0)
    model = GPT(tiny(causal=False)).eval()
    idx = torch.randint(0, 11, (2, 16))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    a, b = _logits(model, idx), _logits(model, changed)
    assert not torch.allclose(a[:, :6], b[:, :6], atol=1e-6)


def test_tiny_gpt_memorises_a_single_batch():
    """If the loop is wired (loss, backward, AdamW), a small model overfits one batch."""
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=20, n_embd=32))
    x = torch.randint(0, 20, (4, 16))
    y = torch.randint(0, 20, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    proj = model.blocks[0].attn.c_proj.weight.std().item()
    fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert abs(fc - 0.02) < 0.002
    assert abs(proj - 0.02 / math.sqrt(2 * 8)) < 0.001
