"""Where every head looks: the attention weights of a GPT, recomputed for inspection.

Training and sampling use PyTorch's fused attention kernel, which never materialises the
(T, T) matrix of weights. To look at it, ``attention_maps`` runs the model once with a forward
pre-hook on every attention layer that records the layer's input; from that input it recomputes
the lecture's

    wei = softmax(q @ k^T / sqrt(head_size) + mask)     # (T, T) per head, rows sum to 1

with the layer's own queries and keys (``MultiHeadAttention.qkv``: its weights, QK-norm and
rotary positions), in float32. The model itself is not changed: nothing here runs during
training.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tinygpt.models.modes import eval_mode


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(
            f"{type(model).__name__} has no attention layers to show (the bigram model looks at one "
            f"character only); use a GPT"
        )
    return [block.attn for block in blocks]


def layer_weights(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """Attention weights (B, H, T, T) of one attention layer for its input ``x`` (B, T, C)."""
    T = x.size(1)
    q, k, _ = attn.qkv(x, rope, float32=True)  # (B, H, T, D) each
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, T): query row, key column
    if attn.causal:
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))  # a position may not see the future
    return scores.softmax(dim=-1)


@torch.no_grad()
def attention_maps(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The attention weights of every layer and head of ``model`` for the tokens ``idx``.

    ``idx`` is (T,) or (B, T) token ids; the result is (n_layer, n_head, T, T) or
    (B, n_layer, n_head, T, T), float32. Entry [l, h, i, j] is how much position i attends to
    position j in head h of layer l (each row sums to 1). Dropout is off (eval mode) while the
    maps are taken; the model's mode is restored afterwards.
    """
    layers = _attention_layers(model)
    single = idx.dim() == 1
    if single:
        idx = idx[None, :]
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be (T,) or (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    maps: list[torch.Tensor | None] = [None] * len(layers)

    def recorder(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            rope = args[1] if len(args) > 1 else None
            maps[i] = layer_weights(module, x, rope)

        return hook

    handles = [attn.register_forward_pre_hook(recorder(i)) for i, attn in enumerate(layers)]
    try:
        with eval_mode(model):
            model(idx)
    finally:
        for h in handles:
            h.remove()
    out = torch.stack(maps, dim=1)  # (B, n_layer, H, T, T)
    return out[0] if single else out
