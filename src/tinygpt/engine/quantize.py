"""int8 weight-only models: each linear layer's weight as rows of 8-bit values, each row with
its own float32 scale and offset.

A batch-1 decode step reads every weight once for two flops each, so its speed is set by the
bytes of the weights; 8-bit weights are a quarter of float32's (plus 8 bytes per row of 96 or
more values). The layout is the embedding-bag table of ``tinygpt.engine.bags``: W^T (in, out),
cut by columns into ``parts``, so that a row of the table is one input channel's weights in one
part, ``w = out / parts`` values. Each row is quantized on its own range, asymmetrically::

    scale = (max - min) / 255        bias = min        q = round((v - bias) / scale)  in [0, 255]

so ``v ~ scale * q + bias`` with an error of at most half a step (``scale / 2``) per weight --
fbgemm's "8-bit rowwise" format (``quantized.embedding_bag_byte_prepack``: each row its w bytes
then its scale and bias as float32). Activations stay float32. A product of up to ``BAG_ROWS``
rows on the CPU (decode steps) is fbgemm's 8-bit embedding bag over that table, which reads the
bytes and dequantizes them on the fly; more rows (a prefill, an evaluation batch, a batch of
more than ``BAG_ROWS`` sequences), or another device, multiply by the table unpacked to float32
for the call, one matrix product per part, or from ``WIDE_ROWS`` rows on by the whole weight
unpacked (the copy costs little beside a product of many rows).

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

from tinygpt.engine.bags import bag_product, bag_table, column_parts, few_rows, table_product

# Rows of the table hold at least this many values where the output width allows, so that the
# 8 bytes of a row's scale and bias add at most a twelfth.
MIN_ROW_WIDTH = 96
# Bytes after a row's values: its scale and its bias, float32 each.
ROW_EXTRA = 8
# From this many rows on (an evaluation batch), one product with the whole unpacked weight beats
# one product per part (each only out / parts columns wide), which wins below it: measured on a
# 2-core AMD EPYC with the lecture-size shapes (equal near 4k rows, 15% apart at 16k).
WIDE_ROWS = 4096


def quantize_table(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """W (out, in) as the uint8 table (parts * in, out / parts + 8): each row's 8-bit values,
    then its scale and bias (see the module docstring). Made on the CPU, where the kernel is."""
    table = bag_table(weight.detach().float().cpu(), parts)
    return torch.ops.quantized.embedding_bag_byte_prepack(table)


def unpack_table(packed: torch.Tensor) -> torch.Tensor:
    """The float32 table (rows, w) that ``packed`` holds, on its device: ``scale * q + bias``
    per row (fbgemm's unpacking on the CPU, the same arithmetic in torch elsewhere)."""
    if packed.is_cpu:
        return torch.ops.quantized.embedding_bag_byte_unpack(packed)
    return unpack_table_in_torch(packed)


def unpack_table_in_torch(packed: torch.Tensor) -> torch.Tensor:
    """``unpack_table`` in plain torch operations, for any device."""
    scale_bias = packed[:, -ROW_EXTRA:].contiguous().view(torch.float32)  # (rows, 2)
    return packed[:, :-ROW_EXTRA].float() * scale_bias[:, :1] + scale_bias[:, 1:]


def dequantize_table(packed: torch.Tensor, parts: int) -> torch.Tensor:
    """The float32 (out, in) weight that the table ``packed`` holds, on its device."""
    k = packed.shape[0] // parts
    w_t = unpack_table(packed).view(parts, k, -1).transpose(0, 1).reshape(k, -1)  # W^T (in, out)
    return w_t.t()


def _byte_bag(packed: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """fbgemm's 8-bit rowwise embedding bag: per bag, the dequantized rows times ``weights``."""
    return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        packed, indices, offsets, False, 0, False, weights, None, False)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, parts: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for float ``x`` (..., in), W held by the table ``packed``."""
    if x.is_cpu and x.dtype == torch.float32 and few_rows(x):
        out = parts * (packed.shape[1] - ROW_EXTRA)
        y = bag_product(_byte_bag, packed, x, parts, out)
    elif x.numel() < WIDE_ROWS * x.shape[-1]:  # more rows: products with the table unpacked for this call
        y = table_product(unpack_table(packed).to(x.dtype), x, parts)
    else:  # very many: one product with the whole weight, unpacked for this call
        y = F.linear(x, dequantize_table(packed, parts).to(x.dtype))
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with its weight stored as an 8-bit table (see the module docstring); the
    bias, if any, stays as it was."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.parts = column_parts(linear.out_features, MIN_ROW_WIDTH)
        packed = quantize_table(linear.weight, self.parts)
        self.register_buffer("weight_packed", packed.to(linear.weight.device))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                               requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_packed, self.parts, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 (out, in) weight this layer multiplies by."""
        return dequantize_table(self.weight_packed, self.parts)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 in {self.parts} parts")


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
    """Bytes of the int8 tables (values, scales and biases) in ``model``."""
    return sum(m.weight_packed.numel() for m in model.modules() if isinstance(m, Int8Linear))
