"""int8 weight-only models: each linear layer's weight as int8 with one float scale per output.

A batch-1 decode step reads every weight once for two flops each, so its speed is set by the
bytes of the weights; int8 weights are a quarter of float32's. The scheme is the simplest that
holds up: per output channel (row ``o`` of the (out, in) weight), symmetric, no zero point::

    scale[o] = max_i |W[o, i]| / 127          q[o, i] = round(W[o, i] / scale[o])  in [-127, 127]

so ``W ~ scale[:, None] * q`` with an error of at most half a step (``scale / 2``) per weight.
Activations stay float32: ``y = (x @ q^T) * scale + b``, the product done by PyTorch's own
int8-weight kernel (``aten._weight_int8pack_mm``) for the few rows of a decode step, and as a
float32 product with the weights dequantized on the fly for the many rows of a prefill or an
evaluation (where the kernel is slow, and the dequantized copy costs little beside the product).

What is quantized, by ``quantize_int8``: every ``nn.Linear`` of the model (attention's q/k/v and
output projections, the MLP's, the untied ``lm_head``) -- the matrices a decode step reads in
full. Kept in float32: embedding tables (a step reads one row of each, not the table) and so a
head tied to the token embedding (it *is* that table), norms and biases. This happens at load
time, on the loaded model; ``tinygpt.models`` knows nothing of it, and checkpoints and the
exported Hugging Face model stay float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# At most this many rows go through the int8 kernel; more are multiplied dequantized.
KERNEL_ROWS = 16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), float32 scale (out,)): symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row: any scale will do
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (scale[:, None] * weight_int8)^T + bias`` for float ``x`` (..., in)."""
    rows = x.numel() // x.shape[-1]
    if rows <= KERNEL_ROWS and x.is_cpu and x.dtype == scale.dtype == torch.float32:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), weight_int8, scale)
        y = y.reshape(*x.shape[:-1], -1)
    else:
        y = F.linear(x, weight_int8.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with its weight stored as int8 and a float32 scale per output channel
    (see the module docstring); the bias, if any, stays as it was."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                               requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.scale, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 (out, in) weight this layer multiplies by."""
        return self.weight_int8.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` by an ``Int8Linear`` -- except one
    whose weight is also an embedding table (a tied head). Returns ``model``."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and id(child.weight) not in tables:
                setattr(parent, name, Int8Linear(child))
    return model


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the int8 weights and their scales in ``model``."""
    return sum(m.weight_int8.numel() + 4 * m.scale.numel()
               for m in model.modules() if isinstance(m, Int8Linear))
