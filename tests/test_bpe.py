"""BPE through the whole package: the token cache, the split, checkpoints, evaluation in bits per
character, streamed sampling in whole characters, stop strings across tokens, resume and
--init-from."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tinygpt.checkpoint import find_checkpoint, load_checkpoint, read_state
from tinygpt.config import TrainConfig
from tinygpt.data import load_corpus
from tinygpt.errors import TinyGPTError
from tinygpt.evaluate import count_chars, evaluate_tokens
from tinygpt.generate import SamplingConfig
from tinygpt.models.bigram import BigramConfig, BigramLM
from tinygpt.resolve import resolve_start
from tinygpt.sequence import generate_text, stream
from tinygpt.tokenizer import BPETokenizer, CharTokenizer

from .resume_helpers import main_in_process, train_in_process

VOCAB = 300


@pytest.fixture
def text_file(tmp_path):
    """Train text of plain words; the last tenth (the val split) repeats a word that appears
    nowhere before it, and some emoji and CJK."""
    lines = [f"To be, or not to be, that is the question {i}: 你好 😀" for i in range(150)]
    train = "\n".join(lines) + "\n"
    val = "zyzzyva zyzzyva zyzzyva 🎉 世界\n" * ((len(train) // 9) // 31 + 1)
    path = tmp_path / "corpus.txt"
    path.write_text(train + val, encoding="utf-8")
    return path


def test_bpe_is_trained_on_the_train_split_and_both_splits_spell_the_text(text_file):
    text = text_file.read_text(encoding="utf-8")
    corpus = load_corpus(text_file, bpe_vocab_size=VOCAB)
    tok = corpus.tokenizer
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == VOCAB
    n_train = int(len(text) * 0.9)
    assert "zyzzyva" not in text[:n_train] and text[n_train:].count("zyzzyva") > 5
    # trained on the train text only: the val-only word got no merges of its own
    assert not any("zyz" in t for t in tok.tokenizer.get_vocab())
    assert tok.decode(corpus.split("train")) == text[:n_train]
    assert tok.decode(corpus.split("val")) == text[n_train:]
    assert corpus.num_chars("train") == n_train and corpus.num_chars("val") == len(text) - n_train
    # the same validation text as the character model's
    chars = load_corpus(text_file)
    assert chars.tokenizer.decode(chars.split("val")) == text[n_train:]
    assert chars.num_chars("val") == len(chars.split("val"))


def test_token_cache_is_keyed_by_tokenizer(text_file, tinygpt_home):
    char = load_corpus(text_file)
    bpe = load_corpus(text_file, bpe_vocab_size=VOCAB)
    bigger = load_corpus(text_file, bpe_vocab_size=VOCAB + 40)
    caches = sorted(p.name for p in (tinygpt_home / "tokens").iterdir())
    assert len(caches) == 3
    assert isinstance(char.tokenizer, CharTokenizer) and isinstance(bpe.tokenizer, BPETokenizer)
    assert len(bpe.tokens) < len(char.tokens) and bigger.tokenizer != bpe.tokenizer
    # each comes back from its own cache, unchanged
    again = load_corpus(text_file, bpe_vocab_size=VOCAB)
    assert again.tokenizer == bpe.tokenizer and np.array_equal(again.tokens, bpe.tokens)
    assert load_corpus(text_file).tokenizer == char.tokenizer
    # a given tokenizer is a key of its own too, and finds the same tokens
    given = load_corpus(text_file, tokenizer=bpe.tokenizer)
    assert np.array_equal(given.tokens, bpe.tokens)
    assert len(list((tinygpt_home / "tokens").iterdir())) == 4


def test_bits_per_char_divides_total_nats_by_characters(text_file):
    corpus = load_corpus(text_file, bpe_vocab_size=VOCAB)
    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=VOCAB))
    val = corpus.split("val")
    result = evaluate_tokens(model, val, 16, tokenizer=corpus.tokenizer)
    chars = len(corpus.tokenizer.decode(val[1:]))
    assert result["chars"] == chars == count_chars(corpus.tokenizer, val[1:], chunk=7)
    total = result["val_loss"] * result["tokens"]
    assert result["bits_per_char"] == pytest.approx(total / chars / math.log(2), rel=1e-9)
    train = corpus.split("train")  # on the text it was trained on, BPE tokens are long
    assert count_chars(corpus.tokenizer, train) > 2 * len(train)
    char_result = evaluate_tokens(model, np.arange(50) % VOCAB, 16)
    assert char_result["chars"] == char_result["tokens"] == 49


def scripted_bigram(tok, text: str) -> BigramLM:
    """A bigram model that, greedily, spells ``text`` token after token (its tokens must all be
    different so that each one has one successor)."""
    ids = tok.encode(text)
    assert len(set(ids)) == len(ids)
    model = BigramLM(BigramConfig(vocab_size=tok.vocab_size))
    with torch.no_grad():
        table = model.token_embedding_table.weight
        table.zero_()
        for a, b in zip(ids, ids[1:]):
            table[a, b] = 10.0
    return model


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_streams_whole_characters_only(use_cache, text_file):
    tok = load_corpus(text_file, bpe_vocab_size=VOCAB).tokenizer
    script = "x🎉y"  # the emoji is only in the val split: four byte tokens, none a character
    model = scripted_bigram(tok, script)
    n = len(tok.encode(script)) - 1
    assert n >= 4  # x, then the emoji in three or four pieces, then y
    pieces = list(stream(model, tok, "x", n, SamplingConfig(temperature=0.0), use_cache=use_cache))
    texts = [p.text for p in pieces]
    assert "".join(texts) == "🎉y"
    assert all(t.encode("utf-8").decode("utf-8") == t and "\ufffd" not in t for t in texts)
    assert "🎉" in texts and pieces[-1].finish == "length"


@pytest.mark.parametrize("stop,expected", [("🎉y", ""), ("y", "🎉"), ("\x9f", "🎉y")])
def test_stop_strings_match_across_token_boundaries(stop, expected, text_file):
    tok = load_corpus(text_file, bpe_vocab_size=VOCAB).tokenizer
    model = scripted_bigram(tok, "x🎉y")
    n = len(tok.encode("x🎉y")) - 1
    for use_cache in (True, False):
        out = generate_text(model, tok, "x", n, SamplingConfig(temperature=0.0), stop=[stop],
                            use_cache=use_cache)
        assert out == [expected]


def test_an_unfinished_character_at_the_end_is_replaced(text_file):
    tok = load_corpus(text_file, bpe_vocab_size=VOCAB).tokenizer
    model = scripted_bigram(tok, "x🎉")
    out = generate_text(model, tok, "x", 2, SamplingConfig(temperature=0.0))  # 2 of 4 bytes
    assert out == ["\ufffd"]


def test_train_eval_sample_resume_with_bpe(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    result = train_in_process(text_file, run, tokenizer="bpe", vocab_size=VOCAB, max_steps=4,
                              eval_interval=2)
    assert isinstance(result.tokenizer, BPETokenizer) and result.tokenizer.vocab_size == VOCAB
    folder = find_checkpoint(run, "last")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"]
    raw = json.loads((folder / "state.json").read_text())
    assert raw["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"}
    assert BPETokenizer.from_json((folder / "tokenizer.json").read_text()) == result.tokenizer
    ckpt = load_checkpoint(run, "last")
    assert ckpt.tokenizer == result.tokenizer and read_state(folder)["tokenizer"]["kind"] == "bpe"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_bpc"] > 0 and r["train_bpc"] > 0 for r in records)

    capsys.readouterr()
    assert main_in_process("eval", run, "--json") == 0
    ev = json.loads(capsys.readouterr().out)
    val = load_corpus(text_file, tokenizer=result.tokenizer).split("val")
    assert ev["tokens"] == len(val) - 1 and ev["chars"] == len(result.tokenizer.decode(val[1:]))
    assert ev["bits_per_char"] == pytest.approx(
        ev["val_loss"] * ev["tokens"] / ev["chars"] / math.log(2), rel=1e-9)

    assert main_in_process("sample", run, "--prompt", "To be 🎉", "--num-chars", "8", "--seed",
                           "3") == 0
    assert capsys.readouterr().out.startswith("To be 🎉")

    assert main_in_process("train", "--resume", run, "--max-steps", "6") == 0
    assert load_checkpoint(run, "last").tokenizer == result.tokenizer


def test_a_changed_tokenizer_file_is_caught(text_file, tmp_path):
    run = tmp_path / "run"
    train_in_process(text_file, run, tokenizer="bpe", vocab_size=VOCAB, max_steps=2,
                     eval_interval=2)
    folder = find_checkpoint(run, "last")
    path = folder / "tokenizer.json"
    path.write_text(path.read_text().replace('"zyz"', '"zyx"', 1) + " ")
    with pytest.raises(TinyGPTError, match="tokenizer.json"):
        load_checkpoint(folder)


def test_init_from_keeps_the_tokenizer(text_file, tmp_path):
    run = tmp_path / "run"
    train_in_process(text_file, run, tokenizer="bpe", vocab_size=VOCAB, max_steps=2,
                     eval_interval=2)
    start = resolve_start({"init_from": str(run), "data": str(text_file)})
    assert start.cfg.data.tokenizer == "bpe" and start.cfg.data.vocab_size == VOCAB
    assert start.init is not None and start.init.tokenizer.vocab_size == VOCAB
    with pytest.raises(TinyGPTError, match="--tokenizer char does not match"):
        resolve_start({"init_from": str(run), "tokenizer": "char"})
    with pytest.raises(TinyGPTError, match="--vocab-size 512 does not match"):
        resolve_start({"init_from": str(run), "vocab_size": 512})
    # fine-tuning on another text (with characters BPE never saw) encodes it with the same BPE
    other = tmp_path / "other.txt"
    other.write_text("Ünïcödé ♪ lyrics, la la lá\n" * 200, encoding="utf-8")
    ft = tmp_path / "ft"
    result = train_in_process(other, ft, init_from=str(run), max_steps=2, eval_interval=2,
                              tokenizer="bpe")
    assert result.tokenizer == load_checkpoint(run).tokenizer


@pytest.mark.parametrize("settings,fragment", [
    ({"vocab_size": 300}, "--vocab-size is for --tokenizer bpe"),
    ({"tokenizer": "bpe", "vocab_size": 200}, "at least one merge"),
    ({"tokenizer": "wordpiece"}, "unknown tokenizer"),
])
def test_tokenizer_settings_are_checked(settings, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig.resolve(settings)


def test_bpe_default_vocabulary():
    assert TrainConfig.resolve({"tokenizer": "bpe"}).data.bpe_vocab_size == 1024
    assert TrainConfig.resolve({}).data.bpe_vocab_size is None


def test_encoding_streams_in_chunks_and_batches(text_file, monkeypatch):
    """Small chunks and batches (as for a corpus of many megabytes) give the tokens of encoding
    each split whole."""
    import tinygpt.data as data

    text = text_file.read_text(encoding="utf-8")
    whole = load_corpus(text_file, bpe_vocab_size=VOCAB)
    tok = whole.tokenizer
    monkeypatch.setattr(data, "ENCODE_CHARS", 64)
    monkeypatch.setattr(data, "ENCODE_BATCH", 3)
    monkeypatch.setattr(data, "CHUNK_BYTES", 100)  # the file is read in small pieces too
    streamed = load_corpus(text_file, tokenizer=tok)
    n_train = int(len(text) * 0.9)
    assert streamed.split("train").tolist() == tok.encode(text[:n_train])
    assert streamed.split("val").tolist() == tok.encode(text[n_train:])
    assert np.array_equal(streamed.tokens, whole.tokens)


def test_loss_plot_converts_to_bits_per_character():
    from tinygpt.plots import _bits_per_nat

    assert _bits_per_nat([]) is None
    assert _bits_per_nat([{"val_loss": 2.0}]) is None  # a run from before val_bpc
    records = [{"val_loss": 4.0, "val_bpc": 2.0}, {"val_loss": 3.0, "val_bpc": 1.2}]
    assert _bits_per_nat(records) == pytest.approx(0.4)
