"""The sampling settings, each defined once: what it means, the values it takes, its flag.

The library (``tinygpt.sequence.stream``), the API (``tinygpt.serve.protocol``) and
``tinygpt sample`` all check a setting against the ``Rule`` in its field's metadata, so the same
request means the same thing everywhere:

* ``temperature`` is a number from 0 to 2; 0 is greedy (always the most likely token).
* ``top_k`` is an integer from 0 to the vocabulary size; 0 (or leaving it out) turns it off.
* ``top_p`` is in (0, 1]; 1 (or leaving it out) turns it off.
* ``seed`` is a 64-bit signed integer; sample (choice) ``i`` draws from a generator seeded with
  ``seed + i`` reduced modulo 2**64, so a batch gives the texts one-by-one sampling gives.
* ``stop`` strings are non-empty; a text ends where the first of them begins. A stop may also be
  a ``StopRule``: a pattern rather than one string (the chat template's change of speaker).
* ``max_tokens`` (``--num-chars`` on the command line) is the number of tokens to generate.
* ``logprobs`` asks for each token's log-probability and this many alternatives, 0 to 5.

A server may set tighter limits of its own (``tinygpt.serve.options.ServeLimits``: longest
output, most stop strings); those are its policy, not another meaning.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TEMPERATURE = 2.0
FLOAT32_TINY = 2.0**-126  # float32's smallest normal number (torch.finfo(torch.float32).tiny)
MAX_LOGPROBS = 5  # the most alternatives a request may ask for, as in OpenAI's API


def shown(value) -> str:
    """``value`` as a message shows it: long integers shortened, strings quoted."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"{str(value)[:6]}... ({len(str(value).lstrip('-'))} digits)"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


class SettingError(ValueError):
    """A setting outside its rule. ``name`` is the field; ``named`` words it for a flag or a
    JSON parameter."""

    def __init__(self, name: str, words: str, value, label: str | None = None) -> None:
        self.name, self.words, self.value = name, words, value
        self.label = label or name
        super().__init__(f"{self.label} must be {words}, got {shown(value)}")

    def named(self, label: str) -> SettingError:
        return SettingError(self.name, self.words, self.value, label)


@dataclass(frozen=True)
class Rule:
    """The values of one setting: an integer (``kind=int``) or a finite number from ``low`` to
    ``high`` (``low`` itself excluded when ``open_low``), or None when ``optional``."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    optional: bool = False
    note: str = ""  # said after the range, e.g. " (0 turns it off)"

    def words(self, high: float | None = None) -> str:
        """The rule in a message: "between 0 and 2", "an integer >= 0", "in (0, 1]"."""
        high = self.high if high is None else high
        what = "an integer " if self.kind is int else ""
        low = _bound(self.low)
        if self.open_low:
            return f"{what}in ({low}, {_bound(high)}]{self.note}"
        if high is None:
            return f"{what or 'a number '}>= {low}{self.note}"
        return f"{what}between {low} and {_bound(high)}{self.note}"

    def check(self, name: str, value, high: float | None = None) -> None:
        """Raise ``SettingError`` unless ``value`` follows the rule (with ``high`` instead of
        the rule's own upper bound, when given: the vocabulary size of top-k)."""
        if value is None and self.optional:
            return
        high = self.high if high is None else high
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = is_int or (self.kind is float and isinstance(value, float) and math.isfinite(value))
        if ok and self.low is not None:
            ok = value > self.low if self.open_low else value >= self.low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            raise SettingError(name, self.words(high), value)


def setting(default, help: str, rule: Rule | None = None, flag: str | None = None, **kw):
    """A dataclass field whose metadata hold its meaning (``help``), ``rule`` and CLI ``flag``."""
    meta = {"help": help, "rule": rule, "flag": flag}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def rule_of(cls: type, name: str) -> Rule:
    return next(f for f in fields(cls) if f.name == name).metadata["rule"]


@dataclass
class SamplingConfig:
    """How the next token is drawn from the model's distribution."""

    temperature: float = setting(
        1.0, "0 is greedy: always the most likely token; higher flattens the distribution",
        Rule(float, 0, MAX_TEMPERATURE), "--temperature")
    top_k: int | None = setting(
        None, "keep the k most likely tokens",
        Rule(int, 0, None, optional=True, note=" (0 turns it off)"), "--top-k")
    top_p: float | None = setting(
        None, "nucleus sampling: keep the most likely tokens whose probabilities add up to p",
        Rule(float, 0, 1, open_low=True, optional=True, note=" (1 turns it off)"), "--top-p")

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["rule"].check(f.name, getattr(self, f.name))
        if self.top_k == 0:
            self.top_k = None
        if self.top_p is not None and self.top_p >= 1:
            self.top_p = None

    @property
    def greedy(self) -> bool:
        """True when sampling is the same as taking the most likely token.

        That is temperature 0, and also a temperature too small for float32 (below its smallest
        normal number, ~1.2e-38): dividing by it would turn every logit gap into infinity.
        """
        return self.temperature < FLOAT32_TINY

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``SettingError`` if top-k asks for more tokens than the vocabulary holds."""
        rule_of(SamplingConfig, "top_k").check("top_k", self.top_k, high=vocab_size)


@runtime_checkable
class StopRule(Protocol):
    """A stop that is a pattern rather than one string; ``tinygpt.sequence.TextStream`` asks it
    where it first matches in the text so far, and how much of the text's end might begin a
    match (held back until the next characters decide)."""

    def find(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the first match in ``text``, or None."""
        ...

    def held(self, text: str) -> int:
        """How many characters at the end of ``text`` might be the start of a match."""
        ...


def _stop_strings(stop) -> tuple[str | StopRule, ...]:
    """``stop`` (a string, or strings and ``StopRule``s) as a tuple without repeats; raises
    ``SettingError``."""
    stops = (stop,) if isinstance(stop, (str, StopRule)) else tuple(stop)
    for s in stops:
        if isinstance(s, StopRule) and not isinstance(s, str):
            continue
        if not isinstance(s, str) or not s:
            raise SettingError("stop", "non-empty strings", s, "stop strings")
    return tuple(dict.fromkeys(stops))


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate: how many tokens, how to draw them, where to stop, what to report."""

    max_tokens: int = setting(500, "tokens to generate: characters for a character model",
                              Rule(int, 0), "--num-chars")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = setting(None, "random seed; sample i uses seed + i",
                               Rule(int, INT64_MIN, INT64_MAX, optional=True), "--seed")
    stop: tuple[str | StopRule, ...] = setting(
        (), "end a sample where STR first appears, STR excluded", None, "--stop")
    logprobs: int | None = setting(
        None, "report each token's log-probability and this many most likely alternatives",
        Rule(int, 0, MAX_LOGPROBS, optional=True))

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {self.sampling!r}")
        for f in fields(self):
            if f.metadata.get("rule") is not None:
                f.metadata["rule"].check(f.name, getattr(self, f.name))
        object.__setattr__(self, "stop", _stop_strings(self.stop))

    def seed_of(self, index: int) -> int | None:
        """The seed of sample ``index``: ``seed + index`` (None: a random one)."""
        return None if self.seed is None else self.seed + index


# --- the command line ------------------------------------------------------------------------

CLI_SETTINGS = (  # (owner, field) of the settings ``tinygpt sample`` has a flag for, in order
    (GenerationConfig, "max_tokens"), (SamplingConfig, "temperature"), (SamplingConfig, "top_k"),
    (SamplingConfig, "top_p"), (GenerationConfig, "seed"), (GenerationConfig, "stop"),
)


def _flag_fields():
    for cls, name in CLI_SETTINGS:
        f = next(f for f in fields(cls) if f.name == name)
        flag = f.metadata["flag"]
        yield f, flag, flag.removeprefix("--").replace("-", "_")  # the field, its flag, its dest


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--num-chars --temperature --top-k --top-p --seed --stop`` to ``parser``, with the
    meanings, rules and defaults of the fields above; ``sampling_from_args`` reads them back."""
    for f, flag, dest in _flag_fields():
        help, rule = f.metadata["help"], f.metadata["rule"]
        if rule is None:  # the stop strings
            parser.add_argument(flag, action="append", default=[], metavar="STR", dest=dest,
                                help=f"{help} (repeatable)")
            continue
        default = "random" if f.name == "seed" else "off" if f.default is None else f.default
        words = "" if f.name in ("seed", "max_tokens") else f"; {rule.words()}"
        parser.add_argument(flag, type=rule.kind, default=f.default, dest=dest,
                            help=f"{help}{words} (default: {default})")


def sampling_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The settings of the parsed ``add_sampling_flags`` flags; a bad value raises a
    ``SettingError`` that names its flag (``--top-p must be in (0, 1], got 0``)."""
    flags = {f.name: flag for f, flag, _ in _flag_fields()}
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        return GenerationConfig(args.num_chars, sampling, args.seed, tuple(args.stop))
    except SettingError as e:
        raise e.named(flags[e.name]) from None
