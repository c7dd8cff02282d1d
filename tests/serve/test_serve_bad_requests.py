"""Bad requests get the right status and the OpenAI error shape; the server keeps answering."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.serve.conftest import wait_for

OK = {"model": "tiny", "prompt": "To be", "max_tokens": 4}
MISSING = object()


def body(**changes) -> bytes:
    req = dict(OK)
    for key, value in changes.items():
        if value is MISSING:
            req.pop(key, None)
        else:
            req[key] = value
    return json.dumps(req).encode()


def raw(text: str) -> bytes:
    return text.encode()


# (case id, request body, expected status, expected "param")
CASES = [
    # the body itself
    ("empty body", b"", 400, None),
    ("malformed json", raw('{"model": "tiny", "prompt": '), 400, None),
    ("json array", raw("[1, 2]"), 400, None),
    ("json string", raw('"hello"'), 400, None),
    ("not utf-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("NaN literal", raw('{"model": "tiny", "prompt": "To", "temperature": NaN}'), 400, None),
    ("Infinity literal", raw('{"model": "tiny", "prompt": "To", "top_p": Infinity}'), 400, None),
    ("deep nesting", raw('{"model": "tiny", "prompt": "To", "user": ' + "[" * 100000 + "]" * 100000
                         + "}"), 400, None),
    ("unknown parameter", body(frobnicate=1), 400, "frobnicate"),
    ("unknown parameter with a newline", body(**{"a\nb": 1}), 400, "a\nb"),
    # model
    ("missing model", body(model=MISSING), 400, "model"),
    ("unknown model", body(model="gpt-4"), 404, "model"),
    ("unknown model with control characters", body(model="x\n\x1b[2J" * 50), 404, "model"),
    ("model wrong type", body(model=3), 400, "model"),
    # prompt
    ("missing prompt", body(prompt=MISSING), 400, "prompt"),
    ("empty prompt", body(prompt=""), 400, "prompt"),
    ("empty prompt list", body(prompt=[]), 400, "prompt"),
    ("empty prompt in list", body(prompt=["To", ""]), 400, "prompt"),
    ("prompt wrong type", body(prompt=5), 400, "prompt"),
    ("token-id prompt", body(prompt=[1, 2, 3]), 400, "prompt"),
    ("prompt null", body(prompt=None), 400, "prompt"),
    ("prompt too long", body(prompt="a" * 4097), 400, "prompt"),
    ("unknown characters", body(prompt="To be ☃ 🙂"), 400, "prompt"),
    ("too many prompts", body(prompt=["To"] * 9), 400, "n"),
    # max_tokens
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", body(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens huge", body(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens above limit", body(max_tokens=1025), 400, "max_tokens"),
    ("max_tokens float", body(max_tokens=4.5), 400, "max_tokens"),
    ("max_tokens string", body(max_tokens="4"), 400, "max_tokens"),
    ("max_tokens bool", body(max_tokens=True), 400, "max_tokens"),
    # temperature
    ("temperature negative", body(temperature=-0.1), 400, "temperature"),
    ("temperature too high", body(temperature=2.01), 400, "temperature"),
    ("temperature overflow", raw('{"model": "tiny", "prompt": "To", "temperature": 1e999}'), 400,
     "temperature"),
    ("temperature string", body(temperature="hot"), 400, "temperature"),
    ("temperature bool", body(temperature=False), 400, "temperature"),
    # top_p
    ("top_p zero", body(top_p=0), 400, "top_p"),
    ("top_p above one", body(top_p=1.5), 400, "top_p"),
    ("top_p negative", body(top_p=-1), 400, "top_p"),
    ("top_p list", body(top_p=[0.5]), 400, "top_p"),
    # top_k
    ("top_k negative", body(top_k=-1), 400, "top_k"),
    ("top_k above vocabulary", body(top_k=10**6), 400, "top_k"),
    ("top_k float", body(top_k=2.5), 400, "top_k"),
    # n
    ("n zero", body(n=0), 400, "n"),
    ("n negative", body(n=-2), 400, "n"),
    ("n above limit", body(n=9), 400, "n"),
    ("n times prompts above limit", body(prompt=["To", "To", "To"], n=3), 400, "n"),
    ("n string", body(n="2"), 400, "n"),
    # stop
    ("too many stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", body(stop=""), 400, "stop"),
    ("empty stop in list", body(stop=["a", ""]), 400, "stop"),
    ("stop too long", body(stop="x" * 65), 400, "stop"),
    ("stop wrong type", body(stop=7), 400, "stop"),
    ("stop list wrong type", body(stop=["a", 7]), 400, "stop"),
    # seed
    ("seed too big", body(seed=2**64), 400, "seed"),
    ("seed float", body(seed=1.5), 400, "seed"),
    ("seed string", body(seed="42"), 400, "seed"),
    # stream and friends
    ("stream string", body(stream="yes"), 400, "stream"),
    ("stream number", body(stream=1), 400, "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("stream_options unknown key", body(stream=True, stream_options={"x": 1}), 400,
     "stream_options"),
    ("echo string", body(echo="no"), 400, "echo"),
    # parts of the OpenAI API this server does not implement
    ("logprobs above 5", body(logprobs=6), 400, "logprobs"),
    ("logprobs negative", body(logprobs=-1), 400, "logprobs"),
    ("logprobs wrong type", body(logprobs=True), 400, "logprobs"),
    ("logprobs as a number", body(logprobs=2.0), 400, "logprobs"),
    ("best_of", body(best_of=3), 400, "best_of"),
    ("presence_penalty", body(presence_penalty=0.5), 400, "presence_penalty"),
    ("logit_bias", body(logit_bias={"5": 10}), 400, "logit_bias"),
    ("suffix", body(suffix="end"), 400, "suffix"),
    # size
    ("oversized body", body(user="x" * 300_000), 413, None),
]


def check_error_shape(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"}
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "\n" not in err["message"]  # one line
    assert len(err["message"]) < 500
    assert isinstance(err["type"], str)
    assert err["param"] == param
    return err


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("content, status, param", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request(http, content, status, param):
    r = http.post("/v1/completions", content=content,
                  headers={"Content-Type": "application/json"})
    check_error_shape(r, status, param)
    # ... and the server still works
    ok = http.post("/v1/completions", json=OK)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"][0]["text"]) == 4


def test_unknown_characters_are_named(http):
    r = http.post("/v1/completions", json={**OK, "prompt": "To be ☃ 🙂"})
    err = check_error_shape(r, 400, "prompt")
    assert "'☃'" in err["message"] and "'🙂'" in err["message"]
    assert err["code"] == "unknown_characters"


def test_oversized_body_without_content_length(http):
    def chunks():
        yield b'{"model": "tiny", "prompt": "To", "user": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    check_error_shape(r, 413)


def test_wrong_content_type(http):
    r = http.post("/v1/completions", content=json.dumps(OK),
                  headers={"Content-Type": "text/plain"})
    check_error_shape(r, 415)


def test_unknown_route_and_method(http):
    check_error_shape(http.get("/v1/chat"), 404)
    check_error_shape(http.get("/v1/chat/completions"), 405)
    check_error_shape(http.post("/v1/nothing", json={}), 404)
    check_error_shape(http.get("/v1/completions"), 405)
    check_error_shape(http.get("/static/../app.py"), 404)
    check_error_shape(http.get("/v1/models/a%0Ab"), 404)  # one line, even so
    check_error_shape(http.get("/x%0Ay"), 404)


def test_accepted_edge_values(http):
    """The boundaries themselves are fine."""
    edge = {**OK, "max_tokens": 1, "temperature": 0, "top_p": 1, "top_k": 0, "n": 8,
            "stop": ["a", "b", "c", "d"], "seed": -(2**63), "logprobs": None, "best_of": 8,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "me"}
    r = http.post("/v1/completions", json=edge)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 8
    r = http.post("/v1/completions", json={**OK, "temperature": 2, "top_p": 1e-9, "top_k": 1,
                                           "max_tokens": 1024, "seed": 2**63 - 1,
                                           "prompt": "a" * 4096})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1024


def test_bad_requests_do_not_disturb_a_running_stream(make_server, engines, checkpoint):
    """While one client's seeded stream is decoding, others send every bad request above (and
    a few bad at the HTTP level); each gets its 4xx and the stream gets the text it gets alone."""
    gate = threading.Event()
    gate.set()
    s = make_server(engine=engines["gated"](checkpoint.model, gate))
    seeded = {**OK, "prompt": "The quick", "max_tokens": 40, "seed": 7, "top_k": 20}
    headers = {"Content-Type": "application/json"}

    def stream_text(client: httpx.Client) -> str:
        with client.stream("POST", "/v1/completions", json={**seeded, "stream": True}) as r:
            return "".join(json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                           for line in r.iter_lines() if line.startswith("data: {"))

    with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(1) as pool:
        alone = stream_text(http)
        gate.clear()  # the next decode step waits
        try:
            streamed = pool.submit(stream_text, http)
            wait_for(lambda: s.scheduler.stats()["active_sequences"] == 1)
            with httpx.Client(base_url=s.url, timeout=30) as other:
                got = [other.post("/v1/completions", content=content, headers=headers).status_code
                       for _, content, _, _ in CASES]
                got.append(other.get("/health", headers={"Host": "evil.example"}).status_code)
                got.append(other.post("/v1/completions", content=b"{}").status_code)
                got.append(other.post("/v1/tinygpt/attention", content=b"[", headers=headers)
                           .status_code)
            assert got == [c[2] for c in CASES] + [400, 415, 400]
            assert s.scheduler.stats()["active_sequences"] == 1  # still decoding meanwhile
        finally:
            gate.set()
        assert streamed.result() == alone
