"""POST /v1/chat/completions: the play-script template, the stop at a new speaker, the chat shape
(checked with the openai package's own types), and the same limits and errors as completions."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from tests.serve.conftest import ServerThread  # noqa: E402

from tinygpt.checkpoint import load_checkpoint  # noqa: E402
from tinygpt.config import TrainConfig  # noqa: E402
from tinygpt.engine import Engine  # noqa: E402
from tinygpt.sampling import GenerationConfig  # noqa: E402
from tinygpt.sequence import Sample, TextStream  # noqa: E402
from tinygpt.serve.app import create_app  # noqa: E402
from tinygpt.serve.chat import ChatTemplate, SpeakerTurn  # noqa: E402
from tinygpt.serve.options import ServeLimits  # noqa: E402
from tinygpt.serve.server import model_info  # noqa: E402
from tinygpt.train import train  # noqa: E402

MODEL = "play"
SPEECHES = [
    ("ROMEO", "But soft! What light through yonder window breaks?"),
    ("JULIET", "O Romeo, Romeo, wherefore art thou Romeo?"),
    ("NURSE", "Madam, your mother craves a word with you."),
    ("USER", "Tell me, good friend, what news?"),
    ("ASSISTANT", "The news is good, my lord; the day is fair."),
    ("SYSTEM", "Speak as a herald of Verona."),
    ("FIRST CITIZEN", "Hark! Hi, how now? Grant us peace, and a jot of quiet."),
]


@pytest.fixture(scope="module")
def play_run(tmp_path_factory):
    """A GPT trained for a few seconds on a small play script (capitals, colons, blank lines)."""
    root = tmp_path_factory.mktemp("play")
    text = "".join(f"{who}:\n{line} {i % 7}\n\n" for i in range(60)
                   for who, line in [SPEECHES[(i + k) % len(SPEECHES)] for k in range(2)])
    (root / "play.txt").write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYGPT_HOME", str(root / "home"))
        cfg = TrainConfig.resolve({
            "data": str(root / "play.txt"), "out": str(root / MODEL), "n_layer": 1, "n_head": 2,
            "n_embd": 48, "block_size": 64, "max_steps": 150, "eval_interval": 150,
            "eval_iters": 2, "sample_chars": 0, "lr": 1e-2, "warmup_steps": 5, "device": "cpu",
        })
        train(cfg, log=lambda _: None, progress_bar=False)
    return load_checkpoint(root / MODEL, device="cpu")


def serve_play(ckpt, limits=None, assistant="assistant") -> ServerThread:
    app = create_app(Engine(ckpt.model), ckpt.tokenizer, model_info(ckpt, MODEL),
                     limits or ServeLimits(), None, ("127.0.0.1",), assistant)
    return ServerThread(app)


@pytest.fixture(scope="module")
def play_server(play_run):
    with serve_play(play_run) as s:
        yield s


@pytest.fixture
def client(play_server):
    return openai.OpenAI(base_url=play_server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=30)


HERALD = [{"role": "system", "content": "Speak as a herald of Verona."},
          {"role": "user", "name": "Romeo", "content": "What news, good friend?\n"}]


# --------------------------------------------------------------------------- the template


def test_messages_become_a_play_script():
    script = ChatTemplate().render([("system", None, "Be brief."),
                                    ("user", "First Citizen", "Hear me speak.\n\n"),
                                    ("assistant", None, "I hear.")])
    assert script == ("SYSTEM:\nBe brief.\n\nFIRST CITIZEN:\nHear me speak.\n\n"
                      "ASSISTANT:\nI hear.\n\nASSISTANT:\n")
    assert ChatTemplate("Herald").render([("user", None, "Hi")]) == "USER:\nHi\n\nHERALD:\n"
    for bad in ("", "two\nlines", "NAME:", "9lives", "x" * 65):
        with pytest.raises(ValueError, match="--chat-assistant"):
            ChatTemplate(bad)


def stream_of(pieces: list[str]) -> tuple[str, bool]:
    s = TextStream((SpeakerTurn(),))
    released = "".join(s.feed(p) for p in pieces)
    if not s.stopped:
        released += s.finish()
    return released, s.stopped


@pytest.mark.parametrize("text, reply, stopped", [
    ("Good morrow.\nAnd more.\n\nROMEO:\nHi there", "Good morrow.\nAnd more.", True),
    ("Away!\n\nFirst Citizen:\nSpeak.", "Away!", True),  # Tiny Shakespeare's mixed-case names
    ("One.\n\nKING RICHARD III:\n", "One.", True),
    ("Line one.\nROMEO:\nno blank line before it", None, False),
    ("Yes.\n\nthen a lowercase line:\n", None, False),
    ("Hark.\n\nHe said: go\nnow", None, False),  # more after the colon: not a speaker line
    ("A pause\n\nand on\n\n", None, False),
])
def test_the_reply_stops_where_a_new_speaker_begins(text, reply, stopped):
    for pieces in ([text], list(text)):  # at once, and one character at a time
        got, did_stop = stream_of(pieces)
        assert (got, did_stop) == (reply if stopped else text, stopped)


def test_a_possible_speaker_line_is_held_back_until_it_is_decided():
    s = TextStream((SpeakerTurn(),))
    assert s.feed("Fare well.\n\nROM") == "Fare well."
    assert s.feed("E") == ""
    assert s.feed("O and Juliet") == ""  # a name may have spaces: still undecided
    assert s.feed(", both") == "\n\nROMEO and Juliet, both"  # not a speaker line after all
    assert not s.stopped


def test_the_speaker_stop_runs_in_the_one_generation_loop(play_run):
    """``Sample`` (the library's, the CLI's and the scheduler's loop) ends at the new speaker."""
    tok = play_run.tokenizer
    config = GenerationConfig(200, stop=("news", SpeakerTurn()))
    sample = Sample(tok, tok.encode("USER:\nHi\n\nASSISTANT:\n"), config)
    text = "".join(sample.add(t) for t in tok.encode("All is well.\n\nJULIET:\nO Romeo"))
    assert (text, sample.finish_reason, sample.text) == ("All is well.", "stop", "All is well.")
    sample = Sample(tok, tok.encode("USER:\nHi\n\nASSISTANT:\n"), config)
    assert "".join(sample.add(t) for t in tok.encode("Good news")) == "Good "  # and stop strings


# --------------------------------------------------------------------------- the openai client


def strictly(cls, obj: dict, extensions: frozenset = frozenset()):
    """``obj`` as the openai package's ``cls``, strictly: every field of the right type, none
    unknown to the package but the named ``extensions``, nothing lost (the parsed model dumps
    back to ``obj``)."""
    parsed = cls.model_validate(obj, strict=True)

    def no_extra(model) -> None:
        extra = set(model.model_extra or {}) - (extensions if model is parsed else set())
        assert not extra, (type(model).__name__, extra)
        for value in model.__dict__.values():
            for item in value if isinstance(value, list) else [value]:
                if hasattr(item, "model_extra"):
                    no_extra(item)

    no_extra(parsed)
    assert parsed.model_dump(exclude_unset=True) == obj
    return parsed


def test_chat_completion_with_the_openai_client(client, play_run):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HERALD, max_tokens=120, seed=3, temperature=0.5)
    out = strictly(ChatCompletion, json.loads(raw.text))
    assert out.object == "chat.completion" and out.model == MODEL and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    reply = choice.message.content
    assert "\n\n" not in reply.rstrip("\n") or choice.finish_reason == "length"
    prompt = ChatTemplate().render([("system", None, HERALD[0]["content"]),
                                    ("user", "Romeo", HERALD[1]["content"])])
    assert out.usage.prompt_tokens == len(play_run.tokenizer.encode(prompt))
    assert out.usage.completion_tokens >= len(reply)
    again = client.chat.completions.create(model=MODEL, messages=HERALD, max_tokens=120, seed=3,
                                           temperature=0.5)
    assert again.choices[0].message.content == reply  # a seed makes the reply reproducible


def test_the_reply_of_a_trained_model_ends_at_the_next_speaker(client):
    """The model learned the script: greedy, it ends its speech and starts another speaker,
    which the template's stop cuts off."""
    out = client.chat.completions.create(model=MODEL, messages=HERALD, max_tokens=300,
                                         temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert ":\n" not in choice.message.content and not choice.message.content.endswith("\n\n")
    assert out.usage.completion_tokens < 300


def test_streamed_chat_matches_the_unstreamed_reply(client):
    kwargs = dict(model=MODEL, messages=HERALD, max_tokens=80, seed=11, n=2,
                  stream_options={"include_usage": True})
    with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [strictly(ChatCompletionChunk, json.loads(x[6:])) for x in lines[:-1]]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        if choice.delta.role is not None:  # each choice's first chunk names the role
            assert choice.delta.role == "assistant" and texts[choice.index] == ""
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    plain = client.chat.completions.create(stream=False, **{k: v for k, v in kwargs.items()
                                                            if k != "stream_options"})
    assert [texts[c.index] for c in plain.choices] == [c.message.content for c in plain.choices]
    assert finish == {c.index: c.finish_reason for c in plain.choices}
    streamed = list(client.chat.completions.create(stream=True, **kwargs))  # the client parses
    assert "".join(c.choices[0].delta.content or "" for c in streamed
                   if c.choices and c.choices[0].index == 0) == texts[0]


def test_chat_logprobs(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HERALD, max_tokens=20, seed=1, logprobs=True, top_logprobs=3)
    out = strictly(ChatCompletion, json.loads(raw.text))
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode("utf-8"))
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6
    plain = client.chat.completions.create(model=MODEL, messages=HERALD, max_tokens=20, seed=1)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == out.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=HERALD, max_tokens=20,
                                                 seed=1, logprobs=True, stream=True))
    streamed = [e for c in chunks for e in (c.choices[0].logprobs.content if c.choices and
                                            c.choices[0].logprobs else [])]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_stop_strings_and_the_assistant_option(play_run):
    with serve_play(play_run, assistant="Juliet") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
        out = c.chat.completions.create(model=MODEL, messages=HERALD, max_tokens=60,
                                        temperature=0, stop=["o"])
        assert "o" not in out.choices[0].message.content
        assert out.usage.prompt_tokens == len(play_run.tokenizer.encode(
            "SYSTEM:\nSpeak as a herald of Verona.\n\nROMEO:\nWhat news, good friend?\n\n"
            "JULIET:\n"))


# --------------------------------------------------------------------------- the same limits


def post(server, body, limits_msg=None) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


ONE = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": MODEL}, 400, "messages", "missing required parameter 'messages'"),
    ({"model": MODEL, "messages": []}, 400, "messages", "at least one message"),
    ({"model": MODEL, "messages": "Hi"}, 400, "messages", "expected an array of messages"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages",
     "invalid 'messages[0].role': expected one of 'system'"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages",
     "missing required parameter 'messages[0].content'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages",
     "invalid 'messages[0].content'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x", "mood": 1}]}, 400,
     "messages", "unknown parameter 'messages[0].mood'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "A:\nB"}]}, 400,
     "messages", "invalid 'messages[0].name': expected a speaker name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "invalid 'messages[0].content'"),
    ({"model": "gpt-4o", "messages": ONE}, 404, "model", "does not exist"),
    ({"model": MODEL, "messages": ONE, "n": 9}, 400, "n", "'n' must be an integer between 1 and 8"),
    ({"model": MODEL, "messages": ONE, "max_tokens": 5000}, 400, "max_tokens", "between 1 and"),
    ({"model": MODEL, "messages": ONE, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", "between 1 and"),
    ({"model": MODEL, "messages": ONE, "max_tokens": 5, "max_completion_tokens": 6}, 400,
     "max_tokens", "not two different values"),
    ({"model": MODEL, "messages": ONE, "temperature": 3}, 400, "temperature", "between 0 and 2"),
    ({"model": MODEL, "messages": ONE, "top_logprobs": 2}, 400, "top_logprobs",
     "needs 'logprobs': true"),
    ({"model": MODEL, "messages": ONE, "logprobs": True, "top_logprobs": 6}, 400,
     "top_logprobs", "between 0 and 5"),
    ({"model": MODEL, "messages": ONE, "logprobs": 2}, 400, "logprobs", "expected a boolean"),
    ({"model": MODEL, "messages": ONE, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "at most 4"),
    ({"model": MODEL, "messages": ONE, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only allowed when 'stream' is true"),
    ({"model": MODEL, "messages": ONE, "presence_penalty": 1}, 400, "presence_penalty",
     "not supported"),
    ({"model": MODEL, "messages": ONE, "tools": []}, 400, "tools", "unknown parameter 'tools'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "Grüße 你"}]}, 400, "messages",
     "the conversation (written as a play script) has 3 character(s) the model does not know"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a" * 5000}]}, 400, "messages",
     "this server accepts at most 4096"),
])
def test_bad_chat_requests_get_the_errors_of_completions(play_server, body, status, param, words):
    r = post(play_server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err


def test_chat_is_refused_like_completions_when_the_server_is_busy(play_run, engines):
    import threading

    gate = threading.Event()
    app = create_app(engines["gated"](play_run.model, gate), play_run.tokenizer,
                     model_info(play_run, MODEL), ServeLimits(max_batch=1, max_n=1, max_queue=0),
                     None, ("127.0.0.1",))
    with ServerThread(app) as s:
        body = {"model": MODEL, "messages": ONE, "max_tokens": 3, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as held:
            assert held.status_code == 200
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert "Retry-After" in r.headers
            gate.set()
            assert held.read().decode().endswith("data: [DONE]\n\n")
