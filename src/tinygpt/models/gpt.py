"""A decoder-only transformer, as built in the "Let's build GPT" lecture.

Read it in the lecture's order:

1. ``GPTConfig`` -- the hyperparameters (block_size, n_embd, n_head, n_layer, dropout), in
   ``tinygpt.models.config``.
2. ``MultiHeadAttention`` -- the lecture's ``Head`` and ``MultiHeadAttention``: every position
   asks a question (query), advertises what it holds (key), and takes a weighted average of the
   values of the positions before it; several heads do that side by side.
3. ``FeedForward`` -- each position then thinks on its own (an MLP, 4x wider inside).
4. ``Block`` -- communication then computation, each on a residual path with a LayerNorm first.
5. ``GPT`` -- token and position embeddings, a stack of blocks, a final LayerNorm, a linear head.

Options from later small-transformer work (rotary positions, RMSNorm, QK-norm, ReLU², SwiGLU,
a tied head, zero-init, a logit soft-cap, value embeddings, x0 skips, float32 attention under
reduced-precision autocast) are chosen once when the model is built, by the helpers in
``tinygpt.models.gpt_options``; with the defaults the model is the lecture's.

``forward`` is a pure function of its input, and the only computation of the model there is. For
fast generation it optionally takes a key/value cache (``tinygpt.models.kv_cache.KVCache``): each
row then continues at the position where its cached keys end, and attention runs over the cached
keys as well as the new ones. Sampling lives in ``tinygpt.generate`` and ``tinygpt.engine`` (whose
one-token decode steps run this same forward, on leaner stand-ins of its layers); the attention
weights can be looked at with ``tinygpt.models.attention_maps``.

Shapes in comments: B = batch, T = time (sequence length), C = channels (n_embd),
H = heads, D = head size (C // H), V = vocabulary size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.models.config import GPTConfig
from tinygpt.models.gpt_options import (
    activation,
    apply_rope,
    attention_in_float32,
    autocast_off,
    ffn_width,
    init_weights,
    make_norm,
    rope_rotations,
    soft_cap,
)

if TYPE_CHECKING:
    from tinygpt.models.kv_cache import KVCache, LayerCache

__all__ = ["GPTConfig", "MultiHeadAttention", "FeedForward", "Block", "GPT"]


class MultiHeadAttention(nn.Module):
    """Masked multi-head self-attention: the lecture's ``Head`` and ``MultiHeadAttention`` at once.

    In the lecture every ``Head`` has its own ``key``, ``query`` and ``value`` layers and computes

        wei = softmax(q @ k^T / sqrt(D), with the future set to -inf)     # (T, T)
        out = wei @ v                                                      # (T, D)

    and ``MultiHeadAttention`` concatenates the heads' outputs and projects them. Here
    ``c_attn`` holds the key, query and value weights of all heads in one matrix (one matmul
    instead of 3 x H), and ``scaled_dot_product_attention`` computes every head's ``wei @ v`` in
    one fused kernel that never stores ``wei``. With ``causal=False`` nothing is masked.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm (an option): normalised queries and keys keep the attention logits in a sane
        # range even at high learning rates.
        head_size = config.n_embd // config.n_head
        qk = config.qk_norm != "none"
        self.q_norm = make_norm(config.qk_norm, head_size, config.bias) if qk else None
        self.k_norm = make_norm(config.qk_norm, head_size, config.bias) if qk else None

    def qkv(
        self, x: torch.Tensor, rope: torch.Tensor | None = None, float32: bool = False,
        ve: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries, keys and values of the positions ``x`` (B, T, C): three (B, H, T, D).

        ``c_attn``, split into heads, QK-norm, rotary positions: the one place they are made,
        for the forward (and so for the engine's decode steps) and for ``attention_maps``.
        ``float32`` makes them in float32 whatever the dtype of ``c_attn``'s output. ``ve``
        (B, T, C), the value embeddings of the tokens (an option), is added to the values.
        """
        B, T, C = x.shape
        H = self.n_head
        qkv = self.c_attn(x)  # (B, T, 3C)
        if float32:
            qkv = qkv.float()
        # (B, T, 3C) -> three (B, T, H, D): every head attends independently.
        q, k, v = qkv.view(B, T, 3, H, C // H).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if ve is not None:
            v = v + ve.view_as(v).to(v.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        upcast = attention_in_float32(x)
        q, k, v = self.qkv(x, rope, float32=upcast, ve=ve)  # (B, H, T, D) each
        mask = None
        if cache is not None:
            # Store this step's keys and values; attend over everything cached so far, (B, H, L, D).
            # The mask (B, 1, T, L) hides keys after each query and the padding of shorter rows;
            # it is None when every key is visible or a plain causal mask does the job.
            k, v, mask = cache.update(k, v)
        # softmax(q k^T / sqrt(D)) v, with the upper triangle masked out when causal: the
        # lecture's `wei.masked_fill(tril == 0, float('-inf'))`, done by a fused kernel.
        # (is_causal aligns the triangle top-left, so it only applies when T == L.)
        with autocast_off(upcast):
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=self.causal and mask is None and T == k.size(2),
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # the heads side by side, like torch.cat
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    """A small MLP applied to every position on its own: Linear, nonlinearity, Linear, 4x wider
    inside (the lecture uses ReLU; GPT-2, and this model by default, GELU).

    With ``mlp="swiglu"`` a second input matrix ``c_gate`` gates the hidden layer:
    ``silu(x W_gate) * (x W_fc)``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = ffn_width(config.mlp, config.n_embd)
        # (c_gate first: the order of the parameters is the order of saved optimizer states.)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = activation(config.mlp)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden)
        h = self.act(h) if self.c_gate is None else self.act(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward), each added to the residual
    path ``x = x + f(ln(x))``: the residual path carries gradients straight through the depth,
    and each sub-layer reads a normalised copy of x (pre-norm)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config.norm, config.n_embd, config.bias)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = make_norm(config.norm, config.n_embd, config.bias)
        self.mlp = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, ve)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The lecture's GPT language model: ``forward(idx, targets=None) -> (logits, loss)``.

    ``idx`` (B, T) token ids -> token embeddings (+ position embeddings) -> ``n_layer`` blocks ->
    final norm -> ``lm_head`` -> logits (B, T, V) for the token that follows each position; the
    loss is the mean cross-entropy against ``targets`` (B, T). The parameter names (``wte``,
    ``wpe``, ``blocks.i.attn.c_attn``, ...) follow GPT-2 and are what checkpoints store.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token -> vector
        self.wpe = None
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position -> vector
        else:
            # Rotary positions: rotation tables for every position; derived from the config,
            # so not saved.
            rot = rope_rotations(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rope_rot", rot, persistent=False)  # (block_size, D/2)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config.norm, config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Options: value embeddings for the first blocks, and x0's weight before each block.
        self.value_embeds = nn.ModuleList(
            nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.value_embeds))
        self.x0_weights = nn.Parameter(torch.zeros(config.n_layer)) if config.x0_skip else None
        init_weights(self, config)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for the tokens ``idx`` (B, T), and the loss if ``targets`` is given.

        With a ``cache``, ``idx`` holds only the tokens the cache has not seen: their keys and
        values are appended to it, and row b's tokens sit at positions
        ``cache.lengths[b], ..., cache.lengths[b] + T - 1``.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.longest
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence length {start + T} exceeds block_size {self.config.block_size}; "
                f"crop the context"
            )
        if cache is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            if not self.config.causal:
                raise ValueError("a key/value cache needs a causal model")
            pos = cache.prepare(T)  # (B, T): every row continues where its cache ends
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)  # + (T, C) or (B, T, C)
        else:
            # (T, D/2) -> (T, 1, D/2), or (B, T, D/2) -> (B, T, 1, D/2): broadcast over heads
            rope = self.rope_rot[pos].unsqueeze(-2)
        x = x0 = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.x0_weights is not None:  # an option: the embeddings again, weighted
                x = x + self.x0_weights[i] * x0
            ve = self.value_embeds[i](idx) if i < len(self.value_embeds) else None  # (B, T, C)
            x = block(x, rope, None if cache is None else cache.layer(i), ve)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap is not None:
            logits = soft_cap(logits, self.config.logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss
