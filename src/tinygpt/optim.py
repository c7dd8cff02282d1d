"""Optimizers and learning-rate schedules.

``adamw``: one AdamW for everything (weight decay on matrices and embeddings only).
``muon``: ``Muon`` (written below) for the 2-D weight matrices inside the transformer blocks,
whose updates it orthogonalises, and AdamW for everything Muon is not meant for: embeddings, the
output head, biases and norm gains. Both live behind one object with the optimizer methods the
training loop uses. Muon's Newton-Schulz iterations run in bfloat16 only where the device
multiplies bf16 natively (``tinygpt.device.native_bf16``), in float32 everywhere else -- and
there, for wide matrices, in the Gram order, which needs fewer products. Never in float16,
whose narrow range (its smallest normal number is 6e-5) would lose the small entries of the
normalised matrices and their powers: in a ``--dtype float16`` run (a T4, say) the weights,
gradients, momentum and iterations are all float32; only the forward and backward passes run
under float16 autocast, and the optimizers see gradients the scaler has already divided back to
their true size.

Schedules return a *factor* in [0, 1] that multiplies each parameter group's own peak learning
rate, so Muon and AdamW groups with different peaks follow the same curve. ``batch_size_at`` is
the batch-size warmup: small batches early, when a few noisy steps teach as much as one careful
step, then the full batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tinygpt.device import native_bf16

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


# --- Muon ------------------------------------------------------------------------------------
#
# Muon ("MomentUm Orthogonalized by Newton-Schulz") treats a weight matrix as a linear map rather
# than a bag of numbers. Its step is Nesterov momentum, made *orthogonal*: the momentum matrix
# M = U S V^T (its SVD) is replaced by about U V^T, every singular value pushed towards 1. A raw
# gradient of a matrix is dominated by a few directions (a few large singular values); AdamW's
# step follows them. The orthogonalised step moves the map by the same amount in every direction
# the gradient knows about, so the rare directions learn as fast as the common ones. An SVD per
# step would be slow, so Muon uses a few Newton-Schulz iterations: only matrix products.

MUON_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # a, b, c of the quintic (steepest at 0; see below)
MUON_NS_STEPS = 5
MUON_EPS = 1e-7
NS_DTYPES = (None, torch.float32, torch.bfloat16)  # None: bf16 only where it is native
# Settings every Muon parameter group must carry; torch.optim.Muon saves the same ones.
_MUON_GROUP_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                    "ns_steps", "adjust_lr_fn")


def newton_schulz(
    G: torch.Tensor,
    steps: int = MUON_NS_STEPS,
    coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
    eps: float = MUON_EPS,
    dtype: torch.dtype = torch.float32,
    gram: bool = False,
) -> torch.Tensor:
    """Approximately orthogonalise a stack of matrices: (N, m, n) with m <= n -> (N, m, n) in dtype.

    Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X, an odd polynomial p(x) = a x + b x^3
    + c x^5 applied to every singular value of X at once (U S V^T -> U p(S) V^T). Dividing by the
    Frobenius norm first puts every singular value in [0, 1]. a = 3.4445 is p's slope at 0: a
    small singular value grows ~3.4x per step, so five steps lift even tiny ones; the price is
    that p does not converge to 1 but wobbles around it, leaving singular values in roughly
    [0.7, 1.2]. That does not hurt training, and it is what torch.optim.Muon computes too.
    Working on the short side (m <= n) keeps the Gram matrix X X^T small: (m, m).

    ``gram=True`` computes the same iterations in another order (``newton_schulz_gram``), with
    fewer products when n is well above m.
    """
    a, b, c = coefficients
    X = G.to(dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius <= 1
    if gram:
        return newton_schulz_gram(X, steps, coefficients)
    for _ in range(steps):
        A = X @ X.mT                                  # (N, m, m) Gram matrix
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)   # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)            # a X + (b A + c A^2) X
    return X


def newton_schulz_gram(
    X: torch.Tensor, steps: int, coefficients: tuple[float, float, float]
) -> torch.Tensor:
    """``newton_schulz``'s steps on an already normalised (N, m, n) stack, done on the (m, m) side.

    Every step multiplies X on the left by a polynomial in X X^T, so after k steps X_k = Q_k X_0,
    where Q_k is a polynomial in S = X_0 X_0^T: symmetric, and it commutes with S. Then
    X_k X_k^T = Q_k S Q_k, and a step becomes Q <- a Q + (b A + c A^2) Q with A = Q S Q -- only
    (m, m) products. The wide X_0 is multiplied twice (S at the start, Q_5 X_0 at the end)
    instead of twice per step: for a (128, 512) matrix 105 MFLOP instead of 189. The price is
    rounding: S squares X's condition number, so in float32 the result is off by up to ~1e-3
    of its size (the direct order: ~1e-5), still far closer than bfloat16's 1e-2 and more.
    """
    if steps == 0:
        return X
    a, b, c = coefficients
    S = X @ X.mT                                      # (N, m, m)
    Q = torch.baddbmm(S, S, S, beta=b, alpha=c)       # step 1 from Q_0 = I: b S + c S^2 ...
    Q.diagonal(dim1=-2, dim2=-1).add_(a)              # ... + a I
    for _ in range(steps - 1):
        A = Q @ S @ Q                                 # X_k X_k^T
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)   # b A + c A^2
        Q = torch.baddbmm(Q, B, Q, beta=a)            # a Q + (b A + c A^2) Q
    return Q @ X                                      # (N, m, n)


def use_gram(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether ``newton_schulz_gram`` should orthogonalise (..., m, n) stacks in ``dtype``: where it
    needs fewer products (n >= 2m: 4 m^2 n + 34 m^3 FLOPs against 20 m^2 n + 10 m^3) and its
    rounding stays small (float32 or wider; in bfloat16 the squared condition number would cost
    too many digits)."""
    m, n = shape[-2], shape[-1]
    return n >= 2 * m and dtype in (torch.float32, torch.float64)


def muon_lr_scale(shape: torch.Size) -> float:
    """The "original" adjustment: tall matrices (rows > columns) take sqrt(rows / columns) more
    rate, so that every matrix's update has about the same size per entry (RMS)."""
    rows, cols = shape[0], shape[1]
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices: the update of ``torch.optim.Muon`` with ``adjust_lr_fn``
    "original", with its precision chosen per device and same-shape matrices done together.

    Per matrix W with gradient G (momentum mu, rate lr, weight decay wd):

        M <- mu M + (1 - mu) G                  momentum buffer (an average of gradients)
        U <- (1 - mu) G + mu M                  Nesterov: look one momentum step ahead
        O <- newton_schulz(U)                   orthogonalised (transposed if W is tall)
        W <- (1 - lr wd) W - lr sqrt(max(1, rows/cols)) O

    ``ns_dtype`` is the precision of the Newton-Schulz iterations: None (the default) uses
    bfloat16 where the parameters' device multiplies it in hardware (``native_bf16``) and float32
    everywhere else -- on a CPU without AMX or AVX512-BF16, bf16 products are emulated and many
    times slower. ``gram`` picks the order of the iterations' products: None (the default) takes
    ``newton_schulz_gram`` where ``use_gram`` says it is cheaper and precise enough, True or False
    force it on or off. The state is the same as ``torch.optim.Muon``'s (``momentum_buffer`` per
    parameter, the same group settings), so the state of a run saved with either loads into the
    other.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
        eps: float = MUON_EPS,
        ns_steps: int = MUON_NS_STEPS,
        ns_dtype: torch.dtype | None = None,
        gram: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Muon learning rate must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Muon weight decay must be >= 0, got {weight_decay}")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"Muon ns_dtype must be None, torch.float32 or torch.bfloat16, "
                             f"got {ns_dtype}")
        if gram not in (None, True, False):
            raise ValueError(f"Muon gram must be None (decide per stack), True or False, got {gram!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn="original")
        super().__init__(params, defaults)
        # A choice for this machine, not part of the run: it is not saved with the state, so a
        # run resumed on another kind of CPU decides afresh.
        self.ns_dtype = ns_dtype
        self.gram = gram
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices only, got shape "
                                     f"{tuple(p.shape)}")

    def iteration_dtype(self, device: torch.device) -> torch.dtype:
        """The precision of the Newton-Schulz iterations for parameters on ``device``."""
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if native_bf16(device) else torch.float32

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by this class or by ``torch.optim.Muon``; anything else is refused
        with one line rather than used half-understood."""
        for group in state_dict.get("param_groups", []):
            missing = [k for k in _MUON_GROUP_KEYS if k not in group]
            if missing:
                raise ValueError(f"the Muon state lacks the settings {', '.join(missing)}; "
                                 f"it was not saved by a compatible Muon")
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"the Muon state uses adjust_lr_fn={group['adjust_lr_fn']!r}; "
                                 f"only 'original' is supported")
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            buf = state.get("momentum_buffer")
            if buf is None or buf.shape != p.shape:
                raise ValueError(f"the Muon state has no momentum buffer of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        # Matrices with the same shape on their short side first -- (m, n), m <= n -- go through
        # Newton-Schulz together as one (N, m, n) stack: one batched product instead of N small
        # ones. A tall matrix is transposed, so c_fc (4C, C) and c_proj (C, 4C) share a stack.
        stacks: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not take sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)                               # mu M + (1 - mu) G
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            tall = p.shape[0] > p.shape[1]
            update = update.mT if tall else update                  # (m, n), m <= n
            key = (tuple(update.shape), p.device, p.dtype)
            stacks.setdefault(key, []).append((p, update))
        for (shape, device, _), items in stacks.items():
            dtype = self.iteration_dtype(device)
            gram = use_gram(shape, dtype) if self.gram is None else self.gram
            ortho = newton_schulz(
                torch.stack([u for _, u in items]), group["ns_steps"], group["ns_coefficients"],
                group["eps"], dtype, gram,
            )                                                       # (N, m, n)
            for (p, _), step in zip(items, ortho):
                step = step.mT if p.shape[0] > p.shape[1] else step  # back to p's shape
                if wd:
                    p.mul_(1 - lr * wd)                              # decoupled weight decay
                p.add_(step.to(p.dtype), alpha=-lr * muon_lr_scale(p.shape))


def build_optimizer(
    model: nn.Module,
    kind: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.99),
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_ns_dtype: torch.dtype | None = None,
) -> CombinedOptimizer:
    """The optimizer for ``model``. Each param group records its peak rate as ``base_lr``.
    ``muon_ns_dtype`` is the precision of Muon's Newton-Schulz iterations (None: bf16 only where
    the device multiplies it natively, see ``Muon``)."""
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
        optimizers["muon"] = Muon(
            [{"params": matrices, "base_lr": muon_lr}],
            lr=muon_lr, weight_decay=0.0, momentum=muon_momentum, ns_dtype=muon_ns_dtype,
        )
    return CombinedOptimizer(optimizers)
