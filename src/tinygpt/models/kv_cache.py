"""The key/value cache a GPT reads and extends while generating (``GPT.forward(..., cache=)``).

Generating one token at a time, the keys and values every attention layer computes for the
earlier positions are the same at every step; the cache keeps them, so that each step computes
only the new positions'. ``KVCache`` holds them for every layer and a batch of sequences, each row
at its own length; ``GPT.forward`` calls ``prepare`` once per call, and each attention layer
talks to its ``LayerCache``. Who fills and reuses caches (prefill, decode, batching, a sliding
window) is the engine's business: ``tinygpt.engine``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tinygpt.models.config import GPTConfig


class LayerCache:
    """One layer's part of a ``KVCache``: what ``MultiHeadAttention`` talks to."""

    __slots__ = ("cache", "layer", "k", "v")

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache = cache
        self.layer = layer
        self.k, self.v = cache.k[layer], cache.v[layer]  # views, (B, H, capacity, D)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this layer's new keys/values (B, H, T, D) where ``KVCache.prepare`` said.

        Returns all keys and values so far, each (B, H, L, D), and the attention mask (or None).
        """
        kb, vb, cache = self.k, self.v, self.cache
        slot = cache._slot
        if isinstance(slot, slice):
            kb[:, :, slot] = k
            vb[:, :, slot] = v
        else:
            rows = torch.arange(kb.size(0), device=kb.device)[:, None]  # (B, 1)
            # Indexing (rows, :, slot) selects (B, T, H, D), hence the transposes.
            kb[rows, :, slot] = k.transpose(1, 2)
            vb[rows, :, slot] = v.transpose(1, 2)
        return kb[:, :, : cache._end], vb[:, :, : cache._end], cache._mask


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
    def for_config(
        cls,
        config: GPTConfig,
        batch: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache for ``batch`` sequences of a model with ``config``: room for its
        whole context (``block_size`` positions) in every layer."""
        return cls(config.n_layer, batch, config.n_head, config.n_embd // config.n_head,
                   config.block_size, device, dtype)

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
        """``layer(layer).update(k, v)``."""
        return self._layers[layer].update(k, v)
