"""Tokenizers: text to token ids and back, behind one interface.

``CharTokenizer`` is the lecture's: every distinct character of the corpus is one token, and the
vocabulary is the sorted set of characters, so token ids follow code-point order.

``BPETokenizer`` is byte-level byte-pair encoding, trained with Hugging Face ``tokenizers`` (as in
GPT-2): text is UTF-8 bytes, the 256 byte values are the first tokens and frequent neighbours
are merged into longer ones. Every string encodes (there are no unknown characters), but a token
may end in the middle of a multi-byte character; ``TextDecoder`` turns a stream of tokens into
whole characters.

Both have the same methods: ``encode``, ``encode_array``, ``decode``, ``vocab_size``,
``unknown_chars``, ``token_bytes``, ``text_decoder``, ``to_dict`` and ``tokenizer_from_dict``. A
tokenizer is stored inside every checkpoint, so a run directory is all one needs to sample from a
model.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tinygpt.errors import TinyGPTError

if TYPE_CHECKING:
    import tokenizers

TOKENIZER_KINDS = ("char", "bpe")


class Tokenizer(Protocol):
    """What the rest of tinygpt needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def unknown_chars(self, text: str) -> list[str]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def token_text(self, token: int) -> str: ...

    def text_decoder(self) -> TextDecoder: ...

    @property
    def fingerprint(self) -> str: ...

    def to_dict(self) -> dict: ...


class TextDecoder:
    """Turns token ids, one at a time, into whole characters.

    A byte-level token can end inside a multi-byte UTF-8 character (an emoji is 4 bytes, often
    split over two tokens); its bytes wait here until the character is complete. Bytes that can
    never form a character come out as U+FFFD, as ``decode`` does.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The characters completed by ``token`` (maybe none)."""
        return self._utf8.decode(self._bytes(int(token)))

    def push_many(self, tokens: Iterable[int]) -> str:
        """The characters completed by several tokens at once."""
        return self._utf8.decode(b"".join(self._bytes(int(t)) for t in tokens))

    def flush(self) -> str:
        """What is left at the end of the stream: an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """Whether bytes of an incomplete character are waiting."""
        return bool(self._utf8.getstate()[0])


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

    def token_bytes(self, token: int) -> bytes:
        return self.chars[token].encode("utf-8")

    def token_text(self, token: int) -> str:
        return self.chars[token]

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def text_decoder(self) -> TextDecoder:
        return TextDecoder(self)

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


# ------------------------------------------------------------------------------ byte-level BPE


def _byte_symbols() -> dict[str, int]:
    """The printable character that stands for each byte in a byte-level vocabulary -> the byte.

    Byte-level BPE (GPT-2's convention, followed by ``tokenizers``) writes tokens as strings in
    which every byte is one visible character: bytes that already are printable Latin-1
    characters stand for themselves, the 68 others (controls, space, soft hyphen) take the code
    points 256, 257, ... in byte order. A space is thus written 'Ġ' and a newline 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


def _load_tokenizers():
    try:
        import tokenizers
    except ModuleNotFoundError:
        raise TinyGPTError(
            "BPE tokenizers need the 'tokenizers' package: pip install tokenizers"
        ) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE held by a Hugging Face ``tokenizers.Tokenizer``.

    Ids are those of the ``tokenizers`` vocabulary (including added tokens such as GPT-2's
    ``<|endoftext|>``); encoding adds no special tokens. The whole ``tokenizer.json`` is the
    stored form, so a tokenizer trained here loads unchanged in ``tokenizers`` and
    ``transformers``.
    """

    kind = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        spec = json.loads(tokenizer.to_str())
        model = (spec.get("model") or {}).get("type")
        decoder = (spec.get("decoder") or {}).get("type")
        if model != "BPE" or decoder != "ByteLevel":
            raise TinyGPTError(
                f"not a byte-level BPE tokenizer (model {model!r}, decoder {decoder!r}); tinygpt "
                f"reads byte-level BPE (as GPT-2's) and its own character tokenizers"
            )
        if spec.get("normalizer") is not None:
            raise TinyGPTError(
                f"the tokenizer normalizes text ({spec['normalizer'].get('type')!r}), so decoding "
                f"would not give back the text; tinygpt needs a tokenizer without a normalizer"
            )
        self.tokenizer = tokenizer
        self._json = tokenizer.to_str()

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, length: int | None = None,
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges from ``texts`` (an iterable of strings, streamed:
        pass chunks of a large corpus, not one huge string); ``length`` is their number, for
        the progress bar."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise TinyGPTError(
                f"a byte-level BPE vocabulary needs at least 257 tokens (256 bytes + merges), "
                f"got {vocab_size!r}"
            )
        tk = _load_tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress, special_tokens=[],
        )
        tokenizer.train_from_iterator(texts, trainer, length=length)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, s: str) -> BPETokenizer:
        """From the text of a ``tokenizer.json``."""
        tk = _load_tokenizers()
        try:
            tokenizer = tk.Tokenizer.from_str(s)
        except Exception as e:  # tokenizers raises plain Exceptions on bad JSON
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TinyGPTError(f"cannot read the tokenizer: {first}") from None
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def unknown_chars(self, text: str) -> list[str]:
        return []  # every string is a sequence of bytes, and every byte is a token

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts at once (``tokenizers`` spreads them over threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        symbols = _byte_symbols()
        added = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        table = []
        for i in range(self.vocab_size):
            if i in added:  # special tokens are plain text
                table.append(added[i].encode("utf-8"))
                continue
            piece = self.tokenizer.id_to_token(i)
            if piece is None:  # a hole in the id range
                table.append(b"")
            elif all(c in symbols for c in piece):
                table.append(bytes(symbols[c] for c in piece))
            else:
                table.append(piece.encode("utf-8"))
        return table

    def token_bytes(self, token: int) -> bytes:
        """The bytes token ``token`` stands for (maybe part of a character)."""
        table = self._token_bytes
        return table[token] if 0 <= token < len(table) else b""

    def token_text(self, token: int) -> str:
        """The token as text for display (logprobs): bytes that are only part of a character
        are written as ``\\xNN``, as OpenAI's API shows them."""
        return self.token_bytes(token).decode("utf-8", errors="backslashreplace")

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def text_decoder(self) -> TextDecoder:
        return TextDecoder(self)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text."""
        return self._json

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self._json}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        if not isinstance(d, dict) or d.get("kind") != cls.kind or not isinstance(
                d.get("tokenizer_json"), str):
            raise TinyGPTError("unrecognised tokenizer description (expected a 'bpe' tokenizer)")
        return cls.from_json(d["tokenizer_json"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self._json == other._json

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _fingerprint(description: dict) -> str:
    """A short hash that identifies a tokenizer (token caches are keyed by it)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_from_dict(d: dict) -> CharTokenizer | BPETokenizer:
    """The tokenizer a checkpoint or token cache describes (``to_dict`` of either kind)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == BPETokenizer.kind:
        return BPETokenizer.from_dict(d)
    if kind == CharTokenizer.kind:
        return CharTokenizer.from_dict(d)
    raise TinyGPTError(
        f"unrecognised tokenizer kind {kind!r} (expected one of: {', '.join(TOKENIZER_KINDS)}); "
        f"the checkpoint may come from a newer tinygpt"
    )


def _safe_cut(text: str, start: int, end: int) -> int:
    """The last index ``i`` in ``(start, end)`` just after a newline with a non-space character on
    both sides (``x\ny`` cut as ``x\n`` + ``y``), or -1. GPT-2's byte-level pre-tokenizer splits
    text into words before merging, and it always splits there in the same way, whatever comes
    before or after: encoding the two sides separately gives the same tokens as encoding the
    whole."""
    cut = text.rfind("\n", start + 1, end - 1)
    while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
        cut = text.rfind("\n", start + 1, cut)
    return cut + 1 if cut > start else -1


def iter_chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut where ``_safe_cut`` finds a place
    (else at ``size``): byte-level BPE encodes the pieces one by one into the same tokens as the
    whole."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = _safe_cut(text, start, end)
            end = cut if cut > 0 else end
        yield text[start:end]
        start = end


def rechunk(pieces: Iterable[str], size: int = 1 << 20) -> Iterator[str]:
    """Pieces of a text stream (of any sizes) re-cut into chunks of about ``size`` characters at
    the places ``iter_chunks`` uses, so that encoding them one by one gives the tokens of the
    whole stream. A stretch with no such place grows up to 16 x ``size`` and is then cut anyway
    (where a word may be split)."""
    buffer = ""
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            cut = _safe_cut(buffer, 0, len(buffer))
            if cut <= 0:
                if len(buffer) < 16 * size:
                    break
                cut = len(buffer)
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer
