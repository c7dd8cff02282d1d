"""Sampling text from a trained model, one token at a time.

The model only ever answers "what comes next?" as a distribution (logits over the vocabulary).
Generating text is a loop: feed the context, turn the last position's logits into probabilities,
draw a token, append it, repeat. Temperature, top-k and top-p reshape the distribution first
(the settings and their ranges: ``tinygpt.sampling``; a sequence being sampled, with its text
and stop strings: ``tinygpt.sequence``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.nn as nn

from tinygpt.device import draw_device
from tinygpt.models.modes import eval_mode
from tinygpt.sampling import SamplingConfig

__all__ = ["SamplingConfig", "default_window_shift", "filter_logits", "generate_tokens",
           "make_generator", "sample_next", "slide_window", "visible_controls"]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set the logits of excluded tokens to -inf. ``logits`` is (B, V).

    top-k keeps exactly ``k`` tokens per row; when several logits tie at the boundary, the ones
    with the lowest token ids are kept (a stable sort ranks ties in vocabulary order).
    top-p sorts by probability and keeps each token whose preceding cumulative probability is
    still below ``p``: the smallest prefix whose total reaches ``p``. The most likely token is
    always kept, so a ``p`` below its probability (even 5e-324) keeps exactly that one.
    """
    if top_k is not None and top_k < logits.size(-1):
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        drop = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, order[:, :top_k], False)
        logits = logits.masked_fill(drop, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass ranked above each token
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False  # p may round to 0 in float32: the first token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose the next token for each row of ``logits`` (B, V); returns (B,).

    Every setting that ``SamplingConfig`` accepts gives a token. Subtracting the row's maximum
    before dividing by the temperature keeps the largest scaled logit at exactly 0, so a tiny
    temperature sends the other logits to -inf (probability 0) instead of overflowing to
    +inf - inf = NaN in the softmax.
    """
    if sampling.greedy:
        return torch.argmax(logits, dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature  # (B, V), max 0
    logits = filter_logits(logits, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    where = generator.device if generator is not None else draw_device(probs.device)
    token = torch.multinomial(probs.to(where), num_samples=1, generator=generator)  # (B, 1)
    return token.squeeze(-1).to(logits.device)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # category Cc except \t and \n


def visible_controls(text: str) -> str:
    """``text`` with control characters other than newline and tab written as escapes.

    Model output shown on a terminal must not drive it: ESC (``\\x1b``) starts colour and cursor
    sequences, CR and backspace overwrite what is on screen. Each control character (Unicode
    category Cc: C0, DEL and C1) becomes ``\\xNN``; everything else is unchanged.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def default_window_shift(block_size: int) -> int:
    """Half the block: the window slides by half a block when the text outgrows it."""
    return max(1, block_size // 2)


def slide_window(start: int, n: int, block_size: int, shift: int) -> int:
    """Where the context window of a sequence of ``n`` tokens starts.

    The model sees at most ``block_size`` tokens. When the sequence outgrows the window that
    started at ``start``, the window moves on so that ``shift - 1`` tokens of room are left: it
    keeps the last ``block_size - shift + 1`` tokens. ``shift=1`` is the lecture's crop to the
    last ``block_size`` tokens at every step. A larger shift moves less often, which is what lets
    a key/value cache be reused for ``shift - 1`` steps (``tinygpt.engine``); in between, the
    model sees between ``block_size - shift + 1`` and ``block_size`` tokens.
    """
    if n - start > block_size:
        return n - (block_size - shift + 1)
    return start


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    block_size: int | None = None,
    window_shift: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence in ``idx`` (B, T), ``max_new_tokens`` times.

    The context is the window of at most ``block_size`` tokens that ``slide_window`` gives
    (``window_shift`` defaults to half the block). This re-runs the whole context for each new
    token: simple, and the reference for the cached engine, which gives the same tokens.
    """
    sampling = sampling or SamplingConfig()
    if block_size is not None:
        shift = window_shift or default_window_shift(block_size)
        start = max(0, idx.size(1) - block_size)
    with eval_mode(model):
        for _ in range(max_new_tokens):
            if block_size is None:
                context = idx
            else:
                start = slide_window(start, idx.size(1), block_size, shift)
                context = idx[:, start:]
            logits, _ = model(context)  # (B, T, V)
            nxt = sample_next(logits[:, -1, :], sampling, generator)  # (B,)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            yield nxt


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` modulo 2**64 (torch's seed range; the
    same draws as ``manual_seed(seed)`` for every seed torch takes), or randomly when None."""
    g = torch.Generator(device=draw_device(device))  # where sample_next draws (CPU for MPS)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % 2**64)
    return g
