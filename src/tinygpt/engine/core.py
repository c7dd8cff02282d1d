"""The engine: next-token logits for many sequences at once, with a key/value cache.

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

Decode steps. Prefill runs the model's forward; a step of one new token per sequence runs the same
forward on lean stand-ins of the model's layers, each weight matrix in the layout that multiplies
a vector fastest on this CPU (measured once per process): ``tinygpt.engine.decode``.

The cache itself (``KVCache``) belongs to the model: ``tinygpt.models.kv_cache``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn

from tinygpt.engine.decode import (
    DECODE_LAYOUT_ENV,
    DECODE_LAYOUTS,
    MEASURED_LAYOUTS,
    DecodeModel,
    available_layouts,
    fast_decode_supported,
    layout_available,
)
from tinygpt.generate import default_window_shift, slide_window
from tinygpt.models.gpt import GPT
from tinygpt.models.kv_cache import KVCache
from tinygpt.models.modes import eval_mode


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
    of one new token per sequence runs: see ``tinygpt.engine.decode`` and ``DECODE_LAYOUTS``.
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
        if layout in MEASURED_LAYOUTS and not layout_available(layout):
            raise ValueError(f"decode layout {layout!r} is not available in this build of torch; "
                             f"use one of auto, model, {', '.join(available_layouts())}")
        # How a cached step of one new token per sequence runs: "model" is the model itself; the
        # others run its forward on stand-ins (DecodeModel), made at the first such step.
        self.decode_layout = layout
        self._decoder: DecodeModel | None = None
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
        with torch.inference_mode(), eval_mode(self.model):
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

    def _decode_step(self) -> DecodeModel | None:
        """The stand-ins for decode steps, made (and their layout measured) on first use; None
        where the model itself decodes: layout "model", not a float32 CPU GPT, autocast."""
        if (self.decode_layout == "model" or torch.is_autocast_enabled(self.device.type)
                or not fast_decode_supported(self.model)):  # (checked each time: model.to())
            return None
        if self._decoder is None:
            self._decoder = DecodeModel(self.model, self.decode_layout)
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
            cache = self._new_cache(len(group)) if keep else None
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

    def _new_cache(self, batch: int) -> KVCache:
        p = next(self.model.parameters())
        return KVCache.for_config(self.model.config, batch, p.device, p.dtype)

    def _batch_cache(self, group: list[SeqState]) -> KVCache:
        """A cache whose row r is ``group[r]``'s: the current one, or a new one copied together."""
        first = group[0]._cache
        if first.batch == len(group) and all(
            s._cache is first and s._row == r for r, s in enumerate(group)
        ):
            return first
        new = self._new_cache(len(group))
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
