"""``logprobs`` as in OpenAI's Completions API, read with the official client, checked against a
direct forward pass of the model."""

from __future__ import annotations

import math

import pytest
import torch

from tinygpt.generate import default_window_shift, slide_window

openai = pytest.importorskip("openai")

MODEL = "tiny"
PROMPT = "To be"  # 5 characters + 10 generated fit in the test model's context of 16


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def direct_logprobs(checkpoint, text: str) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``text`` (T, V), one forward."""
    ids = torch.tensor([checkpoint.tokenizer.encode(text)])
    assert ids.size(1) <= checkpoint.model.config.block_size
    with torch.no_grad():
        logits, _ = checkpoint.model(ids)
    return torch.log_softmax(logits[0].float(), dim=-1)


def check_against_model(checkpoint, prompt: str, text: str, lp, first: int = 0) -> None:
    """Entry i of ``lp`` is text[i]: its log-probability and top-5 are the model's, 1e-4."""
    direct = direct_logprobs(checkpoint, prompt + text)
    chars = checkpoint.tokenizer.chars
    for i, ch in enumerate(text[first:], start=first):
        row = direct[len(prompt) + i - 1]  # the position before the character predicts it
        top = lp.top_logprobs[i]
        assert lp.tokens[i] == ch
        assert lp.token_logprobs[i] == pytest.approx(row[chars.index(ch)].item(), abs=1e-4)
        assert top[ch] == lp.token_logprobs[i]  # the chosen character is always listed
        values, ids = row.topk(5)
        assert sorted(top.values(), reverse=True)[:5] == pytest.approx(values.tolist(), abs=1e-4)
        for key, value in top.items():
            assert value == pytest.approx(row[chars.index(key)].item(), abs=1e-4)
        assert len(top) in (5, 6)


def test_logprobs_equal_a_forward_pass_of_the_model(client, checkpoint):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=5,
                                    temperature=1.3, seed=11)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(choice.text) == 10
    assert lp.tokens == list(choice.text)
    assert lp.text_offset == list(range(len(PROMPT), len(PROMPT) + 10))  # from the prompt's start
    # reported before temperature: the model's own distribution
    check_against_model(checkpoint, PROMPT, choice.text, lp)


def test_greedy_takes_the_most_likely_character_listed(client, checkpoint):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=5,
                                    temperature=0)
    lp = out.choices[0].logprobs
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert token in top and top[token] == max(top.values())
        assert len(top) == 5
    check_against_model(checkpoint, PROMPT, out.choices[0].text, lp)


def test_streamed_chunks_carry_their_own_part(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=5, seed=3)
    whole = client.completions.create(**kwargs).choices[0]
    tokens, values, tops, offsets, text = [], [], [], [], ""
    for chunk in client.completions.create(stream=True, **kwargs):
        c = chunk.choices[0]
        text += c.text
        assert len(c.logprobs.tokens) == len(c.text)
        tokens += c.logprobs.tokens
        values += c.logprobs.token_logprobs
        tops += c.logprobs.top_logprobs
        offsets += c.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    assert offsets == whole.logprobs.text_offset
    assert [sorted(t) for t in tops] == [sorted(t) for t in whole.logprobs.top_logprobs]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_scores_the_prompt_too(client, checkpoint, stream):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, echo=True, seed=5)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
        text = "".join(c.text for c in chunks)
        lp = type("LP", (), {k: sum((getattr(c.logprobs, k) for c in chunks), [])
                             for k in ("tokens", "token_logprobs", "top_logprobs",
                                       "text_offset")})
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, lp = choice.text, choice.logprobs
    assert text.startswith(PROMPT) and len(text) == len(PROMPT) + 8
    assert lp.tokens == list(text)
    assert lp.text_offset == list(range(len(text)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before it
    direct = direct_logprobs(checkpoint, text)
    chars = checkpoint.tokenizer.chars
    for i in range(1, len(text)):
        assert lp.token_logprobs[i] == pytest.approx(direct[i - 1, chars.index(text[i])].item(),
                                                     abs=1e-4)
        assert len(lp.top_logprobs[i]) in (3, 4)


def test_a_prompt_longer_than_the_context_is_scored_with_generations_windows(client,
                                                                             checkpoint):
    prompt = "The quick brown fox jumps over the lazy dog; To be, or not"  # > 16 characters
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=1,
                                    echo=True, temperature=0)
    lp = out.choices[0].logprobs
    ids = checkpoint.tokenizer.encode(prompt)
    bs = checkpoint.model.config.block_size
    start = 0
    for n in range(1, len(ids)):
        start = slide_window(start, n, bs, default_window_shift(bs))
        with torch.no_grad():
            logits, _ = checkpoint.model(torch.tensor([ids[start:n]]))
        expected = torch.log_softmax(logits[0, -1].float(), -1)[ids[n]].item()
        assert lp.token_logprobs[n] == pytest.approx(expected, abs=1e-4)


def test_logprobs_zero_and_stop_strings(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, logprobs=0,
                                    seed=9)
    lp = out.choices[0].logprobs
    assert all(list(t) == [tok] for t, tok in zip(lp.top_logprobs, lp.tokens, strict=True))
    text = out.choices[0].text
    stop = text[4:6]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, logprobs=2,
                                    seed=9, stop=stop)
    c = cut.choices[0]
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    assert c.logprobs.tokens == list(c.text)  # the stop string's characters are not reported
    assert all(math.isfinite(v) and v <= 0 for v in c.logprobs.token_logprobs)


def test_logprobs_above_5_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, logprobs=6)
    assert e.value.body["param"] == "logprobs"
    assert "between 0 and 5" in e.value.body["message"]
