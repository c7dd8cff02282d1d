"""A decoder-only transformer, as built in the "Let's build GPT" lecture.

Tokens become vectors (token embedding + learned position embedding); a stack of blocks lets every
position gather information from earlier positions (masked self-attention) and then think about it
on its own (MLP); a final LayerNorm and a linear head turn each position's vector into logits for
the next character. With ``pos_embedding="rope"`` there is no position table: each head's queries
and keys are rotated by an angle proportional to their position instead (rotary embeddings), so
attention scores depend on how far apart two positions are rather than where they sit.

``forward`` is a pure function of its input. For fast generation it optionally takes a key/value
cache (``tinygpt.engine.KVCache``): each row then continues at the position where its cached keys
end, and attention runs over the cached keys as well as the new ones. Sampling itself lives in
``tinygpt.generate`` and ``tinygpt.engine``.

Shapes in comments: B = batch, T = time (sequence length), C = channels (n_embd),
H = heads, D = head size (C // H), V = vocabulary size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from tinygpt.engine import KVCache, LayerCache

POS_EMBEDDINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
QK_NORMS = ("none", *NORMS)


MLPS = ("gelu", "gelu_tanh", "relu2", "swiglu")  # gelu_tanh: GPT-2's tanh approximation of GELU
ROPE_BASE = 10000.0  # the wavelength of the slowest-turning pair grows up to 2 pi * base


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # longest context the model can see
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    # Dropout on the attention weights; None: the same as dropout. 0 with dropout > 0 keeps the
    # fused attention kernel (the CPU one has no dropout) while still regularising the rest.
    attn_dropout: float | None = None
    bias: bool = True  # biases in Linear layers and LayerNorms
    # Teaching switch: False lets every position attend to the future too. Training loss then
    # collapses (the answer is visible) while sampling, which has no future, produces garbage.
    causal: bool = True
    # "learned": a table of block_size position vectors added to the token embeddings (GPT-2).
    # "rope": rotary embeddings, queries and keys rotated by position inside every attention layer.
    pos_embedding: str = "learned"
    # Options from later small-transformer work; the defaults are the lecture's architecture.
    norm: str = "layernorm"  # "rmsnorm": rescale only (no mean subtraction, no bias)
    # Normalise each head's queries and keys before attention: "none", "rmsnorm" or "layernorm".
    qk_norm: str = "none"
    mlp: str = "gelu"  # "relu2": relu(x)^2; "swiglu": gated, 8/3 x wide (same parameter count)
    tie_embeddings: bool = False  # share the token embedding table with the output head
    zero_init: bool = False  # start residual projections and the head at zero
    logit_softcap: float | None = None  # squash logits into (-cap, cap) with cap * tanh(x / cap)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        for name in ("dropout", "attn_dropout"):
            p = getattr(self, name)
            if p is None and name == "attn_dropout":
                continue
            if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(
                f"pos_embedding must be one of {', '.join(POS_EMBEDDINGS)}, "
                f"got {self.pos_embedding!r}"
            )
        for name, allowed in (("norm", NORMS), ("qk_norm", QK_NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        cap = self.logit_softcap
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf
        ):
            raise ValueError(f"logit_softcap must be a positive number (or None), got {cap!r}")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"rope rotates channel pairs, so the head size n_embd / n_head must be even; "
                f"got {self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def rope_rotations(head_size: int, n_pos: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The rotation of every channel pair at every position: unit complex numbers e^(i angle),
    (n_pos, head_size // 2), complex64.

    Channel pair i of a head turns by ``pos * base ** (-2i / head_size)``: the first pairs spin
    fast (fine position), the last ones slowly (coarse position), like the sinusoids of the
    original transformer.
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)  # (n_pos, D/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (x[..., 2i], x[..., 2i + 1]) of ``x`` (B, T, H, D) by ``rot``.

    ``rot`` is (T, 1, D/2) or (B, T, 1, D/2) (see ``rope_rotations``). Read each pair as one
    complex number: multiplying by e^(i angle) turns it by that angle, in a single operation.
    Rotating both q (at position m) and k (at position n) makes q.k depend on m - n only: the
    dot product of two rotated vectors depends on the difference of their angles.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., D/2) complex
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


def make_norm(kind: str, width: int, bias: bool) -> nn.Module:
    """LayerNorm (subtract the mean, divide by the std, then scale and shift) or RMSNorm (divide
    by the root mean square, then scale). RMSNorm does less arithmetic, but on a CPU PyTorch runs
    LayerNorm as one fused kernel forward and one backward and RMSNorm as several element-wise
    ones: there LayerNorm is the faster of the two."""
    if kind == "rmsnorm":
        return nn.RMSNorm(width)
    return nn.LayerNorm(width, bias=bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; with ``causal`` each position sees only itself and the past."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        # Queries, keys and values for all heads in one matmul.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm: normalised queries and keys keep the attention logits in a sane range even at
        # high learning rates.
        head_size = config.n_embd // config.n_head
        qk = config.qk_norm != "none"
        self.q_norm = make_norm(config.qk_norm, head_size, config.bias) if qk else None
        self.k_norm = make_norm(config.qk_norm, head_size, config.bias) if qk else None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        qkv = self.c_attn(x)  # (B, T, 3C)
        # Under bfloat16 autocast on a CPU, attention itself runs in float32: the CPU flash
        # kernel's bf16 backward is several times slower than its float32 one, and attention is
        # a small share of the FLOPs. (Elsewhere, and in float32 runs, nothing changes.)
        upcast = qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu"
        if upcast:
            qkv = qkv.float()
        # (B, T, 3C) -> three (B, T, H, D): every head attends independently.
        q, k, v = qkv.view(B, T, 3 * H, C // H).split(H, dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = None
        if cache is not None:
            # Store this step's keys and values; attend over everything cached so far, (B, H, L, D).
            # The mask (B, 1, T, L) hides keys after each query and the padding of shorter rows;
            # it is None when every key is visible or a plain causal mask does the job.
            k, v, mask = cache.update(k, v)
        # softmax(q k^T / sqrt(D)) v, with the upper triangle masked out when causal. SDPA picks
        # a fused kernel; it is the lecture's `wei.masked_fill(tril == 0, -inf)` done fast.
        # (is_causal aligns the triangle top-left, so it only applies when T == L.)
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=self.causal and mask is None and T == k.size(2),
            )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Per-position feed-forward network, 4x wider inside, as in the lecture and GPT-2.

    ``relu2`` squares a ReLU; ``swiglu`` multiplies a SiLU-activated projection by a second
    (linear) one, with the hidden width cut to 8/3 x so the parameter count stays that of 4x.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = 4 * config.n_embd
        if self.kind == "swiglu":
            hidden = int(8 * config.n_embd / 3)
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a pre-LayerNorm residual path."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config.norm, config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config.norm, config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)  # residual connections keep gradients flowing
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token -> vector
        self.wpe = None
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position -> vector
        else:
            # Rotation tables for every position; derived from the config, so not saved.
            rot = rope_rotations(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rope_rot", rot, persistent=False)  # (block_size, D/2)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config.norm, config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the init of the layers that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init:
            # Every block starts as the identity and the model as a uniform guess; the first
            # updates decide what each layer adds.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.zeros_(p)
            nn.init.zeros_(self.lm_head.weight)
        if config.tie_embeddings:
            # One table reads tokens in and writes logits out (GPT-2); saves V x C parameters.
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache.layer(i))
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)  # smooth clamp to (-cap, cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss
