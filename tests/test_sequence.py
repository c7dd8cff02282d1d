"""One sequence being sampled (``Sample``) and the text streams built on it."""

import pytest
import torch

from tinygpt.engine import Engine
from tinygpt.generate import make_generator, sample_next
from tinygpt.models import GPT, GPTConfig
from tinygpt.sampling import GenerationConfig, SamplingConfig
from tinygpt.sequence import Piece, Sample, generate_text, stream
from tinygpt.tokenizer import CharTokenizer

TOK = CharTokenizer("abcdefghijk")


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16,
                          dropout=0.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model.eval()


def feed(sample: Sample, text: str) -> list[str]:
    """The text each token of ``text`` releases, until the sample finishes."""
    out = []
    for t in TOK.encode(text):
        out.append(sample.add(t))
        if sample.finished:
            break
    return out


def test_a_stop_string_across_tokens_is_held_back_then_cut():
    s = Sample(TOK, TOK.encode("a"), GenerationConfig(20, stop=("cde",)))
    assert feed(s, "abcdcdefg") == ["a", "b", "", "", "cd", "", ""]
    assert s.finish_reason == "stop" and s.text == "abcd" and s.num_tokens == 7


def test_max_tokens_ends_with_what_was_held_back():
    s = Sample(TOK, [0], GenerationConfig(3, stop=("xyz", "bc")))
    assert feed(s, "abb") == ["a", "", "bb"]  # "b" might have begun "bc"
    assert s.finish_reason == "length" and s.text == "abb"


def test_logprobs_entries_follow_the_characters():
    s = Sample(TOK, [0], GenerationConfig(5, logprobs=1))
    logits = torch.tensor([0.0, 2.0, 1.0] + [-9.0] * 8)
    assert s.add(2, logits) == "c"
    (entry,) = s.entries
    logp = torch.log_softmax(logits, dim=-1)
    assert entry.token == "c" and entry.logprob == pytest.approx(float(logp[2]))
    assert entry.top == {"b": pytest.approx(float(logp[1])), "c": pytest.approx(float(logp[2]))}
    assert s.entry_count(0) == 0 and s.entry_count(1) == 1
    assert s.add(3) == "d" and len(s.entries) == 1  # no logits given: no entry


def test_advance_draws_with_the_generator_of_seed_plus_index():
    config = GenerationConfig(4, SamplingConfig(temperature=1.0), seed=10)
    s = Sample(TOK, [0], config, index=2)
    logits = torch.randn(4, 11)
    gen = make_generator(12)
    expected = [int(sample_next(row[None], config.sampling, gen)[0]) for row in logits]
    text = "".join(s.advance(row) for row in logits)
    assert text == TOK.decode(expected) and s.finish_reason == "length"


def test_a_started_sample_keeps_its_engine_state_until_it_ends(gpt):
    engine = Engine(gpt)
    s = Sample(TOK, TOK.encode("ab"), GenerationConfig(3, SamplingConfig(temperature=0)))
    s.start(engine)
    state = s.state
    for _ in range(3):
        s.advance(engine.step([s.state])[0])
    assert state.tokens[2:] == TOK.encode(s.text) and s.state is None  # released when done
    empty = Sample(TOK, [0], GenerationConfig(0))
    empty.start(engine)
    assert empty.finish_reason == "length" and empty.state is None


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_of_zero_tokens_ends_every_sample_at_once(gpt, use_cache):
    pieces = list(stream(gpt, TOK, "ab", 0, num_samples=2, use_cache=use_cache))
    assert pieces == [Piece(0, "", "length"), Piece(1, "", "length")]


def test_cached_and_reference_paths_give_the_same_pieces_text(gpt):
    kw = dict(num_samples=3, seed=7, stop=["ca"])
    cached = generate_text(gpt, TOK, "ab", 30, SamplingConfig(0.9, top_k=5), **kw)
    ref = generate_text(gpt, TOK, "ab", 30, SamplingConfig(0.9, top_k=5), use_cache=False, **kw)
    assert cached == ref
    alone = [generate_text(gpt, TOK, "ab", 30, SamplingConfig(0.9, top_k=5), seed=7 + i,
                           stop=["ca"])[0] for i in range(3)]
    assert cached == alone


def test_stream_checks_its_settings_before_sampling(gpt):
    with pytest.raises(ValueError, match="top_k must be an integer between 0 and 11"):
        list(stream(gpt, TOK, "a", 5, SamplingConfig(top_k=12)))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        list(stream(gpt, TOK, "a", -1))
    with pytest.raises(ValueError, match="at least one token"):
        list(stream(gpt, TOK, "", 3, use_cache=False))
