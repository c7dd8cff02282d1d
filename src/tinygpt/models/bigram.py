"""The bigram language model: the next character depends only on the current one.

The whole model is one ``V x V`` table: row ``i`` holds the logits of the character that follows
character ``i``. It has no memory of anything earlier, so what it writes is "hilarious
gibberish" -- but it is the baseline every later model must beat, and its best possible loss can
be computed exactly by counting (see ``tests/models/test_bigram.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BigramConfig:
    vocab_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {self.vocab_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class BigramLM(nn.Module):
    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        # Small initial logits: the untrained model predicts (almost) uniformly, loss ~ ln(V).
        nn.init.normal_(self.token_embedding_table.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.token_embedding_table(idx)  # (B, T, V): row idx[b, t] of the table
        loss = None
        if targets is not None:
            B, T, V = logits.shape
            loss = F.cross_entropy(logits.view(B * T, V), targets.reshape(B * T))
        return logits, loss
