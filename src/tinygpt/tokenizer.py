"""Character-level tokenizer: every distinct character of the corpus is one token.

As in the lecture, the vocabulary is the sorted set of characters, so token ids follow code-point
order. The tokenizer is stored as JSON inside every checkpoint, so a run directory is all one
needs to sample from a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

from tinygpt.errors import TinyGPTError


class CharTokenizer:
    """Maps characters to ids ``0..V-1`` and back."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars))
        if not chars:
            raise TinyGPTError("cannot build a tokenizer from an empty text")
        if any(len(c) != 1 for c in chars):
            raise TinyGPTError("a character tokenizer needs single characters")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}
        # Sorted code points let numpy encode long texts without a Python loop.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of ``text`` that are not in the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to an int64 array; fast for long texts (no per-character Python work)."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self._codepoints) - 1)
        bad = self._codepoints[ids] != cps
        if bad.any():
            missing = sorted({chr(c) for c in cps[bad].tolist()})
            shown = ", ".join(repr(c) for c in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise TinyGPTError(
                f"{len(missing)} character(s) not in the model's vocabulary: {shown}{more}"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": "".join(self.chars)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        chars = d.get("chars") if isinstance(d, dict) else None
        if not isinstance(d, dict) or d.get("kind") != cls.kind or not isinstance(chars, str):
            raise TinyGPTError("unrecognised tokenizer description (expected a 'char' tokenizer)")
        return cls(d["chars"])

    @classmethod
    def from_json(cls, s: str) -> CharTokenizer:
        return cls.from_dict(json.loads(s))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
