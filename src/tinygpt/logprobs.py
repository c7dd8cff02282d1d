"""Log-probabilities of the tokens of a text: how sure the model was of each one.

At every position the model gives a distribution over the next token. The entry of a token holds
the log-probability the model gave it and the ``k`` most likely tokens at that point with theirs
(plus the chosen one, so a dict holds up to ``k + 1`` entries). These are the model's own
log-probabilities, ``log_softmax(logits)``: before temperature, top-k and top-p reshape the
distribution for sampling, so they say how sure the model was, whatever the sampling settings.

With a character model one token is one character. With byte-level BPE a token may stand for
several characters, or for bytes of one that the next tokens complete; ``chars`` says how many
characters of the text each token completes (``tinygpt.serve.logprobs`` turns entries into the
OpenAI API's shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from tinygpt.engine import Engine
from tinygpt.generate import slide_window
from tinygpt.models.modes import eval_mode


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text of every token id a model with ``vocab_size`` outputs can produce (ids beyond
    the tokenizer's, in a padded vocabulary, spell nothing)."""
    return [tokenizer.token_text(i) if i < tokenizer.vocab_size else ""
            for i in range(vocab_size)]


class TokenLogprob(NamedTuple):
    """One position: the character, its log-probability and the most likely alternatives.

    The first character of an echoed prompt has nothing before it: ``logprob`` and ``top`` are
    None there, as in OpenAI's API.
    """

    token: str
    logprob: float | None
    top: dict[str, float] | None
    chars: int = 1  # characters of the text this token completes (0 for a partial character)


def score(logits: torch.Tensor, token: int, k: int, chars: Sequence[str], width: int = 1
          ) -> TokenLogprob:
    """The entry for ``token`` chosen after next-token ``logits`` (V,); ``chars`` is the text of
    every token, ``width`` the number of characters ``token`` completes."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    values, ids = logp.topk(min(k, logp.numel()))
    top = {chars[i]: v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
    chosen = chars[token]
    top.setdefault(chosen, float(logp[token]))  # the chosen character is always listed
    return TokenLogprob(chosen, float(logp[token]), top, width)


@torch.inference_mode()
def prompt_logits(engine: Engine, ids: Sequence[int]) -> torch.Tensor:
    """Next-token logits (T - 1, V) at each position of a prompt: row n - 1 predicts ``ids[n]``.

    Each position sees the window that generation would give it (``slide_window`` with the
    engine's block size and shift), so scoring a text and generating it agree. Positions that
    share a window are computed in one forward pass.
    """
    model, bs, shift = engine.model, engine.block_size, engine.window_shift
    idx = torch.tensor(ids, dtype=torch.long, device=engine.device)
    out = torch.empty(len(ids) - 1, engine.vocab_size)
    windows: dict[int, list[int]] = {}  # window start -> [first, last] n that use it
    start = 0
    for n in range(1, len(ids)):  # predict ids[n] from ids[:n]
        start = slide_window(start, n, bs, shift)
        windows.setdefault(start, [n, n])[1] = n
    with eval_mode(model):
        for start, (first, last) in windows.items():
            logits, _ = model(idx[None, start:last])  # (1, last - start, V); j predicts start+j+1
            out[first - 1 : last] = logits[0, first - 1 - start :].float().cpu()
    return out


def score_prompt(engine: Engine, ids: Sequence[int], k: int, chars: Sequence[str],
                 widths: Sequence[int] | None = None) -> list[TokenLogprob]:
    """The entries of every token of a prompt (the first has none: nothing precedes it);
    ``widths``: the characters each token completes (default: one each)."""
    widths = widths or [1] * len(ids)
    entries = [TokenLogprob(chars[ids[0]], None, None, widths[0])]
    if len(ids) > 1:
        logits = prompt_logits(engine, ids)
        entries += [score(logits[n - 1], ids[n], k, chars, widths[n]) for n in range(1, len(ids))]
    return entries
