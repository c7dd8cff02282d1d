"""Streamed text: sampling ``num_samples`` texts in one batch through the engine.

``stream`` samples ``num_samples`` texts in one batch and yields their text as it is produced;
``generate_text`` collects it. Each sample ``i`` draws from its own ``torch.Generator`` seeded with
``seed + i``, so a batch gives exactly the texts that one-by-one sampling with those seeds gives.
``TextStream`` cuts a sample's text at the first stop string, holding back what might be the
start of one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from tinygpt.engine.core import Engine, _is_int
from tinygpt.generate import SamplingConfig, generate_tokens, make_generator, sample_next


class TextStream:
    """The text of one sample as it grows, cut at the first stop string.

    ``feed`` returns the part of the text that is safe to show: it holds back a tail that might be
    the start of a stop string until the next characters decide. When a stop string is completed,
    the text ends where it begins (the stop string itself is not part of the text) and
    ``stopped`` becomes True. If several stop strings complete at once, the longest wins.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop = tuple(stop)
        self.text = ""  # everything released so far
        self.stopped = False
        self._pending = ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + piece
        cut = None  # (end, start) of the stop string completed first; the longest on a tie
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (cut is None or (i + len(s), i) < cut):
                cut = (i + len(s), i)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return self._release(buf[: cut[1]])
        hold = 0
        for k in range(min(len(buf), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stop):
                hold = k
                break
        self._pending = buf[len(buf) - hold :]
        return self._release(buf[: len(buf) - hold])

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        rest, self._pending = self._pending, ""
        return self._release(rest)

    def _release(self, text: str) -> str:
        self.text += text
        return text


class Piece(NamedTuple):
    """A piece of sample ``sample``'s text; ``finish`` is set on its last piece."""

    sample: int
    text: str
    finish: str | None = None  # "stop" (a stop string), "length" (max_new_tokens reached)


def stream(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    num_samples: int = 1,
    seed: int | None = None,
    stop: Sequence[str] = (),
    use_cache: bool = True,
    window_shift: int | None = None,
) -> Iterator[Piece]:
    """Sample ``num_samples`` continuations of ``prompt`` in one batch; yield text as it comes.

    ``tokenizer`` is a ``tinygpt.tokenizer.Tokenizer``; its ``text_decoder()`` gives the text in
    whole characters, a byte-level token that ends inside one waiting for the rest. Sample i
    draws from its own generator seeded ``seed + i`` (random if ``seed`` is None), so batching
    does not change the texts. Pieces of different samples interleave; each sample ends with one
    piece whose ``finish`` is set. The prompt is not repeated in the output.

    ``use_cache=False`` runs the reference loop (``generate_tokens``) instead, one sample after
    another: the same texts, slower.
    """
    sampling = sampling or SamplingConfig()
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    engine = Engine(model, use_cache, window_shift=window_shift)
    prompt_ids = tokenizer.encode(prompt)
    states = [engine.new_sequence(prompt_ids) for _ in range(num_samples)]
    texts = [TextStream(stop) for _ in range(num_samples)]
    decoders = [tokenizer.text_decoder() for _ in range(num_samples)]
    gens = [make_generator(None if seed is None else seed + i, engine.device)
            for i in range(num_samples)]
    if not use_cache:
        yield from _stream_reference(engine, decoders, prompt_ids, max_new_tokens, sampling,
                                     texts, gens)
        return
    active = list(range(num_samples))
    for _ in range(max_new_tokens):
        if not active:
            break
        logits = engine.step([states[i] for i in active])  # (len(active), V)
        if sampling.greedy:
            chosen = torch.argmax(logits, dim=-1).tolist()
        else:  # row by row, each with its own generator: the same draws as sampling alone
            chosen = [int(sample_next(logits[j : j + 1], sampling, gens[i])[0])
                      for j, i in enumerate(active)]
        still = []
        for i, tok in zip(active, chosen, strict=True):
            engine.append(states[i], tok)
            piece = texts[i].feed(decoders[i].push(tok))
            if texts[i].stopped:
                engine.release(states[i])
                yield Piece(i, piece, "stop")
                continue
            if piece:
                yield Piece(i, piece)
            still.append(i)
        active = still
    for i in active:
        yield Piece(i, _finish(texts[i], decoders[i]), "length")


def _finish(text: TextStream, decoder) -> str:
    """The rest of a sample that ran out of tokens: bytes of an unfinished character (as U+FFFD,
    like ``decode``) and whatever the stop-string check held back."""
    return text.feed(decoder.flush()) + text.finish()


def _stream_reference(engine, decoders, prompt_ids, max_new_tokens, sampling, texts, gens):
    for i, (text, gen, decoder) in enumerate(zip(texts, gens, decoders, strict=True)):
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=engine.device)
        tokens = generate_tokens(engine.model, idx, max_new_tokens, sampling, gen,
                                 engine.block_size, engine.window_shift)
        for t in tokens:
            piece = text.feed(decoder.push(int(t[0])))
            if text.stopped:
                tokens.close()
                yield Piece(i, piece, "stop")
                break
            if piece:
                yield Piece(i, piece)
        else:
            yield Piece(i, _finish(text, decoder), "length")


def generate_text(
    model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
    sampling: SamplingConfig | None = None, **kwargs,
) -> list[str]:
    """The ``num_samples`` texts that ``stream`` produces (without the prompt), in order."""
    texts = [""] * kwargs.get("num_samples", 1)
    for piece in stream(model, tokenizer, prompt, max_new_tokens, sampling, **kwargs):
        texts[piece.sample] += piece.text
    return texts
