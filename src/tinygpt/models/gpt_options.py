"""The GPT's options beyond the lecture, kept out of the way of reading ``gpt.py``.

Each option is chosen once, when the model is built, through the small helpers below: which
normalisation (``make_norm``), which feed-forward nonlinearity (``activation``), rotary positions
(``rope_rotations`` / ``apply_rope``), zero-initialisation and a tied head (``init_weights``),
the logit soft-cap (``soft_cap``) and float32 attention under CPU autocast and CUDA float16
autocast (``attention_in_float32``). The values each option may take, and their checks, are in
``tinygpt.models.config``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.models.config import GPTConfig

ROPE_BASE = 10000.0  # the wavelength of the slowest-turning pair grows up to 2 pi * base


# --------------------------------------------------------------------------- rotary positions


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

    ``rot`` is (T, 1, D/2) or (B, T, 1, D/2) (see ``rope_rotations``): each position's rotation,
    the same for every head. Read each pair as one complex number: multiplying by e^(i angle)
    turns it by that angle, in a single operation. Rotating both q (at position m) and k (at
    position n) makes q.k depend on m - n only: the dot product of two rotated vectors depends
    on the difference of their angles.
    """
    pairs = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2))  # (..., D/2) complex
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


# ------------------------------------------------------------------- norms and nonlinearities


def make_norm(kind: str, width: int, bias: bool) -> nn.Module:
    """LayerNorm (subtract the mean, divide by the std, then scale and shift) or RMSNorm (divide
    by the root mean square, then scale). RMSNorm does less arithmetic, but on a CPU PyTorch runs
    LayerNorm as one fused kernel forward and one backward and RMSNorm as several element-wise
    ones: there LayerNorm is the faster of the two."""
    if kind == "rmsnorm":
        return nn.RMSNorm(width)
    return nn.LayerNorm(width, bias=bias)


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def activation(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feed-forward nonlinearity: GELU (the lecture's ReLU, smoothed; GPT-2), its tanh
    approximation, ReLU squared, or SiLU for SwiGLU's gate."""
    return {
        "gelu": F.gelu,
        "gelu_tanh": partial(F.gelu, approximate="tanh"),
        "relu2": _relu2,
        "swiglu": F.silu,
    }[kind]


def ffn_width(kind: str, n_embd: int) -> int:
    """4x wider inside (the lecture); SwiGLU's two input matrices at 8/3x keep the same count."""
    return int(8 * n_embd / 3) if kind == "swiglu" else 4 * n_embd


# ------------------------------------------------------------------------ precision and logits


def attention_in_float32(x: torch.Tensor) -> bool:
    """Whether attention on the activations ``x`` makes its queries, keys and values in float32.

    - Under CPU autocast (bfloat16 or float16) the whole attention runs in float32: the CPU flash
      kernel's bf16 backward is several times slower than its float32 one (fp16 is emulated
      altogether), and attention is a small share of the FLOPs.
    - Under CUDA float16 autocast, the QK-norm and the rotations run in float32 (float16 ends
      at 65504: a norm computed op by op squares its inputs, which overflows above 256);
      autocast then hands the fused kernel float16 inputs, and it accumulates the scores and
      the softmax in float32 itself.

    Elsewhere (bfloat16 on a GPU, whose range is float32's; float32 runs) nothing changes. The
    loss needs no rule: autocast computes cross-entropy in float32 on every device.
    """
    if x.is_cpu:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (
            torch.bfloat16, torch.float16)
    return (x.is_cuda and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.float16)


_UNCHANGED = contextlib.nullcontext()


def autocast_off(off: bool):
    """A context that turns CPU autocast off when ``off``, else does nothing."""
    return torch.autocast("cpu", enabled=False) if off else _UNCHANGED


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Squash logits smoothly into (-cap, cap)."""
    return cap * torch.tanh(logits / cap)


# ------------------------------------------------------------------------------ initialisation


def init_weights(model: nn.Module, config: GPTConfig) -> None:
    """GPT-2's initialisation, then the zero-init and tied-head options."""

    def normal(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    model.apply(normal)
    # Scale the init of the layers that write into the residual stream by 1/sqrt(2 * n_layer),
    # so the stream's variance does not grow with depth.
    residual = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    for p in residual:
        nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
    if config.zero_init:
        # Every block starts as the identity and the model as a uniform guess; the first
        # updates decide what each layer adds.
        for p in residual:
            nn.init.zeros_(p)
        nn.init.zeros_(model.lm_head.weight)
    if config.tie_embeddings:
        # One table reads tokens in and writes logits out (GPT-2); saves V x C parameters.
        model.lm_head.weight = model.wte.weight
