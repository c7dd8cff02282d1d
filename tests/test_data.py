import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinygpt import data
from tinygpt.data import epoch_starts, load_corpus, resolve_sources
from tinygpt.errors import TinyGPTError


def test_corpus_tokens_match_text_and_split_is_contiguous_90_10(small_text):
    corpus = load_corpus(small_text)
    text = small_text.read_text(encoding="utf-8")
    assert corpus.tokenizer.decode(corpus.tokens.tolist()) == text
    n = len(text)
    assert len(corpus.split("train")) == int(0.9 * n)
    assert np.array_equal(
        np.concatenate([corpus.split("train"), corpus.split("val")]), np.asarray(corpus.tokens)
    )
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16


def test_cache_is_reused_while_source_unchanged_and_rebuilt_when_changed(small_text, tinygpt_home):
    c1 = load_corpus(small_text)
    manifests = list((tinygpt_home / "tokens").glob("*/manifest.json"))
    assert len(manifests) == 1
    m = json.loads(manifests[0].read_text())
    assert m["sources"][0]["sha256"] and m["tokenizer"]["kind"] == "char" and m["dtype"] == "uint16"
    bin_path = manifests[0].parent / "tokens.bin"
    mtime = bin_path.stat().st_mtime_ns
    c2 = load_corpus(small_text)
    assert bin_path.stat().st_mtime_ns == mtime  # not rewritten
    assert c2.fingerprint == c1.fingerprint
    small_text.write_text("entirely new text, with new letters: QXZ\n" * 20, encoding="utf-8")
    c3 = load_corpus(small_text)
    assert c3.fingerprint != c1.fingerprint
    assert "Q" in c3.tokenizer.chars


def test_large_vocabulary_uses_uint32(tmp_path):
    # 70,000 distinct code points do not fit in uint16.
    chars = "".join(chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000)
    p = tmp_path / "wide.txt"
    p.write_text(chars * 2, encoding="utf-8")
    corpus = load_corpus(p)
    assert corpus.tokens.dtype == np.uint32
    assert corpus.tokenizer.vocab_size > 65536


def test_bom_is_stripped(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffhello bom".encode())
    corpus = load_corpus(p)
    assert corpus.tokenizer.decode(corpus.tokens.tolist()) == "hello bom"


def test_invalid_utf8_names_file_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 7)  # the bad byte falls in a later chunk
    p = tmp_path / "bad.txt"
    p.write_bytes("héllo wörld ".encode() + b"\xff" + b" more")
    offset = len("héllo wörld ".encode())
    with pytest.raises(TinyGPTError, match=rf"bad.txt: invalid UTF-8 at byte offset {offset}"):
        load_corpus(p)
    corpus = load_corpus(p, encoding_errors="replace")
    assert "\ufffd" in corpus.tokenizer.chars


def test_a_folder_of_any_text_is_read_in_sorted_order_and_binary_files_are_skipped(tmp_path):
    """Lyrics as .md, a file with no extension, a nested .txt: all text, read in sorted order.
    A binary file (NUL bytes) and one of invalid UTF-8 are skipped and counted; hidden files are
    not part of the corpus."""
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "b.md").write_text("second", encoding="utf-8")
    (d / "a").write_text("first\n", encoding="utf-8")
    (d / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / ".hidden").write_text("secret", encoding="utf-8")
    corpus = load_corpus(d)
    assert corpus.tokenizer.decode(corpus.tokens.tolist()) == "first\nsecond\nthird"
    assert sorted(Path(p).name for p in corpus.skipped) == ["image.png", "latin1.txt"]
    assert "2 binary file(s) skipped" in corpus.describe_sources()
    assert corpus.describe_sources().startswith("3 files")


def test_glob_picks_files_and_an_undecodable_match_is_an_error(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "one.md").write_text("alpha ", encoding="utf-8")
    (d / "two.log").write_text("beta", encoding="utf-8")
    (d / "bad.md").write_bytes(b"ok \xff")
    with pytest.raises(TinyGPTError, match=r"bad.md: invalid UTF-8 at byte offset 3"):
        load_corpus(d, glob="*.md")
    corpus = load_corpus(d, glob="*.log")
    assert corpus.tokenizer.decode(corpus.tokens.tolist()) == "beta"
    with pytest.raises(TinyGPTError, match="no file in .* matches --glob"):
        resolve_sources(d, glob="*.csv")
    with pytest.raises(TinyGPTError, match="--glob picks files in a directory"):
        resolve_sources(d / "one.md", glob="*.md")


def test_the_fingerprint_covers_the_file_names_of_a_folder(tmp_path):
    """Two folders with the same texts under other names are different corpora; one file moved
    to a new place is the same text."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, names in ((a, ("x", "y")), (b, ("y", "z"))):
        d.mkdir()
        (d / names[0]).write_text("same ", encoding="utf-8")
        (d / names[1]).write_text("text", encoding="utf-8")
    assert load_corpus(a).fingerprint != load_corpus(b).fingerprint
    (tmp_path / "moved.txt").write_text("same text", encoding="utf-8")
    (tmp_path / "other.txt").write_text("same text", encoding="utf-8")
    assert load_corpus(tmp_path / "moved.txt").fingerprint == load_corpus(
        tmp_path / "other.txt").fingerprint


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(TinyGPTError, match="no such file or directory"):
        resolve_sources(tmp_path / "missing.txt")
    with pytest.raises(TinyGPTError, match="built-in dataset"):
        resolve_sources("shakespear")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyGPTError, match="contains no UTF-8 text files"):
        resolve_sources(tmp_path / "empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TinyGPTError, match="contains no text"):
        load_corpus(empty)


def test_block_size_longer_than_a_split_is_refused(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("abcdefghij" * 10)  # 100 tokens: val split has 10
    corpus = load_corpus(p)
    corpus.check_block_size(9)
    with pytest.raises(TinyGPTError, match="val split has 10 tokens"):
        corpus.check_block_size(10)


def test_batches_are_shifted_windows_and_reproducible(small_text):
    corpus = load_corpus(small_text)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x, y = corpus.get_batch("train", 4, 16, g1)
    x2, y2 = corpus.get_batch("train", 4, 16, g2)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = np.asarray(corpus.split("train"))
    row = x[0].numpy()
    starts = [i for i in range(len(train) - 16) if np.array_equal(train[i : i + 16], row)]
    assert starts, "each row must be a window of the train split"


def test_epoch_windows_read_every_token_once_per_epoch():
    """--sampling epoch: an epoch is N = (n - T) // T windows side by side at one offset below T,
    in a random order; the next epoch has another order (and offset)."""
    n, T = 1000, 16
    N = (n - T) // T
    first = epoch_starts(n, T, seed=3, first=0, count=N)
    second = epoch_starts(n, T, seed=3, first=N, count=N)
    for epoch in (first, second):
        s = np.sort(epoch)
        assert 0 <= s[0] < T and s[-1] + T + 1 <= n  # every window and its next token fit
        assert (np.diff(s) == T).all()  # side by side: each token once
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.sort(first))  # shuffled
    # a batch across the end of an epoch continues into the next one's order
    assert np.array_equal(epoch_starts(n, T, 3, N - 5, 10), np.concatenate([first[-5:], second[:5]]))
    # a function of (seed, position) only
    assert np.array_equal(epoch_starts(n, T, 3, 7, 4), first[7:11])
    assert not np.array_equal(epoch_starts(n, T, 4, 0, N), first)


def test_epoch_windows_need_a_window_and_its_next_token():
    with pytest.raises(TinyGPTError, match="holds no window of 16 tokens"):
        epoch_starts(31, 16, 0, 0, 1)
    assert len(epoch_starts(32, 16, 0, 0, 3)) == 3  # one window, read again every epoch


def test_given_starts_are_the_batch(small_text):
    corpus = load_corpus(small_text)
    starts = np.array([0, 5, 9])
    x, y = corpus.get_batch("train", 3, 8, torch.Generator(), starts=starts)
    train = np.asarray(corpus.split("train"))
    assert all(np.array_equal(x[i].numpy(), train[s : s + 8]) for i, s in enumerate(starts))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_shakespeare_is_found_in_cache(shakespeare):
    corpus = load_corpus("shakespeare")
    assert len(corpus.tokens) == data.SHAKESPEARE_CHARS
    assert corpus.tokenizer.vocab_size == 65


def test_shakespeare_download_is_verified(tmp_path, shakespeare, monkeypatch):
    """The download path, exercised with a file:// URL (no network)."""
    src = tmp_path / "input.txt"
    src.write_bytes(shakespeare.read_bytes())
    shakespeare.unlink()
    path = data.ensure_shakespeare(url=src.as_uri())
    assert path.read_bytes() == src.read_bytes()
    path.unlink()
    src.write_bytes(b"not shakespeare")
    with pytest.raises(TinyGPTError, match="sha256"):
        data.ensure_shakespeare(url=src.as_uri())
    assert not path.exists()


def test_shakespeare_offline_message(monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(TinyGPTError) as e:
        load_corpus("shakespeare")
    msg = str(e.value)
    assert "could not be downloaded" in msg and "--data FILE" in msg
    assert str(data.shakespeare_path()) in msg
