"""Decode steps: the model's own forward for one new token per sequence, made lean.

At batch 1 a decode step multiplies one vector by every weight matrix: about 25 matrix-vector
products that read all the weights once (43 MB for the lecture's model) for two flops per
weight, and about 100 small operations (norms, attention over the cache, the activation) of
8-25 us each. Two things decide its speed, and this module handles both from outside the model,
which stays as it is:

* The layout of each weight matrix. ``F.linear(x, W)`` reads W (out, in) as one dot product per
  output; with W stored transposed -- (in, out) in memory, the same (out, in) matrix to
  ``F.linear`` -- the BLAS library adds up rows scaled by the entries of x instead. On some AMD
  CPUs the second streams the weights nearly twice as fast; elsewhere the first may win. Both
  are float32 sums of the same products (in another order: the results differ in the last bits
  only), so ``measure_decode_layouts`` times both once per process and the faster one is used
  for each matrix shape.
* The bookkeeping around ~100 small operations. ``nn.Module.__call__`` costs a few us per
  layer (an eval-mode ``nn.Dropout`` as much as a small matmul), which is a third of a step of a
  small model. ``DecodeModel`` runs the model's own ``forward`` code (``GPT``, ``Block``,
  ``MultiHeadAttention``, ... as written in ``tinygpt.models``) on stand-ins of its layers: each
  ``nn.Linear`` a direct ``F.linear`` on the weight in its layout, each norm or embedding a direct
  call of its one operation, each dropout nothing (eval mode); a layer of any other kind is
  called as it is. The computation is the model's: a new option needs nothing here (at worst, a
  new kind of layer costs a few us per call).

``DECODE_LAYOUTS``: "auto" (measured), "linear" (the weights as stored), "transposed" (transposed
copies), or "model" (no stand-ins: the model itself, as for a prefill).
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.models.gpt import GPT
from tinygpt.models.kv_cache import KVCache

DECODE_LAYOUTS = ("auto", "model", "linear", "transposed")
# Forces the layout of decode steps: "model" (the model's own forward, no stand-ins), "linear"
# (the weights as stored), "transposed" (transposed copies) or "auto" (measured).
DECODE_LAYOUT_ENV = "TINYGPT_DECODE_LAYOUT"
# Measured layouts, per (device, dtype, weight shapes in order, threads): once per process.
_MEASURED_LAYOUTS: dict[tuple, dict[tuple[int, int], str]] = {}


def measure_decode_layouts(weights: Sequence[torch.Tensor], rounds: int = 5
                           ) -> dict[tuple[int, int], str]:
    """The faster layout, "linear" or "transposed", for each shape among ``weights`` at batch 1.

    Each round multiplies a vector by every matrix in the order of a decode step (so, as in a
    real step, each matrix comes from memory rather than from a warm cache), in both layouts
    back to back -- in alternating order, so that a burst of load elsewhere hits both alike --
    and each shape keeps its best total per layout over the rounds. A shape gets the transposed
    copy only if that is at least 5% faster: the copy costs memory. A noisy measurement can only
    cost speed, never exactness: both layouts compute the same products.
    """
    copies = [transposed_copy(w) for w in weights]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    best: dict[tuple, float] = {}
    for r in range(rounds):
        totals: dict[tuple, float] = {}
        for i, (w, wt) in enumerate(zip(weights, copies)):
            x, shape = xs[w.shape[1]], tuple(w.shape)
            for layout in ("linear", "transposed") if (r + i) % 2 == 0 else ("transposed", "linear"):
                t0 = time.perf_counter()
                F.linear(x, w if layout == "linear" else wt)
                totals[shape, layout] = totals.get((shape, layout), 0.0) + time.perf_counter() - t0
        for key, t in totals.items():
            best[key] = min(best.get(key, math.inf), t)
    shapes = {tuple(w.shape) for w in weights}
    return {s: "transposed" if best[s, "transposed"] < 0.95 * best[s, "linear"] else "linear"
            for s in shapes}


def transposed_copy(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix, stored (in, out) row-major: ``F.linear`` then hands the BLAS
    library the copy as it lies in memory, and x @ W^T adds up its rows scaled by x."""
    return weight.detach().t().contiguous().t()


def fast_decode_supported(model: nn.Module) -> bool:
    """Whether decode steps run on stand-ins: a causal float32 GPT on the CPU (elsewhere the
    model's own forward decodes: on a GPU the layout question does not arise)."""
    if not isinstance(model, GPT):
        return False
    p = model.wte.weight
    return model.config.causal and p.is_cpu and p.dtype == torch.float32


# The model's own classes (``GPT``, ``Block``, ...) run on stand-ins; layers from elsewhere as they are.
_MODEL_PACKAGE = GPT.__module__.rpartition(".")[0] + "."


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _StandIn:
    """A module's code, run on the stand-ins of its children: the base of the classes that
    ``_stand_in_class`` makes. An instance holds what the module's code reads -- its plain
    attributes, its parameters and buffers by name, a stand-in for each child -- and is always in
    eval mode."""

    def __init__(self, attrs: dict) -> None:
        self.__dict__.update(attrs)
        self.training = False


def _stand_in_class(cls: type) -> type:
    """A class with ``cls``'s own methods (those of its classes below ``nn.Module``, as they are
    now), whose call is ``cls.forward``: calling a stand-in runs the module's code with nothing
    in between."""
    own = cls.__mro__[: cls.__mro__.index(nn.Module)]
    namespace: dict = {}
    for klass in reversed(own):
        namespace.update({k: v for k, v in vars(klass).items() if not k.startswith("__")})
    namespace["__call__"] = cls.forward
    return type(f"{cls.__name__}StandIn", (_StandIn,), namespace)


class DecodeModel:
    """``model``'s forward with a cache for one new token per row, run on lean stand-ins of its
    layers, with each linear layer's weight in the layout chosen for this CPU (``layout``:
    "linear", "transposed" or "auto"; see the module docstring).

    The stand-ins hold the model's own tensors (the transposed layout a copy), looked up once;
    each step checks (cheaply) that none of them was replaced or, for the copies, changed in
    place since, and looks again if one was. (Replacing a whole layer of the model is not
    noticed: make a new engine.)
    """

    def __init__(self, model: GPT, layout: str) -> None:
        self.model = model
        self.layout = layout
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # decode-step order
        if layout == "auto":
            weights = [m.weight.detach() for m in linears]
            key = (str(weights[0].device), weights[0].dtype, tuple(tuple(w.shape) for w in weights),
                   torch.get_num_threads())
            if key not in _MEASURED_LAYOUTS:
                _MEASURED_LAYOUTS[key] = measure_decode_layouts(weights)
            self.choice = _MEASURED_LAYOUTS[key]  # (out, in) -> layout
        else:
            self.choice = {tuple(m.weight.shape): layout for m in linears}
        self._build()

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) after the tokens ``idx`` (B, 1), appending their keys to ``cache``."""
        if not self._current():
            self._build()  # the model's tensors changed since the stand-ins were made
        logits, _ = self._root(idx, cache=cache)
        return logits[:, -1]

    def linear_weights(self) -> list[torch.Tensor]:
        """The weight every linear layer multiplies by in a decode step, in model order."""
        return list(self._linears)

    # --- the stand-ins, and whether they are still current ------------------------------------

    def _build(self) -> None:
        self._watch: list[tuple[dict, str, torch.Tensor | None]] = []  # (table, name, tensor)
        self._copies: list[tuple[torch.Tensor, int, int]] = []  # (source, version, address)
        self._linears: list[torch.Tensor] = []
        self._classes: dict[type, type] = {}
        self._root = self._stand_in(self.model)
        # (tables, names, tensors), checked in one pass per step
        self._watched = tuple(zip(*self._watch)) or ((), (), ())

    def _current(self) -> bool:
        tables, names, tensors = self._watched
        return (all(map(operator.is_, map(operator.getitem, tables, names), tensors))
                and all(w._version == v and w.data_ptr() == ptr for w, v, ptr in self._copies))

    def _ref(self, module: nn.Module, name: str):
        """``module.<name>`` (a parameter or a buffer), remembered so that a replacement shows."""
        entries = module._parameters if name in module._parameters else module._buffers
        self._watch.append((entries, name, entries[name]))
        return entries[name]

    def _stand_in(self, module: nn.Module | None):
        """What a decode step calls in place of ``module``: see the module docstring."""
        if module is None:
            return None
        kind = type(module)
        if kind is nn.ModuleList:
            return [self._stand_in(m) for m in module]
        if kind is nn.Linear:
            return self._linear(module)
        if kind is nn.Dropout:
            return _identity  # eval mode
        if kind in _DIRECT:
            return _DIRECT[kind](module, self._ref)
        if not kind.__module__.startswith(_MODEL_PACKAGE):
            return module  # a layer from elsewhere: called as it is
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        for name in (*module._parameters, *module._buffers):
            attrs[name] = self._ref(module, name)
        for name, child in module._modules.items():
            attrs[name] = self._stand_in(child)
        if kind not in self._classes:
            self._classes[kind] = _stand_in_class(kind)
        return self._classes[kind](attrs)

    def _linear(self, linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        weight, bias = self._ref(linear, "weight"), self._ref(linear, "bias")
        if self.choice[tuple(weight.shape)] == "transposed":
            # A copy: stale once the weights change in place.
            self._copies.append((weight, weight._version, weight.data_ptr()))
            weight = transposed_copy(weight)
        self._linears.append(weight)
        return functools.partial(F.linear, weight=weight, bias=bias)


# A layer whose forward is one ATen operation, as a direct call of it (``torch.layer_norm`` is
# what ``F.layer_norm`` calls after its checks for tensor subclasses): module, ref -> callable.
_DIRECT: dict[type, Callable] = {
    nn.LayerNorm: lambda m, ref: functools.partial(
        torch.layer_norm, normalized_shape=m.normalized_shape, weight=ref(m, "weight"),
        bias=ref(m, "bias"), eps=m.eps, cudnn_enable=False),
    nn.RMSNorm: lambda m, ref: functools.partial(
        torch.rms_norm, normalized_shape=m.normalized_shape, weight=ref(m, "weight"), eps=m.eps),
    # (``padding_idx`` only matters for gradients; ``max_norm`` changes the table: not direct.)
    nn.Embedding: lambda m, ref: (functools.partial(torch.embedding, ref(m, "weight"))
                                  if m.max_norm is None else m),
}
