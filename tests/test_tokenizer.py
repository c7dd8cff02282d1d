import pytest

from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import CharTokenizer


def test_vocabulary_is_sorted_unique_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8


def test_encode_decode_round_trip_with_non_ascii():
    text = "Ça va? 你好 — ∑λ → ∞ 😀"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert max(ids) == tok.vocab_size - 1


def test_ids_follow_code_point_order():
    tok = CharTokenizer.from_text("cab")
    assert tok.encode("abc") == [0, 1, 2]


def test_unknown_characters_are_listed():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TinyGPTError) as e:
        tok.encode("abxzy")
    msg = str(e.value)
    assert "'x'" in msg and "'y'" in msg and "'z'" in msg and "3 character" in msg


def test_json_round_trip():
    tok = CharTokenizer.from_text("xyz\n\té")
    again = CharTokenizer.from_json(tok.to_json())
    assert again == tok and again.encode("é\n") == tok.encode("é\n")


def test_empty_text_is_refused():
    with pytest.raises(TinyGPTError):
        CharTokenizer.from_text("")
