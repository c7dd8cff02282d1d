"""Rotary position embeddings: config, shapes, causality, initial loss, relative positions."""

import math

import pytest
import torch

from tinygpt.models import GPT, GPTConfig
from tinygpt.models.gpt_options import apply_rope, rope_rotations


def rope_config(**kw) -> GPTConfig:
    base = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                pos_embedding="rope")
    return GPTConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"pos_embedding": "sinusoidal"}, "pos_embedding must be one of learned, rope"),
        ({"pos_embedding": None}, "pos_embedding"),
        ({"n_embd": 30, "n_head": 2}, "head size .* must be even"),  # head size 15
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        rope_config(**kw)


def test_odd_head_size_is_fine_with_learned_positions():
    config = GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_embd=30, n_head=2,
                       pos_embedding="learned")
    assert config.head_size == 15
    logits, loss = GPT(config)(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    assert logits.shape == (1, 3, 5) and torch.isfinite(loss)


def test_no_position_table_and_nothing_extra_saved():
    model = GPT(rope_config())
    assert model.wpe is None
    assert not any("wpe" in k or "rope" in k for k in model.state_dict())
    learned = GPT(rope_config(pos_embedding="learned"))
    assert learned.num_params() - model.num_params() == 16 * 32  # the block_size x C table


def test_shapes_and_initial_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = GPT(rope_config())
    idx = torch.randint(0, 65, (4, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (4, 16, 65)
    # Small initial weights: (almost) uniform predictions, loss ~ ln(V).
    assert abs(loss.item() - math.log(65)) < 0.1
    logits, loss = model(idx[:, :3])
    assert logits.shape == (4, 3, 65) and loss is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causal_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(1)
    model = GPT(rope_config()).eval()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 65
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_positions_matter():
    # Without any position signal, attention would see the context as a bag of tokens.
    torch.manual_seed(2)
    model = GPT(rope_config()).eval()
    a, _ = model(torch.tensor([[1, 2, 3, 4]]))
    b, _ = model(torch.tensor([[2, 1, 3, 4]]))
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-6)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    D = 8
    rot = rope_rotations(D, 64)  # (64, D/2)
    q, k = torch.randn(D), torch.randn(D)

    def rotate(x, p):
        return apply_rope(x.view(1, 1, 1, D), rot[p].view(1, 1, -1)).view(D)

    def score(m, n):
        return (rotate(q, m) * rotate(k, n)).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(9, 9) == pytest.approx((q * k).sum().item(), abs=1e-5)  # no rotation between
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # A rotation keeps lengths.
    assert rotate(q, 17).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rotation_turns_each_adjacent_pair_by_its_angle():
    """Pair i = channels (2i, 2i+1) turns by pos * base^(-2i/D): checked against the 2x2
    rotation matrix written out, for every pair and a few positions."""
    D, base = 8, 10000.0
    rot = rope_rotations(D, 32)
    x = torch.randn(2, 32, 3, D)  # (B, T, H, D)
    out = apply_rope(x, rot[:, None])
    for pos in (0, 1, 7, 31):
        for i in range(D // 2):
            angle = torch.tensor(pos * base ** (-2 * i / D), dtype=torch.float64)
            c, s = angle.cos().float(), angle.sin().float()
            a, b = x[:, pos, :, 2 * i], x[:, pos, :, 2 * i + 1]
            torch.testing.assert_close(out[:, pos, :, 2 * i], a * c - b * s)
            torch.testing.assert_close(out[:, pos, :, 2 * i + 1], a * s + b * c)


def test_rope_keeps_bfloat16_inputs_bfloat16():
    rot = rope_rotations(8, 4)
    x = torch.randn(1, 4, 2, 8)
    y = apply_rope(x.bfloat16(), rot[:, None])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), apply_rope(x, rot[:, None]), atol=0.05, rtol=0.02)


def test_rope_trains():
    torch.manual_seed(4)
    model = GPT(rope_config(vocab_size=8, n_layer=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.arange(16).remainder(8)[None]  # 0 1 2 ... 7 0 1 ...: next = current + 1
    first = None
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
