"""The official ``openai`` client against a real server on an ephemeral loopback port."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

MODEL = "tiny"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_list(client, checkpoint):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0]
    assert card.owned_by == "tinygpt"
    assert card.model_extra["tinygpt"]["vocab_size"] == checkpoint.tokenizer.vocab_size
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion(client, checkpoint):
    out = client.completions.create(model=MODEL, prompt="The quick", max_tokens=12, seed=7)
    assert out.object == "text_completion"
    assert out.model == MODEL
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.text) == 12  # one token is one character
    assert not checkpoint.tokenizer.unknown_chars(choice.text)
    assert out.usage.prompt_tokens == len("The quick")
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == 21
    again = client.completions.create(model=MODEL, prompt="The quick", max_tokens=12, seed=7)
    assert again.choices[0].text == choice.text  # a seed makes the text reproducible


def test_default_max_tokens_is_16(client):
    out = client.completions.create(model=MODEL, prompt="To be")
    assert out.usage.completion_tokens == 16


def test_greedy_is_deterministic(client):
    texts = {
        client.completions.create(model=MODEL, prompt="To be", max_tokens=20,
                                  temperature=0).choices[0].text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_streamed_completion_matches_unstreamed(client):
    kwargs = dict(model=MODEL, prompt="Grüße", max_tokens=30, seed=123, temperature=1.0)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert len(chunks) >= 1
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert text == client.completions.create(**kwargs).choices[0].text
    assert len(text) == 30


def test_stream_usage_chunk(client):
    chunks = list(client.completions.create(
        model=MODEL, prompt="ab", max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == 2


def test_n_and_prompt_list(client):
    out = client.completions.create(model=MODEL, prompt="To be", n=2, max_tokens=25, seed=5)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.choices[0].text != out.choices[1].text  # each choice samples on its own
    assert out.usage.completion_tokens == 50

    out = client.completions.create(model=MODEL, prompt=["To", "The"], n=2, max_tokens=4, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == len("To") + len("The")


def test_n_streamed(client):
    chunks = list(client.completions.create(
        model=MODEL, prompt="Köln", n=2, max_tokens=10, seed=3, stream=True))
    texts = {0: "", 1: ""}
    done = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                done.add(ch.index)
    assert done == {0, 1}
    unstreamed = client.completions.create(model=MODEL, prompt="Köln", n=2, max_tokens=10, seed=3)
    assert [texts[0], texts[1]] == [c.text for c in unstreamed.choices]


def _find_stop(client) -> tuple[str, str]:
    """A stop string that greedy decoding will produce after a few characters."""
    full = client.completions.create(model=MODEL, prompt="The ", max_tokens=40,
                                     temperature=0).choices[0].text
    for start in range(3, 30):
        stop = full[start:start + 2]
        if stop not in full[:start + 1] and len(stop) == 2:
            return full, stop
    pytest.skip("greedy output too repetitive to pick a stop string")


def test_stop(client):
    full, stop = _find_stop(client)
    out = client.completions.create(model=MODEL, prompt="The ", max_tokens=40, temperature=0,
                                    stop=[stop, "\x00never"])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]
    assert stop not in choice.text
    assert out.usage.completion_tokens == full.index(stop) + len(stop)


def test_stop_streamed_holds_back_partial_match(client):
    full, stop = _find_stop(client)
    chunks = list(client.completions.create(model=MODEL, prompt="The ", max_tokens=40,
                                            temperature=0, stop=stop, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo(client):
    out = client.completions.create(model=MODEL, prompt="To be", max_tokens=3, echo=True, seed=1)
    assert out.choices[0].text.startswith("To be")
    assert len(out.choices[0].text) == len("To be") + 3


def test_bad_params_raise_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", temperature=7)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi ☃")
    assert "'☃'" in e.value.message  # names the characters the model does not know
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"top_k": -3})


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_api_key(make_server):
    s = make_server(api_key="s3cret-key")
    good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret-key", max_retries=0)
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="To", max_tokens=2).choices[0].text
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="To", max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_queue_full_raises_rate_limit(make_server, engines, checkpoint):
    import threading

    from tinygpt.serve.options import ServeLimits

    gate = threading.Event()
    s = make_server(engine=engines["gated"](checkpoint.model, gate),
                    limits=ServeLimits(max_batch=1, max_n=1, max_queue=0))
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
    stream = c.completions.create(model=MODEL, prompt="To", max_tokens=3, stream=True)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="To", max_tokens=3)
        assert int(e.value.response.headers["retry-after"]) >= 1
    finally:
        gate.set()
        assert "".join(ch.choices[0].text for ch in stream if ch.choices)
