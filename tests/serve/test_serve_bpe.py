"""Serving a byte-level BPE model: max_tokens and usage count tokens, text streams in whole
characters, stop strings match across tokens, logprobs report tokens (partial bytes escaped) with
character offsets. The model is a bigram table scripted to spell a text, so every case is exact."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from tinygpt.checkpoint import Checkpoint
from tinygpt.models.bigram import BigramConfig, BigramLM
from tinygpt.tokenizer import BPETokenizer, iter_chunks

openai = pytest.importorskip("openai")

SCRIPT = "x🎉y"  # BPE never saw the emoji: it falls apart into byte tokens


@pytest.fixture(scope="module")
def bpe_checkpoint() -> Checkpoint:
    text = "To be, or not to be, that is the question. 你好 😀\n" * 40
    tok = BPETokenizer.train(iter_chunks(text, 500), vocab_size=300)
    ids = tok.encode(SCRIPT)
    assert len(set(ids)) == len(ids) == 5  # x, three pieces of the emoji, y
    model = BigramLM(BigramConfig(vocab_size=tok.vocab_size))
    with torch.no_grad():
        table = model.token_embedding_table.weight
        table.zero_()
        for a, b in zip(ids, ids[1:]):
            table[a, b] = 20.0  # greedy (and almost surely sampled) successor
    model.eval()
    state = {"model": "bigram", "model_config": {"vocab_size": tok.vocab_size}, "step": 0}
    return Checkpoint(Path("scripted"), state, model, tok)


@pytest.fixture(scope="module")
def server(bpe_checkpoint):
    from tests.serve.conftest import ServerThread, _build_app

    with ServerThread(_build_app(bpe_checkpoint)) as s:
        yield s


def complete(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "temperature": 0, **body},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokens_are_counted_and_text_is_whole_characters(server, bpe_checkpoint):
    out = complete(server, prompt="x", max_tokens=4, logprobs=2)
    choice = out["choices"][0]
    assert choice["text"] == "🎉y" and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    lp = choice["logprobs"]
    tok = bpe_checkpoint.tokenizer
    assert lp["tokens"] == [tok.token_text(i) for i in tok.encode("🎉y")]
    assert lp["tokens"][-1] == "y" and lp["tokens"][0].startswith("\\x")
    assert lp["text_offset"] == [1, 1, 1, 2]  # the emoji's pieces all start at character 1

    two = complete(server, prompt="x", max_tokens=2)["choices"][0]
    assert two["text"] == "\ufffd"  # two of the emoji's pieces: an unfinished character


def test_streamed_chunks_hold_whole_characters(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    chunks = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0,
                                       stream=True, logprobs=1)
    texts, tokens = [], []
    for chunk in chunks:
        c = chunk.choices[0]
        texts.append(c.text)
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
    assert "".join(texts) == "🎉y"  # chunks may merge, but none splits the emoji
    assert all("\ufffd" not in t for t in texts)
    assert len(tokens) == 4


@pytest.mark.parametrize("stop,text", [("🎉y", ""), ("y", "🎉"), ("🎉", "")])
def test_stop_strings_match_across_tokens(server, stop, text):
    choice = complete(server, prompt="x", max_tokens=4, stop=[stop])["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "stop"


def test_echo_with_logprobs_scores_the_prompt_tokens(server, bpe_checkpoint):
    out = complete(server, prompt="x🎉", max_tokens=1, echo=True, logprobs=1)
    choice = out["choices"][0]
    assert choice["text"] == "x🎉y"
    lp = choice["logprobs"]
    assert lp["text_offset"] == [0, 1, 1, 1, 2] and len(lp["tokens"]) == 5
    assert lp["token_logprobs"][0] is None


@pytest.mark.parametrize("route, field", [("/v1/completions", "prompt"),
                                          ("/v1/tinygpt/attention", "text")])
def test_a_lone_surrogate_is_a_400_not_a_tokenizer_crash(server, route, field):
    """Byte-level BPE knows every character, but ``"\\ud800"`` is not one: the tokenizer would
    raise on it, so the body is refused before."""
    body = b'{"model": "tiny", "%s": "x\\ud800"}' % field.encode()
    r = httpx.post(server.url + route, content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    assert "\\ud800" in r.json()["error"]["message"]
    assert complete(server, prompt="x", max_tokens=1)["choices"][0]["text"] == "\ufffd"
