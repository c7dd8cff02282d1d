"""Checkpoints stay loadable: weights saved from earlier versions of ``GPT`` (in
``fixtures/gpt_reference.safetensors``, see ``fixtures/make_gpt_reference.py``) load into today's
model under the same names and give the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.models.gpt import GPT, GPTConfig

from .fixtures.make_gpt_reference import BASE, VARIANTS

FIXTURE = Path(__file__).parent / "fixtures" / "gpt_reference.safetensors"


@pytest.fixture(scope="module")
def saved() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


@pytest.mark.parametrize("name", VARIANTS)
def test_saved_weights_load_by_name_and_give_the_saved_logits(saved, name):
    torch.manual_seed(123)  # a different init: everything must come from the file
    model = GPT(GPTConfig(**BASE, **VARIANTS[name])).eval()
    prefix = f"{name}/"
    weights = {
        k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix) and k != prefix + "logits"
    }
    assert set(model.state_dict()) == set(weights)  # the same parameter names, no more, no fewer
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        logits = model(saved["probe"])[0]
    torch.testing.assert_close(logits, saved[prefix + "logits"], atol=1e-5, rtol=1e-5)


def test_parameter_order_is_the_saved_optimizer_order():
    """Optimizer states are saved in parameter order: SwiGLU's gate comes before c_fc, as it
    always has."""
    model = GPT(GPTConfig(**{**BASE, "mlp": "swiglu"}))
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.0.mlp.")]
    expected = [f"blocks.0.mlp.{m}.{p}" for m in ("c_gate", "c_fc", "c_proj") for p in ("weight", "bias")]
    assert names == expected


def test_zero_init_with_a_tied_head_is_refused():
    with pytest.raises(ValueError, match="zero_init and tie_embeddings"):
        GPTConfig(**BASE, zero_init=True, tie_embeddings=True)


def test_the_model_file_reads_in_the_lecture_order():
    import inspect
    import re

    import tinygpt.models.config as config_module
    import tinygpt.models.gpt as gpt_module

    source = inspect.getsource(gpt_module)
    order = [re.search(rf"^class {name}\b", source, re.M).start() for name in
             ("MultiHeadAttention", "FeedForward", "Block", "GPT")]
    assert order == sorted(order)
    # The hyperparameters come first, from their own module, under the name the lecture uses.
    assert gpt_module.GPTConfig is config_module.GPTConfig
    assert source.index("GPTConfig") < order[0]
    assert GPT.__doc__ and "forward(idx, targets=None)" in GPT.__doc__
