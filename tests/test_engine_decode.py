"""The engine's decode steps: every weight layout gives the reference's tokens and logits."""

from dataclasses import dataclass

import pytest
import torch

import tinygpt.engine.decode as decode_module
from tinygpt.engine import DECODE_LAYOUTS, Engine, measure_decode_layouts
from tinygpt.engine.decode import DecodeModel, fast_decode_supported
from tinygpt.generate import SamplingConfig, generate_tokens
from tinygpt.models import GPT, GPTConfig

BS = 8
# auto, model, linear, transposed, packed (where this build of torch has MKL's packed weights), bag
LAYOUTS = [x for x in DECODE_LAYOUTS if x not in decode_module.MEASURED_LAYOUTS
           or decode_module.layout_available(x)]
COPIES = [x for x in ("transposed", "packed", "bag") if x in LAYOUTS]
# Every option appears in at least one of these.
CONFIGS = {
    "lecture": {},
    "rope-rms": dict(pos_embedding="rope", norm="rmsnorm", qk_norm="rmsnorm", mlp="relu2",
                     bias=False),
    "ln-qk-swiglu": dict(qk_norm="layernorm", mlp="swiglu", tie_embeddings=True,
                         logit_softcap=5.0),
    "gelu-tanh": dict(pos_embedding="rope", mlp="gelu_tanh", zero_init=True),
    "value-x0": dict(pos_embedding="rope", value_embeds=1, x0_skip=True),
}


def make_gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=11, block_size=BS, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    with torch.no_grad():  # sharper distributions than the init's near-uniform ones
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.02 * torch.randn_like(p))  # zero_init would leave nothing to test
        model.lm_head.weight.mul_(30)
        if model.x0_weights is not None:  # they start at zero, where they would add nothing
            model.x0_weights.uniform_(-1, 1)
    return model.eval()


def reference_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens[-BS:]]))
    return logits[0, -1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shift", [1, 4])
def test_every_layout_gives_the_reference_tokens_and_logits(layout, config, shift):
    model = make_gpt(**CONFIGS[config])
    engine = Engine(model, window_shift=shift, decode_layout=layout)
    state = engine.new_sequence([1, 2, 3])
    greedy = []
    for _ in range(3 * BS):  # the window fills, then slides
        logits = engine.step([state])[0]
        ref = reference_logits(model, state.tokens[state._start:])  # the same window
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
        greedy.append(int(logits.argmax()))
        engine.append(state, greedy[-1])
    expected = [int(t[0]) for t in generate_tokens(model, torch.tensor([[1, 2, 3]]), 3 * BS,
                                                     SamplingConfig(temperature=0), None, BS,
                                                     shift)]
    assert greedy == expected
    assert (engine._decoder is not None) == (layout != "model")  # the decode step did run


@pytest.mark.parametrize("layout", ["linear", "transposed", "auto"])
def test_rows_at_different_lengths_decode_like_each_alone(layout):
    model = make_gpt(pos_embedding="rope")
    engine = Engine(model, decode_layout=layout)
    a, b = engine.new_sequence([1, 2]), engine.new_sequence([3, 4, 5, 6])
    engine.step([a])
    engine.step([b])
    for _ in range(3):
        logits = engine.step([b, a])  # one batch cache for rows at different lengths
        for s, row in zip((b, a), logits):
            torch.testing.assert_close(row, reference_logits(model, s.tokens[s._start:]),
                                       atol=1e-5, rtol=0)
            engine.append(s, int(row.argmax()))


def test_forced_layouts_are_the_ones_used():
    model = make_gpt()
    for layout in ("linear", "transposed"):
        engine = Engine(model, decode_layout=layout)
        s = engine.new_sequence([1])
        engine.step([s])
        engine.append(s, 2)
        engine.step([s])
        used = engine._decoder.linear_weights()
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(used) == len(weights) == 2 * 4 + 1
        for u, w in zip(used, weights):
            if layout == "transposed":  # the same matrix, stored (in, out): a copy
                assert u.t().is_contiguous() and torch.equal(u, w) and u.data_ptr() != w.data_ptr()
            else:
                assert u is w


def test_the_layouts_are_measured_once_per_process(monkeypatch):
    calls = []

    def spy(weights, rounds=5):
        calls.append(len(weights))
        return measure_decode_layouts(weights, rounds=1)

    monkeypatch.setattr(decode_module, "measure_decode_layouts", spy)
    monkeypatch.setattr(decode_module, "_MEASURED_LAYOUTS", {})
    model = make_gpt(n_embd=24, n_head=3)  # shapes no other test measured
    for _ in range(2):
        DecodeModel(model, "auto")
    assert calls == [len([m for m in model.modules() if isinstance(m, torch.nn.Linear)])]


def test_measured_layouts_name_every_shape():
    weights = [torch.randn(48, 16), torch.randn(16, 16), torch.randn(16, 64), torch.randn(48, 16)]
    choice = measure_decode_layouts(weights, rounds=2)
    assert set(choice) == {(48, 16), (16, 16), (16, 64)}
    assert set(choice.values()) <= set(decode_module.available_layouts())


@pytest.mark.parametrize("layout", COPIES)
def test_changed_weights_are_not_decoded_with_a_stale_copy(layout):
    model = make_gpt()
    engine = Engine(model, decode_layout=layout)
    s = engine.new_sequence([1, 2])
    engine.step([s])
    engine.append(s, 3)
    engine.step([s])  # the copies exist now
    with torch.no_grad():  # an optimizer step would do this
        model.blocks[0].attn.c_attn.weight.mul_(1.5)
        model.lm_head.weight.add_(0.1)
    t = engine.new_sequence([4, 5])
    engine.step([t])
    engine.append(t, 6)
    torch.testing.assert_close(engine.step([t])[0], reference_logits(model, t.tokens),
                               atol=1e-5, rtol=0)
    # A parameter replaced by a new one (not changed in place) is noticed too. (Both come after
    # the last layer's attention, so the keys already cached stay valid.)
    model.ln_f.weight = torch.nn.Parameter(torch.full_like(model.ln_f.weight, 0.5))
    model.blocks[1].mlp.c_fc.bias = torch.nn.Parameter(torch.ones_like(model.blocks[1].mlp.c_fc.bias))
    engine.append(t, 7)
    torch.testing.assert_close(engine.step([t])[0], reference_logits(model, t.tokens),
                               atol=1e-5, rtol=0)


def test_decoding_leaves_the_model_as_it_was():
    model = make_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, decode_layout="transposed")
    s = engine.new_sequence([1])
    for _ in range(5):
        engine.append(s, int(engine.step([s])[0].argmax()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k
    assert all(p.requires_grad for p in model.parameters())


@dataclass
class LaterConfig(GPTConfig):
    novelty: int = 0  # an option added after the decode steps were written


class Halved(torch.nn.Module):
    """A kind of layer the decode steps know nothing about."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return 0.5 * self.norm(x)


@pytest.mark.parametrize("layout", ["linear", "transposed"])
def test_new_options_and_new_layers_decode_fast_and_exactly(layout):
    """Decode steps run the model's own forward: a config field or a kind of layer they have
    never heard of changes nothing about them."""
    model = make_gpt(pos_embedding="rope")
    model.config = LaterConfig(**model.config.to_dict())
    model.blocks[1].ln_2 = Halved(16)
    model.blocks[0].mlp.act = torch.tanh  # another nonlinearity, set on the layer
    assert fast_decode_supported(model)
    engine = Engine(model, decode_layout=layout)
    s = engine.new_sequence([1, 2])
    for _ in range(4):
        logits = engine.step([s])[0]
        torch.testing.assert_close(logits, reference_logits(model, s.tokens), atol=1e-5, rtol=0)
        engine.append(s, int(logits.argmax()))
    assert engine._decoder is not None


def test_models_elsewhere_than_a_float32_cpu_decode_through_their_own_forward():
    assert fast_decode_supported(make_gpt())
    assert not fast_decode_supported(make_gpt().to(torch.bfloat16))
    assert not fast_decode_supported(make_gpt(causal=False))


def test_under_autocast_the_model_decodes():
    model = make_gpt()
    engine = Engine(model, decode_layout="transposed")
    s = engine.new_sequence([1])
    with torch.autocast("cpu", torch.bfloat16):
        engine.step([s])
        engine.append(s, 2)
        engine.step([s])
    assert engine._decoder is None


def test_unknown_layouts_are_refused_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="unknown decode layout 'fast' in decode_layout"):
        Engine(make_gpt(), decode_layout="fast")
    monkeypatch.setenv("TINYGPT_DECODE_LAYOUT", "sideways")
    with pytest.raises(ValueError, match=r"'sideways' in \$TINYGPT_DECODE_LAYOUT; use one of auto"):
        Engine(make_gpt())
    monkeypatch.setenv("TINYGPT_DECODE_LAYOUT", "linear")
    assert Engine(make_gpt()).decode_layout == "linear"
    assert Engine(make_gpt(), decode_layout="model").decode_layout == "model"


def test_queries_and_keys_are_made_by_the_model_in_every_path(monkeypatch):
    """Prefill, decode steps and attention maps all call ``MultiHeadAttention.qkv``: there is one
    implementation of the attention's query/key/value preparation."""
    from tinygpt.models.attention_maps import attention_maps
    from tinygpt.models.gpt import MultiHeadAttention

    calls = []
    real = MultiHeadAttention.qkv

    def counted(self, x, *args, **kwargs):
        calls.append(x.size(1))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "qkv", counted)
    model = make_gpt(pos_embedding="rope", qk_norm="rmsnorm")
    engine = Engine(model, decode_layout="linear")
    s = engine.new_sequence([1, 2, 3])
    engine.step([s])  # prefill: 3 positions in each of 2 layers
    engine.append(s, 4)
    engine.step([s])  # a decode step on stand-ins: 1 position
    assert engine._decoder is not None
    attention_maps(model, torch.tensor([1, 2]))
    assert calls == [3, 3, 1, 1] + [2] * 4  # the maps: the forward and the recomputation


@pytest.mark.parametrize("layout", [x for x in decode_module.MEASURED_LAYOUTS
                                    if decode_module.layout_available(x)])
def test_every_available_layout_keeps_its_weights_and_decodes_batches(layout):
    model = make_gpt(pos_embedding="rope")
    engine = Engine(model, decode_layout=layout)
    a, b = engine.new_sequence([1, 2]), engine.new_sequence([3, 4, 5])
    for _ in range(3):
        for s in (a, b):  # one row at a time (the packed copies' batch size) ...
            logits = engine.step([s])[0]
            torch.testing.assert_close(logits, reference_logits(model, s.tokens), atol=1e-5, rtol=0)
            engine.append(s, int(logits.argmax()))
        for s, row in zip((a, b), engine.step([a, b])):  # ... and two at once
            torch.testing.assert_close(row, reference_logits(model, s.tokens), atol=1e-5, rtol=0)
    assert set(engine._decoder.choice.values()) == {layout}


def test_auto_measures_the_available_layouts_only(monkeypatch):
    def broken(weight, bias):
        raise RuntimeError("this library refuses")

    monkeypatch.setitem(decode_module.LAYOUT_KERNELS, "packed", broken)
    monkeypatch.setattr(decode_module, "_MEASURED_LAYOUTS", {})
    decode_module.layout_available.cache_clear()
    try:
        assert decode_module.available_layouts() == ("linear", "transposed", "bag")
        model = make_gpt(n_embd=20, n_head=2)
        engine = Engine(model, decode_layout="auto")
        s = engine.new_sequence([1, 2])
        for _ in range(3):
            logits = engine.step([s])[0]
            torch.testing.assert_close(logits, reference_logits(model, s.tokens), atol=1e-5, rtol=0)
            engine.append(s, int(logits.argmax()))
        assert set(engine._decoder.choice.values()) <= {"linear", "transposed", "bag"}
        with pytest.raises(ValueError, match="'packed' is not available .*auto, model, linear, "
                                             "transposed, bag$"):
            Engine(model, decode_layout="packed")
    finally:
        decode_module.layout_available.cache_clear()


def test_measurement_picks_among_the_layouts_it_is_given():
    weights = [torch.randn(48, 16), torch.randn(16, 48)]
    assert set(measure_decode_layouts(weights, rounds=1, layouts=["transposed"]).values()) == {
        "transposed"}
    both = measure_decode_layouts(weights, rounds=2, layouts=["linear", "transposed"])
    assert set(both) == {(48, 16), (16, 48)} and set(both.values()) <= {"linear", "transposed"}
