"""Decode steps: the model's own forward for one new token per sequence, made lean.

At batch 1 a decode step multiplies one vector by every weight matrix: about 25 matrix-vector
products that read all the weights once (43 MB for the lecture's model) for two flops per
weight, and about 100 small operations (norms, attention over the cache, the activation) of
8-25 us each. Two things decide its speed, and this module handles both from outside the model,
which stays as it is:

* The layout of each weight matrix. ``F.linear(x, W)`` reads W (out, in) as one dot product per
  output; with W stored transposed -- (in, out) in memory, the same (out, in) matrix to
  ``F.linear`` -- the BLAS library adds up rows scaled by the entries of x instead; MKL can also
  keep its own packed copy of W for products of one row; and W^T can be an embedding table
  whose rows an embedding bag adds up, scaled by x (``tinygpt.engine.bags``: ATen's kernel, not
  the BLAS library's). On the AMD EPYC measured here the bag streams the weights fastest, the
  transposed copy next; elsewhere the plain product may win. All are float32 sums of the same
  products (in another order: the results differ in the last bits only), so
  ``measure_decode_layouts`` times the ones this build of torch offers once per process and the
  fastest is used for each matrix shape. (int8 layers, ``tinygpt.engine.quantize``, have one
  kernel: they are called directly.)
* The bookkeeping around ~100 small operations. ``nn.Module.__call__`` costs a few us per
  layer (an eval-mode ``nn.Dropout`` as much as a small matmul), which is a third of a step of a
  small model. ``DecodeModel`` runs the model's own ``forward`` code (``GPT``, ``Block``,
  ``MultiHeadAttention``, ... as written in ``tinygpt.models``) on stand-ins of its layers: each
  ``nn.Linear`` a direct ``F.linear`` on the weight in its layout, each norm or embedding a direct
  call of its one operation, each dropout nothing (eval mode); a layer of any other kind is
  called as it is. The computation is the model's: a new option needs nothing here (at worst, a
  new kind of layer costs a few us per call).

``DECODE_LAYOUTS``: "auto" (measured), "linear" (the weights as stored), "transposed" (transposed
copies), "packed" (MKL's packed copies), "bag" (embedding-bag tables), or "model" (no stand-ins:
the model itself, as for a prefill). docs/generation.md has what else was tried and why it was left out.
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

from tinygpt.engine.bags import bag_product, bag_table, column_parts, few_rows
from tinygpt.engine.quantize import Int8Linear, int8_linear
from tinygpt.models.gpt import GPT
from tinygpt.models.kv_cache import KVCache

DECODE_LAYOUTS = ("auto", "model", "linear", "transposed", "packed", "bag")
# Forces the layout of decode steps: "model" (the model's own forward, no stand-ins), "linear"
# (the weights as stored), "transposed" (transposed copies), "packed" (MKL's packed copies),
# "bag" (embedding-bag tables) or "auto" (measured).
DECODE_LAYOUT_ENV = "TINYGPT_DECODE_LAYOUT"
# The layouts "auto" measures (those this build of torch offers), in order of preference on a tie.
MEASURED_LAYOUTS = ("linear", "transposed", "packed", "bag")
# Measured layouts, per (device, dtype, weight shapes in order, threads): once per process.
_MEASURED_LAYOUTS: dict[tuple, dict[tuple[int, int], str]] = {}


def transposed_copy(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix, stored (in, out) row-major: ``F.linear`` then hands the BLAS
    library the copy as it lies in memory, and x @ W^T adds up its rows scaled by x."""
    return weight.detach().t().contiguous().t()


def _plain(weight: torch.Tensor, bias: torch.Tensor | None, copy: bool):
    w = transposed_copy(weight) if copy else weight
    return functools.partial(F.linear, weight=w, bias=bias), w


def _float_bag(table: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """ATen's embedding bag: per bag, the sum of ``table``'s rows ``indices`` times ``weights``."""
    return torch.embedding_bag(table, indices, offsets, False, 0, False, weights, False)[0]


def _bag(weight: torch.Tensor, bias: torch.Tensor | None):
    """W^T as an embedding table, cut by columns into parts: the product of up to ``BAG_ROWS``
    rows is a weighted sum of its rows (``tinygpt.engine.bags``); more rows multiply by the
    weight as stored."""
    out = weight.shape[0]
    parts = column_parts(out)
    table = bag_table(weight, parts)

    def run(x: torch.Tensor) -> torch.Tensor:
        if not few_rows(x):
            return F.linear(x, weight, bias)
        y = bag_product(_float_bag, table, x, parts, out)
        return y if bias is None else y + bias

    return run, table


def _packed(weight: torch.Tensor, bias: torch.Tensor | None):
    """MKL's own copy of the weight, packed for products of one row (a batch of another size
    falls back, inside ``_mkl_linear``, to a plain product with the weight as stored)."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), 1)
    linear = torch.ops.mkl._mkl_linear

    def run(x: torch.Tensor) -> torch.Tensor:
        return linear(x, packed, weight, bias, 1)

    return run, packed


# layout -> (weight, bias) -> (the function x -> x @ W^T + b, the tensor it reads as its weight)
LAYOUT_KERNELS: dict[str, Callable] = {
    "linear": lambda w, b: _plain(w, b, copy=False),
    "transposed": lambda w, b: _plain(w, b, copy=True),
    "packed": _packed,
    "bag": _bag,
}


@functools.cache
def layout_available(layout: str) -> bool:
    """Whether this build of torch runs ``layout`` on a float32 CPU tensor (tried once on a small
    matrix: a missing operator or a library that refuses shows here, not in a decode step)."""
    try:
        w, x = torch.randn(8, 4), torch.randn(1, 4)
        run, _ = LAYOUT_KERNELS[layout](w, None)
        return bool(torch.allclose(run(x), F.linear(x, w), atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def available_layouts() -> tuple[str, ...]:
    """The layouts of ``MEASURED_LAYOUTS`` that this build of torch runs."""
    return tuple(name for name in MEASURED_LAYOUTS if layout_available(name))


def measure_decode_layouts(weights: Sequence[torch.Tensor], rounds: int = 5,
                           layouts: Sequence[str] | None = None) -> dict[tuple[int, int], str]:
    """The fastest layout among ``layouts`` (default: the available ones of ``MEASURED_LAYOUTS``)
    for each shape among ``weights`` at batch 1.

    Each round multiplies a vector by every matrix in the order of a decode step (so, as in a
    real step, each matrix comes from memory rather than from a warm cache), in every layout
    back to back -- in an order that rotates, so that a burst of load elsewhere hits all alike --
    and each shape keeps its best total per layout over the rounds. A shape gets a copy
    ("transposed", "packed", "bag") only if that is at least 5% faster than the weight as stored: a copy
    costs memory. A noisy measurement can only cost speed, never exactness: every layout
    computes the same products (in another order: the results differ in the last bits).
    """
    layouts = list(layouts or available_layouts())
    runs = [[LAYOUT_KERNELS[name](w, None)[0] for name in layouts] for w in weights]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    best: dict[tuple, float] = {}
    for r in range(rounds):
        totals: dict[tuple, float] = {}
        for i, (w, kernels) in enumerate(zip(weights, runs)):
            x, shape = xs[w.shape[1]], tuple(w.shape)
            for k in range(len(layouts)):
                j = (k + r + i) % len(layouts)
                t0 = time.perf_counter()
                kernels[j](x)
                totals[shape, j] = totals.get((shape, j), 0.0) + time.perf_counter() - t0
        for key, t in totals.items():
            best[key] = min(best.get(key, math.inf), t)
    choice = {}
    for shape in {tuple(w.shape) for w in weights}:
        cost = [best[shape, j] * (1.0 if name == "linear" else 1 / 0.95)
                for j, name in enumerate(layouts)]
        choice[shape] = layouts[cost.index(min(cost))]
    return choice


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
    "linear", "transposed", "packed", "bag" or "auto"; see the module docstring).

    The stand-ins hold the model's own tensors (the other layouts than "linear" a copy),
    looked up once; each step checks (cheaply) that none of them was replaced or, for the
    copies, changed in place since, and looks again if one was. (Replacing a whole layer of the model is not
    noticed: make a new engine.)
    """

    def __init__(self, model: GPT, layout: str) -> None:
        self.model = model
        self.layout = layout
        linears = [m for m in model.modules() if type(m) is nn.Linear]  # decode-step order
        if layout == "auto" and linears:
            weights = [m.weight.detach() for m in linears]
            key = (str(weights[0].device), weights[0].dtype, tuple(tuple(w.shape) for w in weights),
                   torch.get_num_threads())
            if key not in _MEASURED_LAYOUTS:
                _MEASURED_LAYOUTS[key] = measure_decode_layouts(weights)
            self.choice = _MEASURED_LAYOUTS[key]  # (out, in) -> layout
        else:  # forced (Engine checked that it is available), or nothing to measure
            self.choice = {tuple(m.weight.shape): "linear" if layout == "auto" else layout
                           for m in linears}
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
        if kind is Int8Linear:  # int8 weights (--quantize int8): the kernel, called directly
            return functools.partial(int8_linear, packed=self._ref(module, "weight_packed"),
                                     parts=module.parts, bias=self._ref(module, "bias"))
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
        layout = self.choice[tuple(weight.shape)]
        if layout != "linear":
            # A copy: stale once the weights change in place.
            self._copies.append((weight, weight._version, weight.data_ptr()))
        run, used = LAYOUT_KERNELS[layout](weight, bias)
        self._linears.append(used)
        return run


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
