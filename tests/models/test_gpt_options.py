"""Every architecture option, switched on alone: shapes, causality, initial loss near ln(V)."""

import math

import pytest
import torch

from tinygpt.data import load_corpus
from tinygpt.models import GPT, GPTConfig

OPTIONS = {
    "classic": {},
    "rope": {"pos_embedding": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": "rmsnorm"},
    "qk_layernorm": {"qk_norm": "layernorm"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "no_bias": {"bias": False},
    "tied_head": {"tie_embeddings": True},
    "zero_init": {"zero_init": True},
    "softcap": {"logit_softcap": 15.0},
    "value_embeds": {"value_embeds": 2},
    "x0_skip": {"x0_skip": True},
    "all_modern": {"pos_embedding": "rope", "norm": "rmsnorm", "qk_norm": "rmsnorm", "mlp": "relu2",
                   "bias": False, "zero_init": True, "logit_softcap": 15.0},
}


def model_with(option: str, vocab_size: int = 13, **kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(GPTConfig(**{**base, **OPTIONS[option], **kw})).eval()


@pytest.mark.parametrize("option", OPTIONS)
def test_shapes_and_backward(option):
    model = model_with(option)
    idx = torch.randint(0, 13, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 13)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("option", OPTIONS)
def test_causality(option):
    model = model_with(option)
    if OPTIONS[option].get("zero_init"):  # an all-zero head hides everything; give it weights to compare
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
    idx = torch.randint(0, 13, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 13
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-6)


# A zero-initialised head predicts exactly uniformly: its initial loss is ln(V) by construction.
@pytest.mark.parametrize("option", [o for o, kw in OPTIONS.items() if not kw.get("zero_init")])
def test_initial_loss_is_near_ln_vocab_on_shakespeare(option, shakespeare):
    corpus = load_corpus("shakespeare")
    model = model_with(option, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    x, y = corpus.get_batch("val", 16, 64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1, loss.item()


def test_options_change_the_parameters_as_documented():
    classic = model_with("classic")
    tied = model_with("tied_head")
    assert tied.lm_head.weight is tied.wte.weight
    assert sum(p.numel() for p in tied.parameters()) == classic.num_params() - 13 * 32
    assert not any(n.endswith("bias") for n, _ in model_with("no_bias").named_parameters())
    swiglu = model_with("swiglu")
    assert abs(swiglu.num_params() - classic.num_params()) / classic.num_params() < 0.02
    assert model_with("zero_init").lm_head.weight.abs().sum() == 0
    assert isinstance(model_with("qk_norm").blocks[0].attn.q_norm, torch.nn.RMSNorm)
    assert isinstance(model_with("qk_layernorm").blocks[0].attn.k_norm, torch.nn.LayerNorm)
    assert model_with("classic").blocks[0].attn.q_norm is None
    # value embeddings: a (V, C) table per block that has them; x0 skips: a weight per block
    assert model_with("value_embeds").num_params() == classic.num_params() + 2 * 13 * 32
    assert model_with("x0_skip").num_params() == classic.num_params() + 2
    assert classic.x0_weights is None and len(classic.value_embeds) == 0


def test_value_embeddings_change_the_values_only():
    """A value embedding is added to the values: the attention weights (queries and keys) are
    the model's without it, and what the attention returns changes."""
    model = model_with("value_embeds")
    attn, x = model.blocks[0].attn, torch.randn(1, 16, 32)
    ve = model.value_embeds[0](torch.randint(0, 13, (1, 16)))
    with torch.no_grad():
        q0, k0, v0 = attn.qkv(x)
        q1, k1, v1 = attn.qkv(x, ve=ve)
    assert torch.equal(q0, q1) and torch.equal(k0, k1)
    assert torch.allclose(v1 - v0, ve.view(1, 16, 2, 16).transpose(1, 2), atol=1e-6)


def test_x0_skips_add_the_embeddings_before_each_block(monkeypatch):
    """With x0 weights w, block i reads x + w[i] * x0: checked on what block 1 receives."""
    model = model_with("x0_skip")
    seen = []
    monkeypatch.setattr(model.blocks[1], "forward", lambda x, *a: seen.append(x) or x)
    idx = torch.randint(0, 13, (1, 16))
    with torch.no_grad():
        model(idx)
        base = seen.pop()
        model.x0_weights.copy_(torch.tensor([0.0, 0.5]))
        model(idx)
    x0 = model.wte(idx) + model.wpe(torch.arange(16))  # the embeddings: tokens + positions
    assert torch.allclose(seen.pop() - base, 0.5 * x0, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [({"norm": "batchnorm"}, "norm must be one of"), ({"mlp": "tanh"}, "mlp must be one of"),
     ({"qk_norm": "l2"}, "qk_norm must be one of none, layernorm, rmsnorm"),
     ({"logit_softcap": 0.0}, "logit_softcap"), ({"logit_softcap": -3.0}, "logit_softcap"),
     ({"value_embeds": 7}, r"value_embeds must be an integer from 0 to n_layer \(6\)"),
     ({"value_embeds": -1}, "value_embeds"), ({"value_embeds": True}, "value_embeds")],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(vocab_size=5, **kw)


def test_softcap_bounds_the_logits():
    model = model_with("softcap")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
        logits, _ = model(torch.randint(0, 13, (1, 16)))
    assert logits.abs().max() <= 15.0


def test_attention_takes_the_fused_sdpa_kernel_on_cpu():
    """With dropout 0 on the CPU, attention runs the fused flash kernel, not the math fallback."""
    model = model_with("classic")
    idx = torch.randint(0, 13, (2, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(idx, idx)
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention" in n for n in names), sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["classic", "all_modern"])
def test_attention_runs_in_float32_under_cpu_autocast(option, dtype, monkeypatch):
    """The CPU flash kernel's bf16 backward is slow (and float16 is emulated), so under CPU
    autocast the attention alone is computed in float32 (and the rest in bf16 or fp16). The
    result stays close to the float32 model's."""
    import torch.nn.functional as F

    import tinygpt.models.gpt as gpt_module

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention", spy)
    model = model_with(option).train()
    idx = torch.randint(0, 13, (3, 16))
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=dtype):
        logits, loss = model(idx, idx)
    assert logits.dtype == dtype  # the head's matmul did run in bf16 / fp16
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # Two layers, two forwards; inside autocast, autocast is off for the attention call (it would
    # cast the inputs back to bf16 / fp16 otherwise).
    assert seen == [(torch.float32, torch.float32, torch.float32, False)] * 4
    assert loss.item() == pytest.approx(loss32.item(), abs=0.02)


def test_attn_dropout_zero_keeps_the_other_dropouts():
    """``attn_dropout=0`` turns off dropout on the attention weights only: the residual and MLP
    dropouts still make training-mode outputs random, and eval mode is deterministic."""
    model = model_with("classic", dropout=0.5, attn_dropout=0.0).train()
    assert all(b.attn.dropout == 0.0 for b in model.blocks)
    assert all(b.attn.resid_dropout.p == 0.5 and b.mlp.dropout.p == 0.5 for b in model.blocks)
    idx = torch.randint(0, 13, (2, 16))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    assert model_with("classic", dropout=0.3).blocks[0].attn.dropout == 0.3  # None: same as dropout
