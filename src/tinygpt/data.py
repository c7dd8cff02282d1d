"""Text corpora: reading, tokenising once into a cached binary file, and drawing batches.

A corpus is one UTF-8 file, a directory of ``.txt`` files, or the built-in ``shakespeare``.
Reading streams the bytes in chunks, so memory does not grow with the size of the text; the token
ids are written to ``tokens.bin`` (uint16 when the vocabulary fits, else uint32) next to a JSON
manifest that says what they were made from. Batches are read from that file through
``numpy.memmap``, so a corpus larger than RAM works.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygpt.errors import TinyGPTError
from tinygpt.files import atomic_write, sha256_file, write_json
from tinygpt.tokenizer import CharTokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CHARS = 1_115_394
BUILTIN_DATASETS = ("shakespeare",)

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time
CACHE_FORMAT = 1
TRAIN_FRACTION = 0.9  # the lecture's contiguous 90/10 split


def tinygpt_home() -> Path:
    """Where datasets and token caches live: ``$TINYGPT_HOME`` or ``~/.cache/tinygpt``."""
    env = os.environ.get("TINYGPT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinygpt"


def shakespeare_path() -> Path:
    return tinygpt_home() / "datasets" / "tinyshakespeare.txt"


def ensure_shakespeare(url: str | None = None) -> Path:
    """Return the path of Tiny Shakespeare, downloading and verifying it if it is not cached."""
    url = url or SHAKESPEARE_URL
    path = shakespeare_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise TinyGPTError(
            f"Tiny Shakespeare is not at {path} and could not be downloaded ({reason}); "
            f"put the char-rnn input.txt there, or train on your own text with --data FILE"
        ) from None
    digest = sha256_file(tmp)
    if digest != SHAKESPEARE_SHA256:
        tmp.unlink(missing_ok=True)
        raise TinyGPTError(
            f"downloaded Tiny Shakespeare has sha256 {digest[:12]}..., expected "
            f"{SHAKESPEARE_SHA256[:12]}...; put the char-rnn input.txt at {path} by hand"
        )
    os.replace(tmp, path)
    return path


def resolve_sources(spec: str | os.PathLike) -> list[Path]:
    """Turn ``--data`` into a list of files: a built-in name, a file, or a directory of .txt."""
    if str(spec) in BUILTIN_DATASETS and not Path(spec).exists():
        return [ensure_shakespeare()]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise TinyGPTError(f"directory {path} contains no .txt files")
        return files
    if path.is_file():
        return [path]
    if not path.exists() and os.sep not in str(spec) and "." not in str(spec):
        raise TinyGPTError(
            f"no such file or built-in dataset: {spec!r} (built-in: {', '.join(BUILTIN_DATASETS)})"
        )
    raise TinyGPTError(f"no such file or directory: {path}")


def iter_text(path: Path, encoding_errors: str = "strict") -> Iterator[str]:
    """Yield the text of one UTF-8 file in chunks, without a leading BOM.

    With ``encoding_errors="strict"`` invalid UTF-8 raises a ``TinyGPTError`` that names the file
    and the byte offset; ``"replace"`` substitutes U+FFFD instead.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    consumed = 0  # bytes handed to the decoder before the current chunk
    first = True
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            final = not block
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                offset = consumed - pending + e.start
                raise TinyGPTError(
                    f"{path}: invalid UTF-8 at byte offset {offset}; fix the file or pass "
                    f"--encoding-errors replace"
                ) from None
            consumed += len(block)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            if text:
                yield text
            if final:
                return


def iter_corpus(files: list[Path], encoding_errors: str = "strict") -> Iterator[str]:
    """The text of several files in order; a newline separates files that lack a final one."""
    last = "\n"
    for i, path in enumerate(files):
        if i and last != "\n":
            yield "\n"
        for text in iter_text(path, encoding_errors):
            last = text[-1]
            yield text


def _fingerprint(files: list[Path], quick: bool) -> list[dict]:
    out = []
    for p in files:
        st = p.stat()
        entry = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if not quick:
            entry["sha256"] = sha256_file(p)
        out.append(entry)
    return out


@dataclass
class Corpus:
    """Token ids of a whole text, memory-mapped, with the lecture's 90/10 split."""

    tokens: np.ndarray  # read-only memmap, uint16 or uint32
    tokenizer: CharTokenizer
    manifest: dict

    @property
    def n_train(self) -> int:
        return int(len(self.tokens) * TRAIN_FRACTION)

    @property
    def fingerprint(self) -> str:
        """Identifies the source text (sha256 over the files' hashes)."""
        return self.manifest["fingerprint"]

    def split(self, name: str) -> np.ndarray:
        if name == "train":
            return self.tokens[: self.n_train]
        if name == "val":
            return self.tokens[self.n_train :]
        raise ValueError(f"unknown split {name!r} (expected 'train' or 'val')")

    def check_block_size(self, block_size: int) -> None:
        for name in ("train", "val"):
            n = len(self.split(name))
            if n < block_size + 1:
                raise TinyGPTError(
                    f"the {name} split has {n} tokens but block_size {block_size} needs at least "
                    f"{block_size + 1}; use a smaller --block-size or a longer text"
                )

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs ``x`` (B, T) and targets ``y`` (B, T), y shifted by one."""
        data = self.split(split)
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        idx = ix[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
        chunk = torch.from_numpy(data[idx].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def load_corpus(
    spec: str | os.PathLike,
    encoding_errors: str = "strict",
    tokenizer: CharTokenizer | None = None,
) -> Corpus:
    """Tokenise ``spec`` (or reuse the cached tokens while its files are unchanged).

    ``tokenizer`` fixes the vocabulary (e.g. a trained model's); by default it is built from the
    corpus itself.
    """
    if encoding_errors not in ("strict", "replace"):
        raise TinyGPTError(
            f"--encoding-errors must be 'strict' or 'replace', not {encoding_errors!r}"
        )
    files = resolve_sources(spec)
    key_src = json.dumps(
        {
            "files": [str(p.resolve()) for p in files],
            "errors": encoding_errors,
            "vocab": tokenizer.to_dict() if tokenizer else None,
        },
        sort_keys=True,
    )
    cache_dir = tinygpt_home() / "tokens" / hashlib.sha256(key_src.encode()).hexdigest()[:20]
    manifest_path = cache_dir / "manifest.json"
    bin_path = cache_dir / "tokens.bin"

    quick = _fingerprint(files, quick=True)
    manifest = _read_manifest(manifest_path)
    if manifest is not None and bin_path.is_file():
        cached = manifest["sources"]
        same_stat = [
            {k: s[k] for k in ("path", "size", "mtime_ns")} for s in cached
        ] == quick
        if same_stat or [s["sha256"] for s in cached] == [
            e["sha256"] for e in _fingerprint(files, quick=False)
        ]:
            if not same_stat:  # content unchanged, only touched: refresh the stat record
                manifest["sources"] = [
                    dict(q, sha256=s["sha256"]) for q, s in zip(quick, cached, strict=True)
                ]
                write_json(manifest_path, manifest)
            return _open_corpus(bin_path, manifest)

    manifest = _build_cache(files, encoding_errors, tokenizer, cache_dir)
    return _open_corpus(bin_path, manifest)


def _read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT:
        return None
    return m


def _build_cache(
    files: list[Path], encoding_errors: str, tokenizer: CharTokenizer | None, cache_dir: Path
) -> dict:
    # Pass 1: validate the text, count characters, collect the vocabulary.
    chars: set[str] = set()
    n_chars = 0
    for text in iter_corpus(files, encoding_errors):
        chars.update(text)
        n_chars += len(text)
    if n_chars == 0:
        what = str(files[0]) if len(files) == 1 else f"the {len(files)} files given"
        raise TinyGPTError(f"{what} contains no text")
    if tokenizer is None:
        tokenizer = CharTokenizer(chars)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    # Pass 2: encode chunk by chunk straight into the binary file.
    def write_tokens(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for text in iter_corpus(files, encoding_errors):
                tokenizer.encode_array(text).astype(dtype).tofile(f)

    atomic_write(cache_dir / "tokens.bin", write_tokens)

    sources = _fingerprint(files, quick=False)
    fingerprint = hashlib.sha256(
        json.dumps([s["sha256"] for s in sources]).encode()
    ).hexdigest()
    manifest = {
        "format": CACHE_FORMAT,
        "sources": sources,
        "encoding_errors": encoding_errors,
        "fingerprint": fingerprint,
        "tokenizer": tokenizer.to_dict(),
        "dtype": np.dtype(dtype).name,
        "num_tokens": n_chars,
    }
    write_json(cache_dir / "manifest.json", manifest)
    return manifest


def _open_corpus(bin_path: Path, manifest: dict) -> Corpus:
    tokens = np.memmap(bin_path, dtype=np.dtype(manifest["dtype"]), mode="r")
    if len(tokens) != manifest["num_tokens"]:
        raise TinyGPTError(f"token cache {bin_path} is damaged; delete its folder and retry")
    return Corpus(tokens, CharTokenizer.from_dict(manifest["tokenizer"]), manifest)
