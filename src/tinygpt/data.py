"""Text corpora: reading, tokenising once into a cached binary file, and drawing batches.

A corpus is one UTF-8 file, a directory of text files (every file in it that is UTF-8 text, or
those a glob picks), or the built-in ``shakespeare``.
Reading streams the bytes in chunks, so memory does not grow with the size of the text; the token
ids are written to ``tokens.bin`` (uint16 when the vocabulary fits, else uint32) next to a JSON
manifest that says what they were made from. Batches are read from that file through
``numpy.memmap``, so a corpus larger than RAM works.

The split is the lecture's: the first 90% of the text trains, the rest validates. It is cut in
characters, so every tokenizer sees the same validation text. A BPE tokenizer (``--tokenizer
bpe``) is trained on the train part only, and each part is encoded on its own, streamed in chunks
cut where the encoding cannot change (see ``tinygpt.tokenizer.rechunk``). The cache is keyed by
the tokenizer: character and BPE tokens of one text never mix.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygpt.errors import TinyGPTError
from tinygpt.files import atomic_write, sha256_file, write_json
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, rechunk, tokenizer_from_dict

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CHARS = 1_115_394
BUILTIN_DATASETS = ("shakespeare",)

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time
CACHE_FORMAT = 2  # 2: the fingerprint of a directory covers its file names
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


@dataclass(frozen=True)
class Sources:
    """The files a ``--data`` spec names, in reading order, and those skipped as not text."""

    files: list[Path]
    skipped: list[Path]
    root: Path | None = None  # the directory, when the spec named one

    def names(self) -> list[str]:
        """The file list as the fingerprint sees it: paths relative to the directory."""
        if self.root is None:
            return []
        return [p.relative_to(self.root).as_posix() for p in self.files]


def is_text_file(path: Path) -> bool:
    """Whether ``path`` decodes as UTF-8 text without NUL bytes (binary files have them)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                if b"\0" in block:
                    return False
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError):
        return False
    return True


def _visible(path: Path, root: Path) -> bool:
    """Hidden files and folders (``.git``, ``.DS_Store``) are not part of a corpus."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_sources(spec: str | os.PathLike, glob: str | None = None) -> Sources:
    """Turn ``--data`` into files: a built-in name, a file, or a directory.

    A directory contributes every regular, non-hidden file under it that is UTF-8 text, in sorted
    order; binary files (NUL bytes, invalid UTF-8) are skipped and listed in ``skipped``. With
    ``glob`` only the files matching the pattern are read, and one that is not valid UTF-8 is an
    error naming the file and the byte offset.
    """
    if str(spec) in BUILTIN_DATASETS and not Path(spec).exists():
        if glob is not None:
            raise TinyGPTError(f"--glob picks files in a directory; --data {spec} is a built-in")
        return Sources([ensure_shakespeare()], [])
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_sources(path, glob)
    if glob is not None and path.exists():
        raise TinyGPTError(f"--glob picks files in a directory, and {path} is a file")
    if path.is_file():
        return Sources([path], [])
    if not path.exists() and os.sep not in str(spec) and "." not in str(spec):
        raise TinyGPTError(
            f"no such file or built-in dataset: {spec!r} (built-in: {', '.join(BUILTIN_DATASETS)})"
        )
    raise TinyGPTError(f"no such file or directory: {path}")


def _directory_sources(path: Path, glob: str | None) -> Sources:
    try:
        candidates = path.rglob("*") if glob is None else path.glob(glob)
        found = sorted(p for p in candidates if p.is_file() and _visible(p, path))
    except (ValueError, NotImplementedError) as e:
        raise TinyGPTError(f"cannot use --glob {glob!r}: {e}") from None
    if glob is not None:
        if not found:
            raise TinyGPTError(f"no file in {path} matches --glob {glob!r}")
        return Sources(found, [], path)
    files = [p for p in found if is_text_file(p)]
    skipped = [p for p in found if p not in set(files)]
    if not files:
        what = f" ({len(skipped)} binary file(s) skipped)" if skipped else ""
        raise TinyGPTError(f"directory {path} contains no UTF-8 text files{what}")
    return Sources(files, skipped, path)


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
    tokenizer: Tokenizer
    manifest: dict
    skipped: tuple[str, ...] = ()  # files of a directory left out as binary

    def describe_sources(self) -> str:
        """One line about the files read (and skipped), for the training log."""
        n = len(self.manifest["sources"])
        line = f"{n} file{'s' if n != 1 else ''}"
        if self.skipped:
            shown = ", ".join(Path(p).name for p in self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            line += f" ({len(self.skipped)} binary file(s) skipped: {shown}{more})"
        return line

    @property
    def n_train(self) -> int:
        split = self.manifest.get("split")
        if split:  # where the 90% character cut falls in tokens
            return int(split["train_tokens"])
        return int(len(self.tokens) * TRAIN_FRACTION)

    def num_chars(self, split: str) -> int:
        """Characters of the text behind a split (bits per character divide by this)."""
        info = self.manifest.get("split")
        if not info:  # a cache written before BPE: one token per character
            return len(self.split(split))
        if split == "train":
            return int(info["train_chars"])
        if split == "val":
            return int(info["val_chars"])
        raise ValueError(f"unknown split {split!r} (expected 'train' or 'val')")

    @property
    def fingerprint(self) -> str:
        """Identifies the source text: sha256 over the files' hashes (and, for a directory, their
        names relative to it)."""
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
        rows: slice | None = None,
        starts: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs ``x`` (B, T) and targets ``y`` (B, T), y shifted by one.

        ``rows`` keeps only those windows of the batch (a data-parallel rank's share): the same
        ``batch_size`` starts are drawn whatever the share, so the shares make up the batch.
        ``starts`` gives the windows' first positions instead of drawing them (``epoch_starts``).
        """
        data = self.split(split)
        ix = starts if starts is not None else torch.randint(
            len(data) - block_size, (batch_size,), generator=generator).numpy()
        if rows is not None:
            ix = ix[rows]
        idx = ix[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
        chunk = torch.from_numpy(data[idx].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # as the lecture's batches are


def epoch_starts(n_tokens: int, block_size: int, seed: int, first: int, count: int) -> np.ndarray:
    """The first positions of windows ``first, ..., first + count - 1`` when the windows are drawn
    without replacement, epoch by epoch (``--sampling epoch``).

    An epoch cuts the split into N = (n_tokens - T) // T windows of T tokens, all at one random
    offset below T, and visits them in a random order: every token is read once per epoch. The
    order is a function of (seed, epoch) alone, so a resumed run and every rank of a torchrun
    job see the same windows.
    """
    n = (n_tokens - block_size) // block_size
    if n < 1:
        raise TinyGPTError(f"the training split ({n_tokens} tokens) holds no window of "
                           f"{block_size} tokens and the one after; give a smaller --block-size")
    picks = [_epoch_order(n, block_size, seed, i // n)[i % n] for i in range(first, first + count)]
    return np.array(picks, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, block_size: int, seed: int, epoch: int) -> np.ndarray:
    state = np.random.SeedSequence([seed, epoch, 2]).generate_state(2, np.uint64)[0]
    g = torch.Generator().manual_seed(int(state >> 1))
    offset = int(torch.randint(block_size, (1,), generator=g))
    return (offset + block_size * torch.randperm(n, generator=g)).numpy()


def load_corpus(
    spec: str | os.PathLike,
    encoding_errors: str = "strict",
    tokenizer: Tokenizer | None = None,
    glob: str | None = None,
    bpe_vocab_size: int | None = None,
) -> Corpus:
    """Tokenise ``spec`` (or reuse the cached tokens while its files are unchanged).

    ``tokenizer`` fixes the vocabulary (e.g. a trained model's); by default it is built from the
    corpus itself: its characters, or with ``bpe_vocab_size`` a byte-level BPE of that many tokens
    trained on the train split. ``glob`` picks the files of a directory (see
    ``resolve_sources``).
    """
    if encoding_errors not in ("strict", "replace"):
        raise TinyGPTError(
            f"--encoding-errors must be 'strict' or 'replace', not {encoding_errors!r}"
        )
    sources = resolve_sources(spec, glob)
    files = sources.files
    key_src = json.dumps(
        {
            "files": [str(p.resolve()) for p in files],
            "errors": encoding_errors,
            "vocab": _vocab_key(tokenizer, bpe_vocab_size),
        },
        sort_keys=True,
    )
    cache_dir = tinygpt_home() / "tokens" / hashlib.sha256(key_src.encode()).hexdigest()[:20]
    manifest_path = cache_dir / "manifest.json"
    bin_path = cache_dir / "tokens.bin"

    skipped = tuple(str(p) for p in sources.skipped)
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
            return _open_corpus(bin_path, manifest, skipped)

    manifest = _build_cache(sources, encoding_errors, tokenizer, cache_dir, bpe_vocab_size)
    return _open_corpus(bin_path, manifest, skipped)


def _vocab_key(tokenizer: Tokenizer | None, bpe_vocab_size: int | None):
    """What the token cache's name says about the tokenizer."""
    if tokenizer is None:
        return None if bpe_vocab_size is None else {"train_bpe": bpe_vocab_size}
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.to_dict()
    return {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint}


def _read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT:
        return None
    return m


def _build_cache(
    sources: Sources, encoding_errors: str, tokenizer: Tokenizer | None, cache_dir: Path,
    bpe_vocab_size: int | None = None,
) -> dict:
    files = sources.files
    # Pass 1: validate the text, count characters, collect the vocabulary.
    chars: set[str] = set()
    n_chars = 0
    for text in iter_corpus(files, encoding_errors):
        chars.update(text)
        n_chars += len(text)
    if n_chars == 0:
        what = str(files[0]) if len(files) == 1 else f"the {len(files)} files given"
        raise TinyGPTError(f"{what} contains no text")
    n_train_chars = int(n_chars * TRAIN_FRACTION)
    if tokenizer is None and bpe_vocab_size is not None:
        train_text = _text_range(files, encoding_errors, 0, n_train_chars)
        tokenizer = BPETokenizer.train(rechunk(train_text, ENCODE_CHARS), bpe_vocab_size,
                                       show_progress=_interactive())
    if tokenizer is None:
        tokenizer = CharTokenizer(chars)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    # Pass 2: encode chunk by chunk straight into the binary file.
    counts = {"train": n_train_chars, "val": n_chars - n_train_chars}  # tokens of each part

    def write_tokens(tmp: str) -> None:
        with open(tmp, "wb") as f:
            if isinstance(tokenizer, CharTokenizer):  # one token per character
                for text in iter_corpus(files, encoding_errors):
                    tokenizer.encode_array(text).astype(dtype).tofile(f)
                return
            _write_bpe_tokens(f, tokenizer, files, encoding_errors, n_chars, n_train_chars,
                              dtype, counts)

    atomic_write(cache_dir / "tokens.bin", write_tokens)

    records = _fingerprint(files, quick=False)
    manifest = {
        "format": CACHE_FORMAT,
        "sources": records,
        "encoding_errors": encoding_errors,
        "fingerprint": text_fingerprint([r["sha256"] for r in records], sources.names()),
        "tokenizer": tokenizer.to_dict(),
        "dtype": np.dtype(dtype).name,
        "num_tokens": counts["train"] + counts["val"],
        "num_chars": n_chars,
        "split": {"train_tokens": counts["train"], "train_chars": n_train_chars,
                  "val_chars": n_chars - n_train_chars},
    }
    write_json(cache_dir / "manifest.json", manifest)
    return manifest


ENCODE_CHARS = 1 << 16  # characters per chunk handed to the BPE tokenizer
ENCODE_BATCH = 32  # chunks per call (tokenizers encodes a batch on several threads)


def _interactive() -> bool:
    return sys.stderr.isatty()


def _text_range(files: list[Path], encoding_errors: str, start: int, stop: int) -> Iterator[str]:
    """The characters ``start:stop`` of the corpus, streamed in pieces."""
    pos = 0
    for text in iter_corpus(files, encoding_errors):
        end = pos + len(text)
        if end > start and pos < stop:
            yield text[max(start - pos, 0) : min(stop, end) - pos]
        pos = end
        if pos >= stop:
            return


def _write_bpe_tokens(f, tokenizer: BPETokenizer, files: list[Path], encoding_errors: str,
                      n_chars: int, n_train_chars: int, dtype, counts: dict) -> None:
    """Encode the train part, then the val part, in batches of chunks, appending to ``f``; the
    token count of each part goes into ``counts``. A progress bar on a terminal."""
    from tqdm import tqdm

    with tqdm(total=n_chars, unit="char", unit_scale=True, desc="encoding",
              disable=not _interactive(), leave=False) as bar:
        for part, (a, b) in (("train", (0, n_train_chars)), ("val", (n_train_chars, n_chars))):
            counts[part] = 0
            batch: list[str] = []
            chunks = rechunk(_text_range(files, encoding_errors, a, b), ENCODE_CHARS)
            for chunk in itertools.chain(chunks, [None]):  # None: flush the last batch
                if chunk is not None:
                    batch.append(chunk)
                if batch and (chunk is None or len(batch) == ENCODE_BATCH):
                    for ids in tokenizer.encode_batch(batch):
                        np.asarray(ids, dtype=dtype).tofile(f)
                        counts[part] += len(ids)
                    bar.update(sum(len(c) for c in batch))
                    batch = []


def text_fingerprint(hashes: list[str], names: list[str]) -> str:
    """The identity of a text: its files' hashes in order, and a directory's file names (a single
    file may move or be renamed and stay the same text)."""
    payload = hashes if not names else [[n, h] for n, h in zip(names, hashes, strict=True)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _open_corpus(bin_path: Path, manifest: dict, skipped: tuple[str, ...] = ()) -> Corpus:
    tokens = np.memmap(bin_path, dtype=np.dtype(manifest["dtype"]), mode="r")
    if len(tokens) != manifest["num_tokens"]:
        raise TinyGPTError(f"token cache {bin_path} is damaged; delete its folder and retry")
    return Corpus(tokens, tokenizer_from_dict(manifest["tokenizer"]), manifest, skipped)
