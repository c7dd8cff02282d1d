"""A product ``x @ W^T`` of a few rows, computed as weighted sums of table rows (embedding bags).

``x @ W^T`` for one row x (K,) is ``sum_i x[i] * W^T[i]``: the rows of W^T (in, out) added up,
each scaled by an entry of x. That is exactly what an embedding bag in "sum" mode with per-sample
weights computes -- the rows ``indices`` of a table, weighted, summed per bag -- and PyTorch's
CPU kernels for it (ATen's for float32, fbgemm's for rows of 8-bit values with a scale and a
bias each) stream the table faster than the BLAS library's matrix-vector path on the AMD EPYC
this project measures on (docs/generation.md has the figures).

To give every thread work, the table is W^T cut by columns into ``parts`` (the kernels run one
bag per thread), stacked: part p holds columns ``p*w .. (p+1)*w - 1`` (w = out / parts) of every
row of W^T, and bag p sums that part. For several rows of x the bags go part by part -- bag
``p * rows + r`` is row r's sum over part p -- so the rows that read one part read it one after
another, while it is in the cache::

    W (out, in) --> table (parts * in, w):  table[p * in + i, j] = W[p * w + j, i]
    y[r, p * w + j] = sum_i x[r, i] * table[p * in + i, j]

Each output is still a sum over i in order, so how many parts there are does not change a
float32 result. ``tinygpt.engine.decode`` (the "bag" layout) and ``tinygpt.engine.quantize``
(int8 weights) use this; more than ``BAG_ROWS`` rows go to an ordinary product (for a table:
``table_product``, one matrix product per part).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

# Parts per table: up to this many bags run side by side, one per thread.
MAX_PARTS = 8
# Products of more rows than this are ordinary matrix products: measured on a 2-core AMD EPYC
# (lecture-size shapes), the bags win from 1 to 8 rows and lose at 16.
BAG_ROWS = 8


def few_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` (..., in) has at most ``BAG_ROWS`` rows: a product for the bags."""
    return x.numel() <= BAG_ROWS * x.shape[-1]


def column_parts(out_features: int, min_width: int = 1) -> int:
    """The most parts, up to ``MAX_PARTS``, that cut ``out_features`` columns evenly into parts
    at least ``min_width`` wide (1 if none does)."""
    fits = [p for p in range(1, MAX_PARTS + 1)
            if out_features % p == 0 and out_features // p >= min_width]
    return max(fits, default=1)


def bag_table(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """The (parts * in, out / parts) table of W (out, in): see the module docstring."""
    out, k = weight.shape
    w = weight.detach().t().reshape(k, parts, out // parts)  # W^T, its columns cut in parts
    return w.transpose(0, 1).reshape(parts * k, out // parts).contiguous()


@functools.lru_cache(maxsize=256)
def _bags(parts: int, k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, offsets) of ``parts * rows`` bags of ``k`` table rows each, part by part."""
    indices = torch.arange(parts * k).reshape(parts, 1, k).expand(parts, rows, k).reshape(-1)
    return indices, torch.arange(parts * rows) * k


def bag_product(bag: Callable[..., torch.Tensor], table: torch.Tensor, x: torch.Tensor,
                parts: int, out_features: int) -> torch.Tensor:
    """``x @ W^T`` (..., out) for x (..., in), where ``bag(table, indices, offsets, weights)``
    sums the rows of W's table (``bag_table``, or a quantized copy of it) bag by bag:
    (parts * rows, out / parts)."""
    k = x.shape[-1]
    rows = x.numel() // k
    indices, offsets = _bags(parts, k, rows)
    weights = torch.cat([x.reshape(-1)] * parts)  # (parts, rows, k): x again for each part
    y = bag(table, indices, offsets, weights)
    if rows == 1:  # one bag per part: already in the order of the outputs
        return y.view(*x.shape[:-1], out_features)
    y = y.view(parts, rows, out_features // parts).transpose(0, 1)
    return y.reshape(*x.shape[:-1], out_features)


def table_product(table: torch.Tensor, x: torch.Tensor, parts: int) -> torch.Tensor:
    """``x @ W^T`` (..., out) for x (..., in) from W's float table (``bag_table``) as matrix
    products, one per part: for many rows, where the bags lose."""
    k = x.shape[-1]
    y = torch.matmul(x.reshape(1, -1, k), table.view(parts, k, -1))  # (parts, rows, out/parts)
    return y.transpose(0, 1).reshape(*x.shape[:-1], -1)
