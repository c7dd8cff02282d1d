"""A sequence being sampled, and the text it streams: the one generation loop.

``Sample`` is one sequence on its way: its engine state, its ``torch.Generator``, the decoder that
turns its tokens into whole characters, its stop strings (``TextStream``), the log-probabilities
of its tokens, its count of tokens against ``max_tokens`` and, once done, why it finished
("stop" or "length"). Whoever runs the model hands it each step's logits (``advance``) or the
token another loop chose (``add``) and gets back the text that is safe to show.

``stream`` and ``generate_text`` (the library and ``tinygpt sample``) drive samples in one batch
through an ``Engine``; the server's scheduler (``tinygpt.serve.scheduler``) drives the samples of
many requests the same way and keeps only admission, batching, deadlines and delivery. Sample
``i`` of a call or request draws from its own generator seeded ``seed + i``, so a batch gives
exactly the texts that one-by-one sampling with those seeds gives.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from tinygpt.engine import Engine, SeqState
from tinygpt.generate import generate_tokens, make_generator, sample_next
from tinygpt.logprobs import TokenLogprob, score, token_texts
from tinygpt.sampling import GenerationConfig, Rule, SamplingConfig, SettingError, StopRule
from tinygpt.tokenizer import Tokenizer

__all__ = ["GenerationConfig", "Piece", "Sample", "SamplingConfig", "TextStream",
           "generate_text", "stream"]


class TextStream:
    """The text of one sample as it grows, cut at the first stop string.

    ``feed`` returns the part of the text that is safe to show: it holds back a tail that might be
    the start of a stop string until the next characters decide. When a stop string is completed,
    the text ends where it begins (the stop string itself is not part of the text) and
    ``stopped`` becomes True. If several stop strings complete at once, the longest wins. A stop
    may also be a ``StopRule`` (a pattern: it says where it matches and how much to hold back).
    """

    def __init__(self, stop: Sequence[str | StopRule] = ()) -> None:
        if isinstance(stop, (str, StopRule)):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, (str, StopRule)) or not s:
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
            span = _find(s, buf)
            if span is not None and (cut is None or (span[1], span[0]) < cut):
                cut = (span[1], span[0])
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return self._release(buf[: cut[1]])
        hold = max((_held(s, buf) for s in self.stop), default=0)
        self._pending = buf[len(buf) - hold :]
        return self._release(buf[: len(buf) - hold])

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        rest, self._pending = self._pending, ""
        return self._release(rest)

    def _release(self, text: str) -> str:
        self.text += text
        return text


def _find(stop: str | StopRule, text: str) -> tuple[int, int] | None:
    """(start, end) of the first match of ``stop`` in ``text``, or None."""
    if isinstance(stop, str):
        i = text.find(stop)
        return None if i < 0 else (i, i + len(stop))
    return stop.find(text)


def _held(stop: str | StopRule, text: str) -> int:
    """How many characters at the end of ``text`` might be the start of ``stop``."""
    if not isinstance(stop, str):
        return stop.held(text)
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-k:]):
            return k
    return 0


class Sample:
    """One sequence being sampled: from the logits of each step to the text safe to show.

    ``index`` is its place in its call or request: it draws from a generator seeded
    ``config.seed + index`` (random when the seed is None) on ``device``, where the logits it is
    given live. ``start(engine)`` makes its engine state; a sample whose tokens come from
    elsewhere (the reference loop) has none. With ``config.logprobs`` set, ``entries`` holds
    one ``TokenLogprob`` per token; ``token_texts`` is the text of every token id (made from the
    tokenizer when not given).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], config: GenerationConfig,
                 index: int = 0, device: str | torch.device = "cpu",
                 token_texts: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.index = index
        self.generator = make_generator(config.seed_of(index), device)
        self.engine: Engine | None = None
        self.state: SeqState | None = None
        self.decoder = tokenizer.text_decoder()  # whole characters only
        self.stream = TextStream(config.stop)  # the text, cut before a stop string
        self.entries: list[TokenLogprob] = []
        self._entry_ends: list[int] = []  # characters up to the end of each entry
        self._token_texts = token_texts
        self.num_tokens = 0
        self.finish_reason: str | None = None  # "stop", "length"

    @property
    def text(self) -> str:
        """The text released so far: all of it once finished."""
        return self.stream.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def start(self, engine: Engine) -> None:
        """Make the engine's sequence of the prompt; a sample of 0 tokens is done at once."""
        self.engine = engine
        self.state = engine.new_sequence(self.prompt_ids)
        if self.config.max_tokens == 0:
            self.end("length")

    def advance(self, logits: torch.Tensor) -> str:
        """Draw the next token from its logits (V,) and record it (``add``)."""
        token = int(sample_next(logits[None], self.config.sampling, self.generator)[0])
        return self.add(token, logits)

    def add(self, token: int, logits: torch.Tensor | None = None) -> str:
        """Record the next token (``logits``: those it was drawn from, for its logprobs entry);
        returns the text it releases, and ends the sample at a stop string or at max_tokens."""
        if self.state is not None:
            self.engine.append(self.state, token)
        chars = self.decoder.push(token)  # whole characters only: maybe none yet
        if self.config.logprobs is not None and logits is not None:
            self._add_entry(score(logits, token, self.config.logprobs, self.token_texts(),
                                  len(chars)))
        self.num_tokens += 1
        text = self.stream.feed(chars)
        if self.stream.stopped:
            self.finish_reason = "stop"
            self.release()
        elif self.num_tokens >= self.config.max_tokens:
            text += self.end("length")
        return text

    def end(self, reason: str) -> str:
        """No more tokens will come (``reason``: "length" for max_tokens or a deadline): the rest
        of the text, which the stop strings held back, with an unfinished character as U+FFFD."""
        rest = self.stream.feed(self.decoder.flush()) + self.stream.finish()
        self.finish_reason = reason
        self.release()
        return rest

    def release(self) -> None:
        """Free the engine's cache of this sequence now (it is out of the batch)."""
        if self.state is not None:
            self.engine.release(self.state)
            self.state = None

    def entry_count(self, n_chars: int) -> int:
        """How many entries lie wholly within the first ``n_chars`` characters of the text."""
        return bisect.bisect_right(self._entry_ends, n_chars)

    def token_texts(self) -> Sequence[str]:
        if self._token_texts is None:
            vocab = self.engine.vocab_size if self.engine else self.tokenizer.vocab_size
            self._token_texts = token_texts(self.tokenizer, vocab)
        return self._token_texts

    def _add_entry(self, entry: TokenLogprob) -> None:
        self.entries.append(entry)
        self._entry_ends.append((self._entry_ends[-1] if self._entry_ends else 0) + entry.chars)


class Piece(NamedTuple):
    """A piece of sample ``sample``'s text; ``finish`` is set on its last piece."""

    sample: int
    text: str
    finish: str | None = None  # "stop" (a stop string), "length" (max_new_tokens reached)


def stream(
    model: nn.Module,
    tokenizer: Tokenizer,
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
    another: the same texts, slower. The settings follow their rules in ``tinygpt.sampling``
    (top-k at most the tokenizer's vocabulary); a bad one raises ``SettingError``.
    """
    config = _config(max_new_tokens, sampling, seed, stop, tokenizer.vocab_size)
    Rule(int, 1).check("num_samples", num_samples)
    engine = Engine(model, use_cache, window_shift=window_shift)
    prompt_ids = tokenizer.encode(prompt)
    samples = [Sample(tokenizer, prompt_ids, config, i, engine.device)
               for i in range(num_samples)]
    if use_cache:
        yield from _stream_batched(engine, samples)
    else:
        yield from _stream_reference(engine, samples)


def _config(max_new_tokens, sampling, seed, stop, vocab_size: int) -> GenerationConfig:
    """The settings of a ``stream`` call; a bad one raises ``SettingError``."""
    try:
        config = GenerationConfig(max_new_tokens, sampling or SamplingConfig(), seed, stop)
    except SettingError as e:
        raise e.named("max_new_tokens") if e.name == "max_tokens" else e from None
    config.sampling.check_vocab(vocab_size)
    return config


def _stream_batched(engine: Engine, samples: list[Sample]) -> Iterator[Piece]:
    """Every sample decoded together, one engine step per token."""
    for s in samples:
        s.start(engine)
    active = []
    for s in samples:
        if s.finished:  # max_new_tokens=0
            yield Piece(s.index, "", s.finish_reason)
        else:
            active.append(s)
    while active:
        logits = engine.step([s.state for s in active])  # (len(active), V)
        for s, row in zip(active, logits, strict=True):
            # row by row, each with its own generator: the same draws as sampling alone
            text = s.advance(row)
            if text or s.finished:
                yield Piece(s.index, text, s.finish_reason)
        active = [s for s in active if not s.finished]


def _stream_reference(engine: Engine, samples: list[Sample]) -> Iterator[Piece]:
    """One sample after another, each token from the uncached reference loop."""
    for s in samples:
        engine.new_sequence(s.prompt_ids)  # the cached path's checks of the prompt
        idx = torch.tensor([s.prompt_ids], dtype=torch.long, device=engine.device)
        tokens = generate_tokens(engine.model, idx, s.config.max_tokens, s.config.sampling,
                                 s.generator, engine.block_size, engine.window_shift)
        for t in tokens:
            text = s.add(int(t[0]))
            if text or s.finished:
                yield Piece(s.index, text, s.finish_reason)
            if s.finished:
                tokens.close()
                break
        if not s.finished:  # max_new_tokens=0
            yield Piece(s.index, s.end("length"), "length")


def generate_text(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
    sampling: SamplingConfig | None = None, **kwargs,
) -> list[str]:
    """The ``num_samples`` texts that ``stream`` produces (without the prompt), in order."""
    texts = [""] * kwargs.get("num_samples", 1)
    for piece in stream(model, tokenizer, prompt, max_new_tokens, sampling, **kwargs):
        texts[piece.sample] += piece.text
    return texts
