"""int8 weight-only models (``--quantize int8``): the weights, the kernel, decoding over them."""

import pytest
import torch

from tests.test_engine_decode import BS, make_gpt, reference_logits
from tinygpt.engine import Engine
from tinygpt.engine.quantize import (
    KERNEL_ROWS,
    Int8Linear,
    int8_linear,
    int8_weight_bytes,
    quantize_int8,
    quantize_rows,
)
from tinygpt.errors import TinyGPTError
from tinygpt.quantize import quantize_model


def test_rows_are_quantized_symmetrically_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.0])[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # every non-zero row uses the range
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7 * w.abs()).all())
    assert not q[5].any()  # an all-zero row stays zero


@pytest.mark.parametrize("rows", [1, KERNEL_ROWS, KERNEL_ROWS + 1, 64])
def test_both_kernel_paths_multiply_by_the_dequantized_weight(rows):
    torch.manual_seed(rows)
    w, b = torch.randn(24, 40), torch.randn(24)
    q, scale = quantize_rows(w)
    x = torch.randn(rows, 40)
    expected = torch.nn.functional.linear(x, q.float() * scale[:, None], b)
    torch.testing.assert_close(int8_linear(x, q, scale, b), expected, atol=1e-5, rtol=1e-5)


def test_what_is_quantized_and_what_stays_float32():
    model = quantize_int8(make_gpt(tie_embeddings=True))
    assert isinstance(model.blocks[0].attn.c_attn, Int8Linear)
    assert isinstance(model.blocks[1].mlp.c_proj, Int8Linear)
    assert type(model.lm_head) is torch.nn.Linear  # tied: it is the embedding table
    assert model.lm_head.weight is model.wte.weight and model.wte.weight.dtype == torch.float32
    untied = quantize_int8(make_gpt())
    assert isinstance(untied.lm_head, Int8Linear)
    linears = [m for m in make_gpt().modules() if isinstance(m, torch.nn.Linear)]
    fp32 = sum(m.weight.numel() * 4 for m in linears)
    assert int8_weight_bytes(untied) == sum(m.weight.numel() + 4 * m.out_features for m in linears)
    assert int8_weight_bytes(untied) < fp32 / 3


# |logit(int8) - logit(float32)| stays within this share of the float32 logits' spread: per
# channel int8 on a tiny random model (16 wide, logits scaled up 30x) moves them by about 0.5%.
INT8_TOLERANCE = 0.03


def test_int8_logits_are_close_to_float32():
    model = make_gpt(pos_embedding="rope", mlp="swiglu")
    idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
    with torch.no_grad():
        fp32, _ = model(idx)
        int8, _ = quantize_int8(model)(idx)
    spread = float(fp32.max() - fp32.min())
    assert 0 < float((int8 - fp32).abs().max()) <= INT8_TOLERANCE * spread
    assert (int8.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("layout", ["auto", "linear", "model"])
def test_decoding_an_int8_model_gives_its_own_forward(layout):
    model = quantize_int8(make_gpt(pos_embedding="rope"))
    engine = Engine(model, decode_layout=layout)
    s = engine.new_sequence([1, 2, 3])
    for _ in range(2 * BS):  # the window fills and slides
        logits = engine.step([s])[0]
        torch.testing.assert_close(logits, reference_logits(model, s.tokens[s._start:]),
                                   atol=1e-5, rtol=0)
        engine.append(s, int(logits.argmax()))
    if layout != "model":
        # The int8 layers are called directly (no nn.Module in between), none is left float.
        assert engine._decoder is not None and engine._decoder.linear_weights() == []


def test_quantize_modes():
    model = make_gpt()
    assert quantize_model(model, "none") is model
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(TinyGPTError, match="--quantize must be one of none, int8, got 'int4'"):
        quantize_model(model, "int4")
    assert isinstance(quantize_model(model, "int8").lm_head, Int8Linear)


def test_an_int8_model_is_not_exported(tmp_path):
    from tinygpt.hf import export_model
    from tinygpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer("abcdefghijk")
    with pytest.raises(TinyGPTError, match="cannot export a model with int8 weights"):
        export_model(quantize_int8(make_gpt()), tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
