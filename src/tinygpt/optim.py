"""Optimizers and learning-rate schedules.

``adamw``: one AdamW for everything (weight decay on matrices and embeddings only).
``muon``: ``torch.optim.Muon`` for the 2-D weight matrices inside the transformer blocks, whose
updates it orthogonalises, and AdamW for everything Muon is not meant for: embeddings, the output
head, biases and norm gains. Both live behind one object with the optimizer methods the training
loop uses.

Schedules return a *factor* in [0, 1] that multiplies each parameter group's own peak learning
rate, so Muon and AdamW groups with different peaks follow the same curve. ``batch_size_at`` is
the batch-size warmup: small batches early, when a few noisy steps teach as much as one careful
step, then the full batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


def lr_factor(
    schedule: str,
    step: int,
    progress: float,
    warmup_steps: int,
    min_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate at ``step`` (a pure function).

    Both schedules warm up linearly over ``warmup_steps``. ``progress`` in [0, 1] is how far the
    run is (steps done / max steps, or time used / time budget) so the same curve stretches over a
    step count or a wall-clock budget.

    - ``cosine``: half a cosine from 1 down to ``min_ratio``.
    - ``wsd`` (warmup-stable-decay): flat at 1, then a linear decay to ``min_ratio`` over the last
      ``decay_fraction`` of the run. The long flat phase makes fast progress; the short decay
      collects it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        start = 1.0 - decay_fraction
        if p <= start:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * (p - start) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r} (expected one of: {', '.join(SCHEDULES)})")


def batch_size_at(step: int, batch_size: int, start: int | None, warmup_steps: int) -> int:
    """Sequences in the batch of ``step`` (a pure function).

    Without a warmup (``start`` None, or ``warmup_steps`` 0) every batch has ``batch_size``.
    Otherwise the size follows a line from ``start`` up to ``batch_size`` over ``warmup_steps``,
    rounded down to a multiple of ``start``: 8 -> 32 over 300 steps gives 8 for 100 steps, then
    16, then 24, then 32. Few distinct sizes keep a compiled model from recompiling often.
    """
    if start is None or step >= warmup_steps or start >= batch_size:
        return batch_size
    line = start + (batch_size - start) * step / warmup_steps
    return min(batch_size, start * int(line // start))


def tokens_seen(step: int, batch_size: int, start: int | None, warmup_steps: int,
                block_size: int) -> int:
    """Training tokens in the first ``step`` steps (see ``batch_size_at``)."""
    ramp = min(step, warmup_steps) if start is not None else 0
    sequences = sum(batch_size_at(i, batch_size, start, warmup_steps) for i in range(ramp))
    return (sequences + (step - ramp) * batch_size) * block_size


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Sort parameters into ``matrices`` (2-D weights inside the blocks), ``embeddings`` (token and
    position tables, the output head) and ``gains`` (biases and norm weights: everything 1-D)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrices": [], "embeddings": [], "gains": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.dim() < 2:
            groups["gains"].append((name, p))
        elif name.startswith("blocks.") and p.dim() == 2:
            groups["matrices"].append((name, p))
        else:
            groups["embeddings"].append((name, p))
    return groups


class CombinedOptimizer:
    """Several optimizers stepped together; looks like one to the training loop."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state has parts {sorted(state)}, expected {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(
    model: nn.Module,
    kind: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.99),
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
) -> CombinedOptimizer:
    """The optimizer for ``model``. Each param group records its peak rate as ``base_lr``."""
    parts = split_parameters(model)
    decayed = [p for _, p in parts["embeddings"]]
    gains = [p for _, p in parts["gains"]]
    matrices = [p for _, p in parts["matrices"]]
    if kind == "adamw":
        decayed = matrices + decayed
    elif kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r} (expected one of: {', '.join(OPTIMIZERS)})")
    adam_groups = [g for g in (
        {"params": decayed, "weight_decay": weight_decay, "base_lr": lr},
        {"params": gains, "weight_decay": 0.0, "base_lr": lr},
    ) if g["params"]]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": torch.optim.AdamW(adam_groups, lr=lr, betas=betas)
    }
    if kind == "muon" and matrices:
        optimizers["muon"] = torch.optim.Muon(
            [{"params": matrices, "base_lr": muon_lr}],
            lr=muon_lr, weight_decay=0.0, momentum=muon_momentum, adjust_lr_fn="original",
        )
    return CombinedOptimizer(optimizers)
