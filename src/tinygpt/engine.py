"""Step-wise generation for many sequences at once.

``Engine.step`` returns the next-token logits of a list of sequences in one call, so a server can
decode many requests together and let sequences join and leave between steps. This version has no
KV cache: each step re-runs the (cropped) context of every sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SeqState:
    """One sequence being generated; callers only read ``tokens``."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens


class Engine:
    def __init__(self, model: nn.Module, use_cache: bool = True) -> None:
        self.model = model
        self.use_cache = use_cache  # accepted for interface compatibility; nothing is cached here
        config = model.config
        self.block_size = getattr(config, "block_size", 1)  # the bigram model sees one token
        # With a causal mask a position never sees later ones, so rows of different lengths can
        # share one forward pass: pad on the right and read each row's logits at its own end.
        self.pad_ok = getattr(config, "causal", True)
        self.device = next(model.parameters()).device

    def new_sequence(self, prompt_ids: list[int]) -> SeqState:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        return SeqState(list(prompt_ids))

    def append(self, state: SeqState, token: int) -> None:
        state.tokens.append(int(token))

    @torch.no_grad()
    def step(self, states: list[SeqState]) -> torch.Tensor:
        """(N, V) float32 logits of the next token of each state, in order."""
        if not states:
            raise ValueError("step() needs at least one sequence")
        contexts = [s.tokens[-self.block_size:] for s in states]
        if self.pad_ok:
            groups = [list(range(len(contexts)))]
        else:
            by_len: dict[int, list[int]] = {}
            for i, c in enumerate(contexts):
                by_len.setdefault(len(c), []).append(i)
            groups = list(by_len.values())
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.empty(0)
            for rows in groups:
                lengths = [len(contexts[i]) for i in rows]
                width = max(lengths)
                idx = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):
                    idx[r, : lengths[r]] = torch.tensor(contexts[i], dtype=torch.long)
                logits, _ = self.model(idx.to(self.device))  # (n, width, V)
                last = torch.tensor(lengths, device=logits.device) - 1
                picked = logits[torch.arange(len(rows), device=logits.device), last].float()
                if out.numel() == 0:
                    out = torch.empty(len(states), picked.size(-1), dtype=torch.float32)
                out[rows] = picked.cpu()
        finally:
            self.model.train(was_training)
        return out
