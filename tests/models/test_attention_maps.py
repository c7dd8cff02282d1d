"""The recomputed attention weights are the model's: checked against a direct softmax of
q k^T / sqrt(D) with the mask, against the model's own output, and for causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinygpt.models import BigramConfig, BigramLM
from tinygpt.models.attention_maps import attention_maps
from tinygpt.models.gpt import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    return GPT(GPTConfig(**{**cfg, **kw}))


def test_shape_rows_and_mask():
    model = tiny()
    maps = attention_maps(model, torch.randint(0, 13, (10,)))
    assert maps.shape == (2, 2, 10, 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 10))
    assert torch.all(maps.triu(1) == 0)  # causal: nothing above the diagonal
    assert torch.all(maps[..., torch.ones(10, 10, dtype=torch.bool).tril()] > 0)  # the past is seen
    assert model.training  # the mode is restored


def test_no_causal_model_looks_ahead():
    maps = attention_maps(tiny(causal=False), torch.randint(0, 13, (10,)))
    assert maps.triu(1).sum(-1)[..., :-1].min() > 0  # every row but the last has future weight


def test_first_layer_matches_a_direct_softmax():
    model = tiny().eval()
    idx = torch.randint(0, 13, (3, 9))
    maps = attention_maps(model, idx)  # (B, L, H, T, T)
    B, T = idx.shape
    C, H = 16, 2
    x = model.wte(idx) + model.wpe(torch.arange(T))
    q, k, _ = model.blocks[0].attn.c_attn(model.blocks[0].ln_1(x)).split(C, dim=2)
    q = q.view(B, T, H, C // H).transpose(1, 2)
    k = k.view(B, T, H, C // H).transpose(1, 2)
    mask = torch.full((T, T), float("-inf")).triu(1)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + mask, dim=-1)
    torch.testing.assert_close(maps[:, 0], expected)


@pytest.mark.parametrize("options", [{}, dict(pos_embedding="rope", qk_norm="rmsnorm")])
def test_weights_times_values_give_the_layer_output(options):
    """softmax weights @ v, projected, is exactly what the fused kernel computed in the model."""
    model = tiny(**options).eval()
    idx = torch.randint(0, 13, (2, 12))
    maps = attention_maps(model, idx)
    attn = model.blocks[1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], rope=args[1], out=out))
    with torch.no_grad():
        model(idx)
    handle.remove()
    B, T, C = seen["x"].shape
    v = attn.c_attn(seen["x"])[..., 2 * C:].view(B, T, 2, C // 2).transpose(1, 2)  # (B, H, T, D)
    y = (maps[:, 1] @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn.c_proj(y), seen["out"], atol=1e-5, rtol=1e-4)


def test_rejects_models_without_attention():
    with pytest.raises(ValueError, match="no attention"):
        attention_maps(BigramLM(BigramConfig(vocab_size=5)), torch.zeros(3, dtype=torch.long))


def test_sdpa_reference_is_the_same_formula():
    """The direct formula used above agrees with PyTorch's attention (sanity of the test)."""
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    w = torch.softmax(q @ k.transpose(-2, -1) / 2 + torch.full((5, 5), float("-inf")).triu(1), -1)
    torch.testing.assert_close(w @ v, F.scaled_dot_product_attention(q, k, v, is_causal=True))
