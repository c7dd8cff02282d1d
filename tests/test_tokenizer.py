import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    TextDecoder,
    iter_chunks,
    rechunk,
    tokenizer_from_dict,
)


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


# --------------------------------------------------------------------------- byte-level BPE

TRAIN_TEXT = "\n".join(
    f"First Citizen: Before we proceed any further, hear me speak. {i}\nAll: Speak, speak.\n"
    for i in range(60)
)  # ASCII only: every emoji and CJK character below is unseen, so it falls apart into bytes
UNSEEN = "Grüße 😀🎉 世界，你好！ naïve — ∑λ\n\n\ttab  two spaces "


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter_chunks(TRAIN_TEXT, 500), vocab_size=300)


def test_bpe_learns_merges_and_round_trips_unseen_text(bpe):
    assert bpe.vocab_size == 300
    ids = bpe.encode(TRAIN_TEXT[:200])
    assert len(ids) < 200 / 2  # merges make tokens longer than a byte on the training text
    assert bpe.decode(bpe.encode(UNSEEN)) == UNSEEN
    assert bpe.unknown_chars(UNSEEN) == []
    assert len(bpe.encode("😀")) == 4  # an unseen 4-byte character: one token per byte
    assert bpe.encode_array(UNSEEN).tolist() == bpe.encode(UNSEEN)


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(max_size=60))
def test_every_string_round_trips(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streaming_yields_whole_characters_only(kind, bpe):
    tok = bpe if kind == "bpe" else CharTokenizer.from_text(UNSEEN)
    decoder = tok.text_decoder()
    pieces, waited = [], 0
    for i in tok.encode(UNSEEN):
        piece = decoder.push(i)
        if decoder.pending:
            waited += 1
        pieces.append(piece)
    assert decoder.flush() == ""
    assert "".join(pieces) == UNSEEN
    assert "\ufffd" not in "".join(pieces)
    if kind == "bpe":
        assert waited > 0  # the emoji and CJK bytes did wait for the rest of their character
    else:
        assert waited == 0 and pieces == list(UNSEEN)


def test_a_character_cut_short_decodes_as_replacement(bpe):
    ids = bpe.encode("a😀")[:-1]  # the emoji's last byte is missing
    decoder = TextDecoder(bpe)
    text = "".join(decoder.push(i) for i in ids)
    assert text == "a" and decoder.pending
    assert text + decoder.flush() == bpe.decode(ids) == "a\ufffd"


def test_chunked_encoding_equals_whole_encoding(bpe):
    text = (TRAIN_TEXT + UNSEEN + "\n\n  indented\n\nx\n") * 5
    chunks = list(iter_chunks(text, 97))
    assert "".join(chunks) == text and len(chunks) > 10
    assert [i for c in chunks for i in bpe.encode(c)] == bpe.encode(text)
    assert [i for ids in bpe.encode_batch(chunks) for i in ids] == bpe.encode(text)


def test_rechunked_stream_encodes_like_the_whole(bpe):
    text = (TRAIN_TEXT + UNSEEN + "\n\n  indented\n \nx\n") * 5
    pieces = [text[i:i + 13] for i in range(0, len(text), 13)]
    chunks = list(rechunk(pieces, 200))
    assert "".join(chunks) == text and len(chunks) > 10
    assert [i for c in chunks for i in bpe.encode(c)] == bpe.encode(text)
    assert list(rechunk(["no newline at all " * 10], 5)) == ["no newline at all " * 10]


@settings(max_examples=300, deadline=None, database=None)
@given(parts=st.lists(st.sampled_from(
    ["\n", " ", "\t", "\r\n", "\n\n", "  ", "ab", "x y", "'s", "é", "😀", "1", "?!"]), max_size=30))
def test_chunk_cuts_never_change_the_tokens(bpe, parts):
    text = "".join(parts)
    whole = bpe.encode(text)
    for chunk_size in (2, 3, 5):
        chunks = list(iter_chunks(text, chunk_size))
        assert "".join(chunks) == text
        # every cut made at a safe place (not forced by a missing one) keeps the tokens
        pos = 0
        for c in chunks[:-1]:
            pos += len(c)
            if text[pos - 1] == "\n" and not text[pos - 2].isspace() and not text[pos].isspace():
                assert bpe.encode(text[:pos]) + bpe.encode(text[pos:]) == whole


def test_tokenizer_descriptions_round_trip(bpe):
    char = CharTokenizer.from_text("abc\n")
    assert tokenizer_from_dict(char.to_dict()) == char
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert again == bpe and again.encode(UNSEEN) == bpe.encode(UNSEEN)
    assert again != char and char != again
    assert again.fingerprint == bpe.fingerprint != char.fingerprint
    assert CharTokenizer.from_text("abd").fingerprint != CharTokenizer.from_text("abc").fingerprint


def test_token_text_shows_partial_characters_as_bytes(bpe):
    ids = bpe.encode("😀")
    assert [bpe.token_text(i) for i in ids] == ["\\xf0", "\\x9f", "\\x98", "\\x80"]
    assert bpe.token_text(bpe.encode(" speak")[0]) == " speak"
    assert CharTokenizer.from_text("ab").token_text(1) == "b"


@pytest.mark.parametrize("d,fragment", [
    ({"kind": "wordpiece"}, "unrecognised tokenizer kind"),
    ({"kind": "bpe", "tokenizer_json": "{not json"}, "cannot read the tokenizer"),
    ({"kind": "bpe"}, "expected a 'bpe' tokenizer"),
    ("chars", "unrecognised tokenizer kind"),
])
def test_bad_descriptions_are_one_line_errors(d, fragment):
    with pytest.raises(TinyGPTError, match=fragment):
        tokenizer_from_dict(d)


def test_only_byte_level_bpe_without_normalizer_is_accepted(bpe):
    from tokenizers import Tokenizer, models, normalizers

    with pytest.raises(TinyGPTError, match="not a byte-level BPE"):
        BPETokenizer(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    lowered = Tokenizer.from_str(bpe.to_json())
    lowered.normalizer = normalizers.Lowercase()
    with pytest.raises(TinyGPTError, match="normalizes"):
        BPETokenizer(lowered)


@pytest.mark.parametrize("size", [0, 256, True, 300.0])
def test_bpe_vocabulary_size_is_checked(size):
    with pytest.raises(TinyGPTError, match="at least 257"):
        BPETokenizer.train(["abc"], vocab_size=size)
