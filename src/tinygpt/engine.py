"""Fast generation: a key/value cache and batched decoding.

The reference loop (``tinygpt.generate.generate_tokens``) feeds the whole context to the model for
every new token, although only the newest token is new: the keys and values that the earlier
positions produce in each attention layer are the same every time. The engine keeps them in a
cache instead. A sequence's prompt is run once (prefill); after that each step feeds one token per
sequence, whose query attends over the cached keys (decode). That turns a step's cost from
O(context) forward positions into O(1).

Sliding past the block size. The model sees at most ``block_size`` tokens. Once the window's first
token changes, every cached key is stale, for learned and rotary positions alike:

* learned positions: each token's position in the window changes, and the position vector is
  part of every key;
* rotary positions: scores only depend on position differences, so the first layer's keys would
  survive a shift, but from the second layer on a key also carries what its token gathered by
  attending to the tokens before it, and the oldest of those just left the window.

So the window does not creep forward one token per step; it jumps (``tinygpt.generate.
slide_window``): when the text outgrows it, it keeps the last ``block_size - window_shift + 1``
tokens, which are re-prefilled, and the next ``window_shift - 1`` steps decode from the cache
again. The default shift is half the block. The reference loop (``generate_tokens``) and the
uncached engine use the same windows, so all paths give the same tokens; ``window_shift=1`` is
the lecture's crop to the last ``block_size`` tokens at every step, which is exact but leaves the
cache nothing to reuse once the window is full.

Batches. ``Engine.step`` takes any list of sequences, at any lengths, in any order: new ones are
prefilled (grouped by prompt length), the others are decoded together. Rows of one batch cache may
have different lengths: every row gets its own positions and an attention mask that hides the
unused end of shorter rows. When the set of sequences in a decode batch changes (a request joins
or leaves), their cache rows are copied into a new batch cache once.

Decode steps. Prefill runs the model's forward; a step of one new token per sequence runs
``DecodeStep``, the same arithmetic for one position with each weight matrix in the layout that
multiplies a vector fastest on this CPU (measured once per process; see "the decode step" below).

Text. The sequences being sampled, their text and stop strings, and ``stream`` /
``generate_text`` are in ``tinygpt.sequence``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.generate import (
    default_window_shift,
    slide_window,
)
from tinygpt.models.gpt import GPT
from tinygpt.models.gpt_options import apply_rope, soft_cap


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class LayerCache:
    """One layer's view of a ``KVCache``: what ``CausalSelfAttention`` talks to."""

    __slots__ = ("cache", "layer")

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache = cache
        self.layer = layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.cache.update(self.layer, k, v)


class KVCache:
    """Keys and values of every layer for a batch of sequences, room for ``capacity`` positions.

    Row b's keys for positions ``0 .. lengths[b] - 1`` are valid; the rest of the row is zeros
    (never NaN: masked attention multiplies the values it hides by zero). ``GPT.forward`` calls
    ``prepare`` once, then every attention layer calls ``update`` for its layer.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_size: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch, n_head, capacity, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.lengths = [0] * batch  # cached positions per row
        self._layers = [LayerCache(self, i) for i in range(n_layer)]
        self._slot: slice | torch.Tensor = slice(0, 0)  # where this forward's keys go
        self._end = 0  # positions to attend over after this forward: max(lengths)
        self._mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: GPT, batch: int) -> KVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(
            cfg.n_layer, batch, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size,
            p.device, p.dtype,
        )

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def layer(self, i: int) -> LayerCache:
        return self._layers[i]

    def prepare(self, T: int) -> torch.Tensor:
        """Make room for ``T`` new tokens per row; return their positions, (B, T) or (T,)."""
        lens = self.lengths
        if max(lens) + T > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {max(lens) + T} needed")
        device = self.k.device
        self._end = max(lens) + T
        if all(n == lens[0] for n in lens):
            # All rows equally long (the usual case): one slice, and often no mask at all.
            L = lens[0]
            pos = torch.arange(L, L + T, device=device)  # (T,)
            self._slot = slice(L, L + T)
            if T == 1 or L == 0:
                self._mask = None  # one query sees all keys / a fresh prompt: plain causal
            else:
                keys = torch.arange(L + T, device=device)
                self._mask = keys[None, :] <= pos[:, None]  # (T, L + T)
        else:
            # Rows at different lengths: per-row positions, and a mask that also hides the
            # zero padding at the end of the shorter rows.
            pos = torch.tensor(lens, device=device)[:, None] + torch.arange(T, device=device)
            self._slot = pos  # (B, T)
            keys = torch.arange(self._end, device=device)
            self._mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, L)
        self.lengths = [n + T for n in lens]
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new keys/values (B, H, T, D) of ``layer``.

        Returns all keys and values so far, each (B, H, L, D), and the attention mask (or None).
        """
        kb, vb = self.k[layer], self.v[layer]  # (B, H, capacity, D)
        slot = self._slot
        if isinstance(slot, slice):
            kb[:, :, slot] = k
            vb[:, :, slot] = v
        else:
            rows = torch.arange(kb.size(0), device=kb.device)[:, None]  # (B, 1)
            # Indexing (rows, :, slot) selects (B, T, H, D), hence the transposes.
            kb[rows, :, slot] = k.transpose(1, 2)
            vb[rows, :, slot] = v.transpose(1, 2)
        return kb[:, :, : self._end], vb[:, :, : self._end], self._mask


# --- the decode step ---------------------------------------------------------------------------
#
# At batch 1 a decode step multiplies one vector by every weight matrix: about 25 matrix-vector
# products that read all the weights once (43 MB for the lecture's model) for two flops per
# weight. Their speed is the speed at which the BLAS library streams the weights, and that
# depends on the layout and on the CPU: ``F.linear(x, W)`` reads W (out, in) as one dot product
# per output; ``x @ Wt``, with a transposed copy Wt (in, out), adds up rows of Wt scaled by the
# entries of x. On some AMD CPUs the second streams the weights nearly twice as fast; elsewhere
# the first may win. Both are float32 sums of the same products (in another order: the results
# differ in the last bits only), so the engine measures both once per process and uses the
# faster one for each matrix shape. The rest of a step -- norms, attention over the cache, the
# activation -- is the model's own arithmetic, done for one position without the general
# forward's bookkeeping.

DECODE_LAYOUTS = ("auto", "model", "linear", "transposed")
# Forces the layout of decode steps: "model" (the model's own forward, no separate decode step),
# "linear" (the weights as stored), "transposed" (transposed copies) or "auto" (measured).
DECODE_LAYOUT_ENV = "TINYGPT_DECODE_LAYOUT"
# GPTConfig fields whose every value ``DecodeStep`` reproduces. A model with a field that is not
# listed here (an option added later) decodes through its own forward: slower, never wrong.
_DECODE_KNOWN_FIELDS = frozenset({
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "attn_dropout", "bias",
    "causal", "pos_embedding", "norm", "qk_norm", "mlp", "tie_embeddings", "zero_init",
    "logit_softcap",
})
_DECODE_MLPS = ("gelu", "gelu_tanh", "relu2", "swiglu")
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
    copies = [w.t().contiguous() for w in weights]  # (in, out)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    best: dict[tuple, float] = {}
    for r in range(rounds):
        totals: dict[tuple, float] = {}
        for i, (w, wt) in enumerate(zip(weights, copies)):
            x, shape = xs[w.shape[1]], tuple(w.shape)
            for layout in ("linear", "transposed") if (r + i) % 2 == 0 else ("transposed", "linear"):
                t0 = time.perf_counter()
                if layout == "linear":
                    F.linear(x, w)
                else:
                    torch.mm(x, wt)
                totals[shape, layout] = totals.get((shape, layout), 0.0) + time.perf_counter() - t0
        for key, t in totals.items():
            best[key] = min(best.get(key, math.inf), t)
    shapes = {tuple(w.shape) for w in weights}
    return {s: "transposed" if best[s, "transposed"] < 0.95 * best[s, "linear"] else "linear"
            for s in shapes}


class DecodeLinear:
    """An ``nn.Linear`` for decode steps: y = x W^T + b, with W as stored or a transposed copy."""

    __slots__ = ("weight", "bias", "transposed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> None:
        self.transposed = transposed
        # Transposed: (in, out) row-major, so that x @ weight adds up its rows scaled by x.
        self.weight = weight.detach().t().contiguous() if transposed else weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


class _DecodeLayer:
    """What a decode step uses of one block, looked up once: norms as plain functions, the
    linear layers in their decode layout."""

    __slots__ = ("ln_1", "q_norm", "k_norm", "n_head", "c_attn", "attn_proj", "ln_2", "act",
                 "c_fc", "c_gate", "mlp_proj")


def fast_decode_supported(model: nn.Module) -> bool:
    """Whether ``DecodeStep`` reproduces ``model``: a causal float32 GPT on the CPU with only
    options it knows (elsewhere the model's own forward decodes; on a GPU the layout question
    does not arise)."""
    if not isinstance(model, GPT) or not _known_config(type(model.config)):
        return False
    cfg = model.config
    p = model.wte.weight
    return (cfg.causal and cfg.mlp in _DECODE_MLPS and p.device.type == "cpu"
            and p.dtype == torch.float32)


@functools.cache
def _known_config(cls: type) -> bool:
    return {f.name for f in fields(cls)} <= _DECODE_KNOWN_FIELDS


class DecodeStep:
    """``GPT.forward`` with a cache for one new token per row, its linear layers in the layout
    chosen for this CPU (``layout``: "linear", "transposed" or "auto").

    It is the arithmetic of the model's forward for T = 1 -- the model's own embedding tables,
    norms, ``apply_rope``, the same ``KVCache`` and attention -- minus what one position in eval
    mode does not need: dropout, causal masks, the time axis. Activations are (B, C) rather than
    (B, 1, C), and with a single position the heads' (B, H, 1, D) layout is already the memory
    order of (B, C): no transposes. Everything it needs from the model is looked up once; each
    step checks (cheaply) that none of it was replaced or, for the copied matrices, changed.
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

    # --- what the step uses of the model, and whether it is still current ---------------------

    def _build(self) -> None:
        m = self.model
        self._watch: list[tuple[dict, str, torch.Tensor | None]] = []  # (table, name, tensor)
        self._copies: list[tuple[torch.Tensor, int, int]] = []  # (source, version, address)
        self.wte = self._ref(m.wte, "weight")
        self.wpe = None if m.wpe is None else self._ref(m.wpe, "weight")
        self.rope_rot = None if m.wpe is not None else self._ref(m, "rope_rot", "_buffers")
        self.layers = [self._layer(block) for block in m.blocks]
        self.ln_f = self._norm(m.ln_f)
        self.head = self._linear(m.lm_head)
        self.softcap = m.config.logit_softcap

    def _ref(self, module: nn.Module, name: str, table: str = "_parameters"):
        """``module.<name>`` (a parameter or a buffer), remembered so that a replacement shows."""
        entries = getattr(module, table)
        self._watch.append((entries, name, entries[name]))
        return entries[name]

    def _linear(self, linear: nn.Linear) -> DecodeLinear:
        weight, bias = self._ref(linear, "weight"), self._ref(linear, "bias")
        transposed = self.choice[tuple(weight.shape)] == "transposed"
        if transposed:  # a copy: stale once the weights change in place
            self._copies.append((weight, weight._version, weight.data_ptr()))
        return DecodeLinear(weight, bias, transposed)

    def _norm(self, norm: nn.Module):
        """The norm's forward as a plain function call (nn.Module's call costs more than a small
        norm); another kind of module is called as it is."""
        if type(norm) is nn.LayerNorm:
            return functools.partial(F.layer_norm, normalized_shape=norm.normalized_shape,
                                     weight=self._ref(norm, "weight"),
                                     bias=self._ref(norm, "bias"), eps=norm.eps)
        if type(norm) is nn.RMSNorm:
            return functools.partial(F.rms_norm, normalized_shape=norm.normalized_shape,
                                     weight=self._ref(norm, "weight"), eps=norm.eps)
        return norm

    def _layer(self, block: nn.Module) -> _DecodeLayer:
        layer = _DecodeLayer()
        attn, mlp = block.attn, block.mlp
        layer.ln_1, layer.ln_2 = self._norm(block.ln_1), self._norm(block.ln_2)
        layer.q_norm = None if attn.q_norm is None else self._norm(attn.q_norm)
        layer.k_norm = None if attn.k_norm is None else self._norm(attn.k_norm)
        layer.n_head = attn.n_head
        layer.c_attn, layer.attn_proj = self._linear(attn.c_attn), self._linear(attn.c_proj)
        layer.act = mlp.act
        layer.c_fc, layer.mlp_proj = self._linear(mlp.c_fc), self._linear(mlp.c_proj)
        layer.c_gate = self._linear(mlp.c_gate) if mlp.kind == "swiglu" else None
        return layer

    def linears(self) -> list[DecodeLinear]:
        """Every linear layer of the step, in model order."""
        names = ("c_attn", "attn_proj", "c_gate", "c_fc", "mlp_proj")
        found = [getattr(layer, n) for layer in self.layers for n in names]
        return [lin for lin in found if lin is not None] + [self.head]

    def _current(self) -> bool:
        return (all(entries[name] is t for entries, name, t in self._watch)
                and all(w._version == v and w.data_ptr() == ptr for w, v, ptr in self._copies))

    # --- the step ----------------------------------------------------------------------------

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) after the tokens ``idx`` (B, 1), appending their keys to ``cache``."""
        if not self._current():
            self._build()  # the model changed since the step looked at it
        pos = cache.prepare(1).view(-1)  # (1,): every row at one position, or (B,)
        x = F.embedding(idx.view(-1), self.wte)  # (B, C)
        rope = None
        if self.wpe is not None:
            x = x + F.embedding(pos, self.wpe)  # + (1, C) or (B, C)
        else:
            rope = self.rope_rot[pos].view(pos.size(0), 1, 1, -1)  # (1 or B, 1, 1, D/2)
        for i, layer in enumerate(self.layers):
            x = x + self._attend(layer, layer.ln_1(x), rope, cache, i)
            x = x + self._mlp(layer, layer.ln_2(x))
        logits = self.head(self.ln_f(x))  # (B, V)
        return logits if self.softcap is None else soft_cap(logits, self.softcap)

    @staticmethod
    def _attend(layer: _DecodeLayer, x: torch.Tensor, rope, cache: KVCache, i: int) -> torch.Tensor:
        B, C = x.shape
        H = layer.n_head
        # (B, 3C) -> three (B, H, 1, D): with one position, the order (B, 1, H, D) of the
        # model's view is this one.
        q, k, v = layer.c_attn(x).view(B, 3, H, 1, C // H).unbind(1)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v, mask = cache.update(i, k, v)  # (B, H, L, D); mask (B, 1, 1, L) or None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, D)
        return layer.attn_proj(y.reshape(B, C))

    @staticmethod
    def _mlp(layer: _DecodeLayer, x: torch.Tensor) -> torch.Tensor:
        h = layer.c_fc(x)  # (B, hidden)
        h = layer.act(h) if layer.c_gate is None else layer.act(layer.c_gate(x)) * h
        return layer.mlp_proj(h)


class SeqState:
    """One sequence being generated. Callers read ``tokens``; the rest is the engine's."""

    def __init__(self, engine: Engine, tokens: list[int]) -> None:
        self.tokens: list[int] = tokens  # prompt + generated tokens so far
        self._engine = engine
        self._cache: KVCache | None = None  # the batch cache that holds this sequence's keys
        self._row = 0  # its row there
        self._start: int | None = None  # index in tokens of the window's first token
        self._cached = 0  # tokens of the window whose keys are cached
        self._logits: torch.Tensor | None = None  # the last step's logits (V,)

    def __repr__(self) -> str:
        return f"SeqState({len(self.tokens)} tokens)"


class Engine:
    """Next-token logits for many sequences at once, with a key/value cache.

    ``model`` is a ``GPT`` or a ``BigramLM``. The cache is used for causal GPTs only: the bigram
    model looks at one token (there is nothing to cache) and a non-causal GPT's earlier positions
    change whenever the context grows; those are always recomputed, exactly like the reference.

    ``decode_layout`` (default ``$TINYGPT_DECODE_LAYOUT``, else "auto") chooses how a cached step
    of one new token per sequence runs: see ``DecodeStep`` and ``DECODE_LAYOUTS``.
    """

    def __init__(
        self, model: nn.Module, use_cache: bool = True, *, window_shift: int | None = None,
        decode_layout: str | None = None,
    ) -> None:
        layout = decode_layout or os.environ.get(DECODE_LAYOUT_ENV) or "auto"
        if layout not in DECODE_LAYOUTS:
            where = "decode_layout" if decode_layout else f"${DECODE_LAYOUT_ENV}"
            raise ValueError(f"unknown decode layout {layout!r} in {where}; use one of "
                             f"{', '.join(DECODE_LAYOUTS)}")
        # How a cached step of one new token per sequence runs: "model" is the model's own
        # forward; the others are the engine's DecodeStep (see above), made at the first such
        # step.
        self.decode_layout = layout
        self._decoder: DecodeStep | None = None
        self.model = model
        config = model.config
        self.block_size: int = getattr(config, "block_size", 1)
        self.vocab_size: int = config.vocab_size
        self.device = next(model.parameters()).device
        cacheable = isinstance(model, GPT) and config.causal
        self.use_cache = bool(use_cache) and cacheable
        ws = default_window_shift(self.block_size) if window_shift is None else window_shift
        if not _is_int(ws) or not 1 <= ws <= self.block_size:
            raise ValueError(
                f"window_shift must be an integer in [1, block_size={self.block_size}], got {ws!r}"
            )
        self.window_shift = ws

    def new_sequence(self, prompt_ids: Sequence[int]) -> SeqState:
        """A sequence starting with ``prompt_ids``; nothing is computed until ``step``."""
        tokens = [int(t) for t in prompt_ids]
        if not tokens:
            raise ValueError("the prompt must hold at least one token")
        for t in tokens:
            self._check_token(t)
        return SeqState(self, tokens)

    def append(self, state: SeqState, token: int) -> None:
        """Record the token chosen to follow ``state``."""
        state.tokens.append(self._check_token(int(token)))

    def release(self, state: SeqState) -> None:
        """Forget a finished sequence's cache now (dropping the state does the same, later)."""
        state._cache, state._cached, state._logits = None, 0, None

    def step(self, states: Sequence[SeqState]) -> torch.Tensor:
        """(N, V) float32 logits of the next token of each state, in order.

        Each state is fed the tokens the model has not yet seen: its (cropped) prompt if it is
        new or its window slid, else the tokens appended since its last step (usually one).
        """
        self._check(states)
        out = torch.empty(len(states), self.vocab_size, device=self.device)
        if not states:
            return out
        with torch.inference_mode(), self._eval_mode():
            if self.use_cache:
                self._step_cached(states, out)
            else:
                self._step_uncached(states, out)
        return out

    # --- internals -------------------------------------------------------------------------

    def _check_token(self, t: int) -> int:
        if not 0 <= t < self.vocab_size:
            raise ValueError(f"token id {t} is outside the vocabulary (size {self.vocab_size})")
        return t

    def _check(self, states: Sequence[SeqState]) -> None:
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a sequence appears twice in one step")
        for s in states:
            if not isinstance(s, SeqState) or s._engine is not self:
                raise ValueError("step() takes sequences made by this engine's new_sequence()")

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        if was_training:
            self.model.eval()  # no dropout while generating
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    def _forward_last(self, rows: list[list[int]], cache: KVCache | None = None) -> torch.Tensor:
        """Logits (N, V) after the last of each row's tokens (all rows equally long)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if cache is not None and idx.size(1) == 1 and self._decode_step() is not None:
            return self._decoder(idx, cache).float()
        if cache is None:
            logits, _ = self.model(idx)
        else:
            logits, _ = self.model(idx, cache=cache)
        return logits[:, -1, :].float()

    def _decode_step(self) -> DecodeStep | None:
        """The engine's decode step, made (and its layout measured) on first use; None where the
        model's own forward decodes: layout "model", a model it does not reproduce, autocast."""
        if (self.decode_layout == "model" or torch.is_autocast_enabled(self.device.type)
                or not fast_decode_supported(self.model)):  # (checked each time: model.to())
            return None
        if self._decoder is None:
            self._decoder = DecodeStep(self.model, self.decode_layout)
        return self._decoder

    def _step_uncached(self, states: Sequence[SeqState], out: torch.Tensor) -> None:
        # The reference: run the whole window, keep the last position's logits.
        by_len: dict[int, list[int]] = {}
        for j, s in enumerate(states):
            n = len(s.tokens)
            if s._start is None:
                s._start = max(0, n - self.block_size)
            s._start = slide_window(s._start, n, self.block_size, self.window_shift)
            by_len.setdefault(n - s._start, []).append(j)
        for T, js in by_len.items():
            out[js] = self._forward_last([states[j].tokens[-T:] for j in js])

    def _step_cached(self, states: Sequence[SeqState], out: torch.Tensor) -> None:
        bs = self.block_size
        prefill: dict[int, list[int]] = {}  # window length -> indices into states
        extend: dict[int, list[int]] = {}  # number of unseen tokens -> indices into states
        for j, s in enumerate(states):
            n = len(s.tokens)
            if s._start is None:
                s._start = max(0, n - bs)  # a new sequence: its prompt cropped to the block
            elif n - s._start > bs:
                # The window slides: every cached key is stale (see the module docstring).
                s._cache = None
                s._start = slide_window(s._start, n, bs, self.window_shift)
            if s._cache is None:
                prefill.setdefault(n - s._start, []).append(j)
                continue
            unseen = n - s._start - s._cached
            if unseen:
                extend.setdefault(unseen, []).append(j)
            else:  # stepped again with nothing new: same answer as last time
                out[j] = s._logits
        for T, js in prefill.items():
            group = [states[j] for j in js]
            # A full window slides at the next step anyway: no point in caching its keys.
            keep = T < bs or self.window_shift > 1
            cache = KVCache.for_model(self.model, len(group)) if keep else None
            out[js] = self._forward_last([s.tokens[s._start :] for s in group], cache)
            for row, s in enumerate(group):
                s._cache, s._row, s._cached = cache, row, T if keep else 0
        for T, js in extend.items():
            group = [states[j] for j in js]
            cache = self._batch_cache(group)
            out[js] = self._forward_last([s.tokens[-T:] for s in group], cache)
            for s in group:
                s._cached += T
        for j, s in enumerate(states):
            s._logits = out[j].clone()

    def _batch_cache(self, group: list[SeqState]) -> KVCache:
        """A cache whose row r is ``group[r]``'s: the current one, or a new one copied together."""
        first = group[0]._cache
        if first.batch == len(group) and all(
            s._cache is first and s._row == r for r, s in enumerate(group)
        ):
            return first
        new = KVCache.for_model(self.model, len(group))
        sources: dict[int, tuple[KVCache, list[int], list[int]]] = {}
        for r, s in enumerate(group):
            src = sources.setdefault(id(s._cache), (s._cache, [], []))
            src[1].append(s._row)
            src[2].append(r)
        for src, src_rows, dst_rows in sources.values():
            L = max(src.lengths[i] for i in src_rows)
            si = torch.tensor(src_rows, device=self.device)
            di = torch.tensor(dst_rows, device=self.device)
            new.k[:, di, :, :L] = src.k[:, si, :, :L]
            new.v[:, di, :, :L] = src.v[:, si, :, :L]
        new.lengths = [s._cache.lengths[s._row] for s in group]
        for r, s in enumerate(group):
            s._cache, s._row = new, r
        return new
