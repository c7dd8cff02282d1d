"""``eval_mode``: eval mode inside the block, the previous mode after it, by an exception too."""

import pytest
import torch

from tinygpt.models import GPT, GPTConfig, eval_mode


def tiny() -> GPT:
    return GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=8, dropout=0.5))


def modes(model) -> set[bool]:
    return {m.training for m in model.modules()}


def test_training_model_is_in_eval_mode_inside_and_training_after():
    model = tiny().train()
    idx = torch.tensor([[1, 2, 3]])
    with eval_mode(model) as same:
        assert same is model and modes(model) == {False}
        a, b = model(idx)[0], model(idx)[0]
        assert torch.equal(a, b)  # no dropout
    assert modes(model) == {True}


def test_the_mode_is_restored_after_an_exception():
    model = tiny().train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert modes(model) == {True}


def test_a_model_in_eval_mode_stays_in_eval_mode():
    model = tiny().eval()
    with eval_mode(model):
        assert modes(model) == {False}
    assert modes(model) == {False}
    with pytest.raises(ValueError), eval_mode(model):
        raise ValueError
    assert modes(model) == {False}
