"""The mathematical trick in self-attention: every position takes a weighted average of itself
and the positions before it, never after.

Four versions of the same thing, as in the lecture. ``x`` is (B, T, C); each returns (B, T, C)
where row t is an average over rows 0..t. Versions 1-3 give the *uniform* average (they agree
exactly, up to float rounding); version 4 lets the data choose the weights: one self-attention
head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def version1_loops(x: torch.Tensor) -> torch.Tensor:
    """Two for-loops: the mean of x[b, :t+1] for every b and t. Clear and slow."""
    B, T, C = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            out[b, t] = x[b, : t + 1].mean(dim=0)  # (t+1, C) -> (C,)
    return out


def version2_matmul(x: torch.Tensor) -> torch.Tensor:
    """One matmul with a lower-triangular matrix whose rows sum to 1."""
    T = x.size(1)
    wei = torch.tril(torch.ones(T, T, dtype=x.dtype))  # (T, T): 1 where j <= t
    wei = wei / wei.sum(dim=1, keepdim=True)  # row t holds 1/(t+1) in its first t+1 columns
    return wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def version3_softmax(x: torch.Tensor) -> torch.Tensor:
    """Scores of zero, the future set to -inf, softmax: the form attention uses.

    Here all scores are equal, so softmax gives the uniform weights of version 2; -inf becomes a
    weight of exactly 0, so the future cannot leak in.
    """
    T = x.size(1)
    tril = torch.tril(torch.ones(T, T, dtype=torch.bool))
    wei = torch.zeros(T, T, dtype=x.dtype)  # the "affinities": all equal for now
    wei = wei.masked_fill(~tril, float("-inf"))
    wei = F.softmax(wei, dim=-1)
    return wei @ x


class OneHead(nn.Module):
    """Version 4: self-attention. The affinities are no longer zero: they come from the data.

    Every position emits a query ("what am I looking for?") and a key ("what do I contain?");
    the affinity of position t for position j is q_t . k_j. Then, as in version 3: mask the
    future, softmax, and average the values (what each position offers).
    """

    def __init__(self, n_embd: int, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, T, T) attention weights: rows sum to 1, zero above the diagonal."""
        T = x.size(1)
        k, q = self.key(x), self.query(x)  # (B, T, hs)
        # Divide by sqrt(head_size) so the scores have variance ~1 (see ``score_variance``):
        # softmax of large scores is nearly one-hot, and each position would listen to one other.
        wei = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        wei = wei.masked_fill(~tril, float("-inf"))
        return F.softmax(wei, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x) @ self.value(x)  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


def score_variance(head_size: int, n: int = 4096, scaled: bool = True, seed: int = 0) -> float:
    """The variance of q . k for q, k with unit-variance entries: about ``head_size`` unscaled,
    about 1 when divided by sqrt(head_size)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, head_size, generator=gen)
    k = torch.randn(n, head_size, generator=gen)
    scores = (q * k).sum(-1)
    if scaled:
        scores = scores * head_size**-0.5
    return scores.var().item()
