"""Throughput arithmetic: model FLOPs per token and the machine's measured matmul peak.

MFU (model FLOPs utilisation) = FLOPs per token x tokens per second / peak FLOP/s. The FLOPs are
those the model needs, counted from its shapes, not what the kernels happen to execute.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn


def flops_per_token(model: nn.Module, context: int, training: bool = True) -> float:
    """FLOPs to process one token with a context of ``context`` tokens.

    Every ``nn.Linear`` costs 2 FLOPs per weight per token (a multiply and an add); attention adds
    ``2 * 2 * context * n_embd`` per layer (scores ``q k^T`` and the weighted sum of values), the
    usual full-window convention. Embedding lookups are free. Training costs three times the
    forward pass (forward, and backward through activations and weights).
    """
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    forward = 2.0 * linear
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "n_layer"):
        forward += 4.0 * config.n_layer * context * config.n_embd
    return 3.0 * forward if training else forward


def measure_matmul_peak(size: int = 1024, seconds: float = 1.0, dtype=torch.float32) -> float:
    """FLOP/s of the best square ``size`` matmul run on this CPU with torch's current threads."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):  # warm up caches and thread pools
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        best = max(best, 2.0 * size**3 / dt)
    return best
