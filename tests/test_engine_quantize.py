"""int8 weight-only models (``--quantize int8``): the weights, the kernel, decoding over them."""

import pytest
import torch

from tests.test_engine_decode import BS, make_gpt, reference_logits
from tinygpt.engine import Engine
from tinygpt.engine.bags import BAG_ROWS
from tinygpt.engine.quantize import (
    MIN_ROW_WIDTH,
    ROW_EXTRA,
    WIDE_ROWS,
    Int8Linear,
    dequantize_table,
    int8_linear,
    int8_weight_bytes,
    quantize_int8,
    quantize_table,
    unpack_table,
    unpack_table_in_torch,
)
from tinygpt.errors import TinyGPTError
from tinygpt.quantize import quantize_model


def test_each_table_row_is_quantized_on_its_own_range_within_half_a_step():
    """A table row is one input channel's weights in one part: columns of W, 4 parts of 6."""
    torch.manual_seed(0)
    magnitudes = torch.tensor([1e-3, 0.1, 1, 10, 100, 0.0])  # per input channel
    w = torch.randn(24, 6) * magnitudes  # (out 24, in 6)
    packed = quantize_table(w, parts=4)
    assert packed.dtype == torch.uint8 and packed.shape == (4 * 6, 24 // 4 + ROW_EXTRA)
    deq = dequantize_table(packed, parts=4)
    assert deq.shape == w.shape
    scale = packed[:, -ROW_EXTRA:].contiguous().view(torch.float32)[:, 0]  # (parts * in,)
    step = scale.view(4, 6).amax(0)  # the coarsest step per input channel
    err = (deq - w).abs().amax(0)  # per input channel
    assert bool((err <= step / 2 + 1e-6 * w.abs().amax(0)).all())
    assert not deq[:, 5].any()  # an all-zero channel stays zero
    for i in range(5):  # each range is used: a row's values reach 0 and 255
        values = packed.view(4, 6, -1)[:, i, :-ROW_EXTRA]
        assert int(values.min()) == 0 and int(values.max()) == 255


def test_unpacking_in_torch_gives_fbgemms_values():
    """The path for other devices (plain torch) against fbgemm's CPU unpacking (checked on a
    CPU tensor). Both compute scale * q + bias in float32; one may fuse the multiply-add and
    round once, so a value may differ in its last bits -- at most a few float32 ulps of its
    row's largest magnitude (far below the half step a value is quantized to)."""
    torch.manual_seed(1)
    packed = quantize_table(torch.randn(384, 40) * torch.rand(40) * 3, parts=4)
    ours, fbgemm = unpack_table_in_torch(packed), unpack_table(packed)
    assert ours.shape == fbgemm.shape == (4 * 40, 384 // 4)
    ulp = torch.finfo(torch.float32).eps * fbgemm.abs().amax(dim=1, keepdim=True)
    assert bool(((ours - fbgemm).abs() <= 4 * ulp).all())


@pytest.mark.parametrize("rows", [1, BAG_ROWS, BAG_ROWS + 1, 64, WIDE_ROWS])
@pytest.mark.parametrize("out", [24, 384])
def test_every_kernel_path_multiplies_by_the_dequantized_weight(rows, out):
    """Bags (up to BAG_ROWS rows), products per part, and one product from WIDE_ROWS rows."""
    torch.manual_seed(rows)
    layer = Int8Linear(torch.nn.Linear(40, out))
    assert layer.parts == (1 if out == 24 else 4)  # rows of at least MIN_ROW_WIDTH values
    x = torch.randn(rows, 40)
    expected = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
    got = int8_linear(x, layer.weight_packed, layer.parts, layer.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x.view(rows, 1, 40)), expected.view(rows, 1, out),
                               atol=1e-5, rtol=1e-5)


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
    # each table row: its values, then a float32 scale and bias (rows 16 to 44 wide: 1 part)
    assert MIN_ROW_WIDTH > 44
    assert int8_weight_bytes(untied) == sum(m.weight.numel() + 8 * m.in_features for m in linears)
    assert int8_weight_bytes(untied) < fp32 / 2  # rows this narrow pay 8 bytes per 11-64


# |logit(int8) - logit(float32)| stays within this share of the float32 logits' spread: rowwise
# int8 on a tiny random model (16 wide, logits scaled up 30x) moves them by about 0.2%.
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
