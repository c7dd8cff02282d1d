import pytest
import torch

from tinygpt.generate import (
    SamplingConfig,
    filter_logits,
    generate_tokens,
    make_generator,
    sample_next,
    slide_window,
)
from tinygpt.models import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def run(model, sampling, seed=0, n=20):
    idx = torch.tensor([[1, 2, 3]])
    gen = make_generator(seed)
    return [int(t[0]) for t in generate_tokens(model, idx, n, sampling, gen, block_size=8)]


def test_temperature_zero_is_greedy_and_deterministic(model):
    a = run(model, SamplingConfig(temperature=0), seed=1)
    b = run(model, SamplingConfig(temperature=0), seed=2)
    assert a == b
    # greedy == argmax of the forward pass over the window at each step (the window jumps by
    # half the block, 4 tokens, when the text outgrows it)
    idx, start, starts = torch.tensor([[1, 2, 3]]), 0, set()
    for tok in a:
        start = slide_window(start, idx.size(1), 8, 4)
        starts.add(start)
        with torch.no_grad():
            logits, _ = model(idx[:, start:])
        assert int(logits[0, -1].argmax()) == tok
        idx = torch.cat([idx, torch.tensor([[tok]])], dim=1)
    assert starts == {0, 4, 8, 12, 16}


def test_top_k_1_equals_greedy(model):
    assert run(model, SamplingConfig(temperature=1.0, top_k=1), seed=5) == run(
        model, SamplingConfig(temperature=0)
    )


def test_same_seed_same_text_other_seed_other_text(model):
    s = SamplingConfig(temperature=1.5)
    assert run(model, s, seed=3) == run(model, s, seed=3)
    assert run(model, s, seed=3, n=40) != run(model, s, seed=4, n=40)


def test_slide_window():
    assert slide_window(0, 8, 8, 1) == 0  # fits
    assert slide_window(0, 9, 8, 1) == 1  # the lecture's crop: the last 8 tokens
    assert slide_window(0, 9, 8, 4) == 4  # jumps: keeps the last 8 - 4 + 1 = 5
    assert slide_window(4, 12, 8, 4) == 4  # room left in the window
    assert slide_window(4, 13, 8, 4) == 8


def test_context_is_cropped_to_block_size(model):
    out = run(model, SamplingConfig(temperature=0), n=30)  # 3 + 30 > block_size 8
    assert len(out) == 30


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept.sum().item() == 2 and kept[0, [1, 2, 3, 5]].sum().item() == 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, None, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.76) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary does not matter
    assert torch.isfinite(filter_logits(shuffled, None, 0.6))[0].tolist() == [
        False,
        True,
        False,
        True,
    ]


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    draws = sample_next(logits, SamplingConfig(top_p=0.7), make_generator(0))
    assert set(draws.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)
