"""Models: one interface, ``forward(idx, targets=None) -> (logits, loss)``."""

from __future__ import annotations

import torch.nn as nn

from tinygpt.models.bigram import BigramConfig, BigramLM
from tinygpt.models.gpt import GPT, GPTConfig

MODEL_KINDS = ("bigram", "gpt")

__all__ = [
    "GPT", "GPTConfig", "BigramLM", "BigramConfig", "MODEL_KINDS", "build_model", "make_config",
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
