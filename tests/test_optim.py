import pytest
import torch

from tinygpt.models import GPT, BigramConfig, BigramLM, GPTConfig
from tinygpt.optim import batch_size_at, build_optimizer, lr_factor, split_parameters, tokens_seen


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, **kw))


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_parameter_is_in_exactly_one_group(kind, bias):
    model = tiny_gpt(bias=bias)
    opt = build_optimizer(model, kind)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_muon_gets_the_block_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    parts = split_parameters(model)
    names = {k: {n for n, _ in v} for k, v in parts.items()}
    assert "blocks.0.attn.c_attn.weight" in names["matrices"]
    assert "blocks.1.mlp.c_proj.weight" in names["matrices"]
    assert {"wte.weight", "wpe.weight", "lm_head.weight"} <= names["embeddings"]
    assert "blocks.0.ln_1.weight" in names["gains"] and "blocks.0.attn.c_attn.bias" in names["gains"]
    opt = build_optimizer(model, "muon")
    muon_params = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    assert muon_params == {id(p) for _, p in parts["matrices"]}
    assert all(p.dim() == 2 for g in opt.optimizers["muon"].param_groups for p in g["params"])


def test_muon_on_a_bigram_has_nothing_to_do():
    opt = build_optimizer(BigramLM(BigramConfig(vocab_size=5)), "muon")
    assert set(opt.optimizers) == {"adamw"}


def test_muon_trains_and_state_round_trips():
    model = tiny_gpt()
    opt = build_optimizer(model, "muon", lr=3e-3, muon_lr=0.02)
    x = torch.randint(0, 11, (4, 8))
    losses = []
    for _ in range(40):
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    other = build_optimizer(tiny_gpt(), "muon")
    other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="expected"):
        build_optimizer(tiny_gpt(), "adamw").load_state_dict(opt.state_dict())


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(tiny_gpt(), "sgd")


def test_cosine_factor():
    assert lr_factor("cosine", 0, 0.0, 4, 0.1) == pytest.approx(0.25)
    assert lr_factor("cosine", 3, 0.0, 4, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 10, 0.5, 4, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 10, 1.0, 4, 0.1) == pytest.approx(0.1)


def test_cosine_is_monotone_after_warmup():
    values = [lr_factor("cosine", s, (s - 10) / 90, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.1)


def test_wsd_factor_is_flat_then_decays_linearly_to_the_end_value():
    f = lambda p: lr_factor("wsd", 100, p, 10, 0.0, decay_fraction=0.2)  # noqa: E731
    assert f(0.0) == f(0.5) == f(0.8) == 1.0
    assert f(0.9) == pytest.approx(0.5)
    assert f(1.0) == pytest.approx(0.0)
    assert f(1.7) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("step", 100, 0.5, 10, 0.0)


def test_batch_warmup_grows_in_multiples_of_the_start():
    sizes = [batch_size_at(s, 32, 8, 300) for s in range(400)]
    assert sizes[:100] == [8] * 100 and sizes[100:200] == [16] * 100
    assert sizes[200:300] == [24] * 100 and sizes[300:] == [32] * 100
    # 16 -> 32: the first multiple above 16 is the full batch, reached at the end of the warmup.
    assert {batch_size_at(s, 32, 16, 200) for s in range(200)} == {16}
    assert batch_size_at(200, 32, 16, 200) == 32
    # A size that is no multiple of the start: the last stage is the full batch.
    assert [batch_size_at(s, 20, 8, 12) for s in (0, 7, 8, 11, 12)] == [8, 8, 16, 16, 20]


@pytest.mark.parametrize("start, warmup", [(None, 100), (32, 100), (8, 0)])
def test_no_batch_warmup(start, warmup):
    assert {batch_size_at(s, 32, start, warmup) for s in range(150)} == {32}


@pytest.mark.parametrize("start, warmup", [(None, 0), (8, 300), (5, 7), (16, 200)])
def test_tokens_seen_is_the_sum_of_the_batches(start, warmup):
    for step in (0, 1, 6, 7, 150, 299, 300, 450):
        expected = sum(batch_size_at(s, 32, start, warmup) for s in range(step)) * 64
        assert tokens_seen(step, 32, start, warmup, 64) == expected
