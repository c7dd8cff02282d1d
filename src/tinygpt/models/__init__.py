"""Models: one interface, ``forward(idx, targets=None) -> (logits, loss)``.

The leaf every other room builds on: nothing here imports from the rest of tinygpt.

- ``config``: ``GPTConfig``, the GPT's hyperparameters and options, validated when built;
- ``gpt``: the GPT itself, in the lecture's order; ``gpt_options``: the helpers its options use;
- ``kv_cache``: the key/value cache the GPT's forward fills and reads while generating;
- ``bigram``: the lecture's first model, a table of next-token logits;
- ``attention_maps``: the attention weights of a GPT, recomputed for inspection;
- ``modes``: ``eval_mode``, the model in eval mode for a ``with`` block.
"""

from __future__ import annotations

import torch.nn as nn

from tinygpt.models.bigram import BigramConfig, BigramLM
from tinygpt.models.config import GPTConfig
from tinygpt.models.gpt import GPT
from tinygpt.models.modes import eval_mode

MODEL_KINDS = ("bigram", "gpt")

__all__ = [
    "GPT", "GPTConfig", "BigramLM", "BigramConfig", "MODEL_KINDS", "build_model", "eval_mode",
    "make_config",
]


def make_config(kind: str, config: dict) -> BigramConfig | GPTConfig:
    """Config dataclass for a model kind from a plain dict (as stored in a checkpoint)."""
    if kind == "bigram":
        return BigramConfig(**config)
    if kind == "gpt":
        return GPTConfig(**config)
    raise ValueError(f"unknown model {kind!r} (expected one of: {', '.join(MODEL_KINDS)})")


def build_model(kind: str, config: BigramConfig | GPTConfig) -> nn.Module:
    if kind == "bigram":
        return BigramLM(config)
    if kind == "gpt":
        return GPT(config)
    raise ValueError(f"unknown model {kind!r} (expected one of: {', '.join(MODEL_KINDS)})")
