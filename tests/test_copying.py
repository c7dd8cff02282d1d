"""The copying meter: exact runs on texts built for the purpose, and its cache beside the tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tinygpt.copying import CopyIndex, _codes, corpus_index, reference_report, suffix_array
from tinygpt.data import load_corpus


def naive_lengths(text: str, sample: str) -> list[int]:
    return [max(n for n in range(len(sample) - i + 1) if sample[i:i + n] in text)
            for i in range(len(sample))]


def test_suffix_array_sorts_every_suffix():
    rng = random.Random(0)
    for _ in range(100):
        s = "".join(rng.choice("abé你") for _ in range(rng.randint(1, 60)))
        assert suffix_array(_codes(s)).tolist() == sorted(range(len(s)), key=lambda i: s[i:])
    assert suffix_array(_codes("aaaa")).tolist() == [3, 2, 1, 0]


def test_match_lengths_agree_with_brute_force():
    rng = random.Random(1)
    for _ in range(100):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 80)))
        sample = "".join(rng.choice("ab cd") for _ in range(rng.randint(1, 30)))
        assert CopyIndex(text).match_lengths(sample) == naive_lengths(text, sample)


def test_a_copied_line_and_new_text():
    line = "To be, or not to be, that is the question"  # 41 characters
    train = "Whether 'tis nobler in the mind to suffer\n" + line + "\nthe slings and arrows"
    new = "zqxjvkwzqxjv"  # 12 characters none of which is in the text
    sample = new + line + new  # 65 characters, 41 of them copied
    r = CopyIndex(train).report(sample)
    assert r.chars == 65
    assert r.longest == 41 and r.longest_text == line
    assert r.copied_share == pytest.approx(41 / 65)


def test_short_common_runs_are_not_counted_as_copied():
    train = "the cat sat on the mat. the dog ran."
    sample = "the dog sat on the cat."  # runs shorter than 20 characters only
    r = CopyIndex(train).report(sample)
    assert r.longest == len(" sat on the ")
    assert r.copied_share == 0.0
    assert CopyIndex(train).report(sample, min_run=len(" sat on the ")).copied_share == (
        pytest.approx(len(" sat on the ") / len(sample)))


def test_overlapping_runs_are_counted_once():
    train = "abcdefghijklmnopqrstuvwxyz0123 " + "klmnopqrstuvwxyz0123456789ABCD"
    sample = "abcdefghijklmnopqrstuvwxyz0123456789ABCD"  # two copied runs that overlap
    r = CopyIndex(train).report(sample)
    assert r.longest == 30 and r.copied_share == 1.0
    assert "30 characters" in r.describe() and "100%" in r.describe()


def test_empty_sample():
    r = CopyIndex("some text").report("")
    assert (r.chars, r.longest, r.copied_share) == (0, 0, 0.0)


def test_the_index_is_cached_beside_the_tokens(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(50))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(path)
    index = corpus_index(corpus)
    folder = Path(corpus.tokens.filename).parent
    assert (folder / "copying.npy").is_file() and (folder / "copying.json").is_file()
    again = corpus_index(corpus)
    assert again.suffixes.tolist() == index.suffixes.tolist()
    assert len(index.text) == corpus.num_chars("train")
    assert index.text == text[: len(index.text)]
    # the val split repeats the train split's lines with new numbers: long runs are found
    ref = reference_report(corpus, index, 100)
    assert ref.chars == 100 and ref.longest >= 40


def test_a_stale_cache_is_rebuilt(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 30, encoding="utf-8")
    corpus = load_corpus(path)
    index = corpus_index(corpus)
    json_path = Path(corpus.tokens.filename).parent / "copying.json"
    json_path.write_text('{"format": 1, "fingerprint": "other", "chars": 1}')
    assert corpus_index(corpus).suffixes.tolist() == index.suffixes.tolist()
    assert '"other"' not in json_path.read_text()
