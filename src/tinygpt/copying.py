"""The copying meter: is a sample *written* by the model or *remembered* from its training text?

For every position of a sample we find the longest run of characters starting there that also
occurs somewhere in the train split. Two numbers sum it up:

- the **longest copied run** (in characters, with the run itself), and
- the **copied share**: the fraction of the sample's characters that lie inside a copied run of at
  least ``MIN_RUN`` (20) characters.

A model that writes scores runs of a word or two and a small share (ordinary phrases recur); a
model that remembers reproduces whole lines. The same measure on a piece of the val split (text
the model never saw, written by the same hand) is the reference: ``CopyIndex.reference``.

The lookup is a suffix array of the train split's characters, built with numpy by prefix doubling
(a few seconds for a few MB) and cached beside the corpus's token cache (``copying.npy`` with a
``copying.json`` that says which text it indexes). Each position of a sample costs one binary
search over the sorted suffixes.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygpt.errors import TinyGPTError
from tinygpt.files import atomic_write, write_json

MIN_RUN = 20  # a run this long counts as copied
MAX_CHARS = 50_000_000  # the index of a larger train split would take minutes and gigabytes
AUTO_MAX_CHARS = 10_000_000  # the end of training measures a sample only up to this (seconds)
INDEX_FORMAT = 1


@dataclass(frozen=True)
class CopyReport:
    """How much of ``chars`` characters of a sample also occur in the training text."""

    chars: int
    longest: int  # the longest run of the sample found in the train split, in characters
    longest_text: str
    copied_share: float  # fraction of the sample inside found runs of >= min_run characters
    min_run: int = MIN_RUN

    def describe(self, reference: CopyReport | None = None) -> str:
        """One line for a learner: the longest copied run and the copied share."""
        shown = self.longest_text if len(self.longest_text) <= 60 else self.longest_text[:57] + "..."
        line = (f"copying: the longest run also in the training text is {self.longest} "
                f"characters ({shown!r}); {self.copied_share:.0%} of the sample lies in runs of "
                f"{self.min_run}+ characters copied from it")
        if reference is not None:
            line += (f" (unseen val text of the same length: longest {reference.longest}, "
                     f"{reference.copied_share:.0%})")
        return line

    def to_dict(self) -> dict:
        return {"chars": self.chars, "longest": self.longest, "longest_text": self.longest_text,
                "copied_share": self.copied_share, "min_run": self.min_run}


def suffix_array(codes: np.ndarray) -> np.ndarray:
    """The start positions of all suffixes of ``codes`` in sorted order (a shorter suffix sorts
    before a longer one it begins), by prefix doubling: sort by the first 2^k symbols."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(codes, return_inverse=True)[1].astype(np.int64).reshape(-1)
    k = 1
    while True:
        # A suffix's key: its rank by the first k symbols, then that of the suffix k further on
        # (0 past the end: shorter first).
        second = np.zeros(n, dtype=np.int64)
        if k < n:
            second[: n - k] = rank[k:] + 1
        order = np.lexsort((second, rank))
        r, s = rank[order], second[order]
        new = np.empty(n, dtype=np.int64)
        new[order] = np.concatenate(([0], np.cumsum((r[1:] != r[:-1]) | (s[1:] != s[:-1]))))
        rank = new
        if rank[order[-1]] == n - 1 or k >= n:
            return order
        k *= 2


class CopyIndex:
    """The train split's text and its suffix array: finds the longest copied run at each place."""

    def __init__(self, text: str, suffixes: np.ndarray | None = None) -> None:
        self.text = text
        if suffixes is None:
            suffixes = suffix_array(_codes(text))
        if len(suffixes) != len(text):
            raise ValueError(f"{len(suffixes)} suffixes for {len(text)} characters")
        self.suffixes = suffixes

    def match_lengths(self, sample: str) -> list[int]:
        """For each position of ``sample``: how many characters from there occur in the text."""
        text, sa, out = self.text, self.suffixes, []
        for i in range(len(sample)):
            rest = sample[i:]
            r = len(rest)
            at = bisect.bisect_left(sa, rest, key=lambda j: text[j:j + r])
            # The longest common prefix with any suffix is that with a sorted neighbour.
            best = 0
            for j in (at - 1, at):
                if 0 <= j < len(sa):
                    best = max(best, _common_prefix(text, int(sa[j]), rest))
            out.append(best)
        return out

    def report(self, sample: str, min_run: int = MIN_RUN) -> CopyReport:
        """The longest copied run of ``sample`` and the share of it in runs of ``min_run``+."""
        lengths = self.match_lengths(sample)
        covered = np.zeros(len(sample), dtype=bool)
        for i, n in enumerate(lengths):
            if n >= min_run:
                covered[i:i + n] = True
        longest = max(lengths, default=0)
        start = lengths.index(longest) if longest else 0
        share = float(covered.mean()) if len(sample) else 0.0
        return CopyReport(len(sample), longest, sample[start:start + longest], share, min_run)


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _common_prefix(text: str, start: int, s: str) -> int:
    """Characters ``text[start:]`` and ``s`` have in common at their beginning."""
    lo, hi = 0, min(len(s), len(text) - start)
    while lo < hi:  # binary search on the length: slices compare in C
        mid = (lo + hi + 1) // 2
        if text[start:start + mid] == s[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------ an index for a run's corpus


def split_text(corpus, split: str = "train") -> str:
    """The characters of a corpus split (``tinygpt.data.Corpus``), decoded from its tokens."""
    from tinygpt.tokenizer import CharTokenizer

    ids = np.asarray(corpus.split(split))
    tok = corpus.tokenizer
    if isinstance(tok, CharTokenizer):  # one character per token: decoded without a loop
        return _codes_text(np.asarray(tok._codepoints)[ids.astype(np.int64)])
    return tok.decode(ids.tolist())


def _codes_text(codes: np.ndarray) -> str:
    return codes.astype("<u4").tobytes().decode("utf-32-le")


def corpus_index(corpus, max_chars: int = MAX_CHARS) -> CopyIndex:
    """The copy index of a corpus's train split, built once and cached with its tokens; a
    ``TinyGPTError`` when the split has more than ``max_chars`` characters."""
    chars = corpus.num_chars("train")
    if chars > max_chars:
        raise TinyGPTError(f"the train split has {chars:,} characters; the copying meter "
                           f"indexes at most {max_chars:,}")
    text = split_text(corpus, "train")
    folder = Path(corpus.tokens.filename).parent if hasattr(corpus.tokens, "filename") else None
    key = {"format": INDEX_FORMAT, "fingerprint": corpus.manifest.get("fingerprint"),
           "chars": len(text)}
    if folder is not None:
        cached = _read_cached(folder, key)
        if cached is not None:
            return CopyIndex(text, cached)
    index = CopyIndex(text)
    if folder is not None:
        try:
            dtype = np.uint32 if len(text) < 2**32 else np.int64
            atomic_write(folder / "copying.npy",
                         lambda tmp: _save_npy(tmp, index.suffixes.astype(dtype)))
            write_json(folder / "copying.json", key)
        except OSError:
            pass  # an unwritable cache only means building the index again next time
    return index


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, array)


def _read_cached(folder: Path, key: dict) -> np.ndarray | None:
    try:
        if json.loads((folder / "copying.json").read_text(encoding="utf-8")) != key:
            return None
        suffixes = np.load(folder / "copying.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    return suffixes if len(suffixes) == key["chars"] else None


def reference_report(corpus, index: CopyIndex, chars: int, min_run: int = MIN_RUN) -> CopyReport | None:
    """The meter on the first ``chars`` characters of the val split: what unseen text of the
    same kind scores (None when the val split is empty)."""
    val = split_text(corpus, "val")[:chars]
    return index.report(val, min_run) if val else None
