"""``POST /v1/tinygpt/attention``: the attention weights of a text, per layer and head."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tests.serve.test_serve_bpe import bpe_checkpoint  # noqa: F401 - a fixture used below

from tinygpt.engine import Engine
from tinygpt.models.attention_maps import attention_maps
from tinygpt.models.bigram import BigramConfig, BigramLM
from tinygpt.serve.options import ServeLimits

TEXT = "To be, or not to"  # 16 characters: the whole context of the test model


def post(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/v1/tinygpt/attention", json={"model": "tiny", "text": TEXT, **fields})


def check_error(r: httpx.Response, status: int, param: str | None, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"] and "\n" not in err["message"]
    if code:
        assert err["code"] == code


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_weights_of_every_layer_and_head_equal_the_recomputed_maps(http, checkpoint):
    r = post(http)
    assert r.status_code == 200, r.text
    out = r.json()
    cfg = checkpoint.model.config
    assert out["object"] == "tinygpt.attention" and out["model"] == "tiny"
    assert out["tokens"] == list(TEXT) and out["causal"] is True
    assert out["layers"] == list(range(cfg.n_layer)) and out["heads"] == list(range(cfg.n_head))
    ids = torch.tensor(checkpoint.tokenizer.encode(TEXT))
    maps = attention_maps(checkpoint.model, ids)  # (L, H, T, T)
    for li, layer in enumerate(out["weights"]):
        for hi, head in enumerate(layer):
            assert [len(row) for row in head] == list(range(1, len(TEXT) + 1))  # lower triangle
            for q, row in enumerate(head):
                assert row == pytest.approx(maps[li, hi, q, : q + 1].tolist(), abs=1e-4)
                assert sum(row) == pytest.approx(1.0, abs=1e-3)
                assert all(round(w, 4) == w for w in row)  # rounded: compact


def test_one_layer_and_head(http, checkpoint):
    full = post(http).json()
    one = post(http, layer=0, head=1).json()
    assert one["layers"] == [0] and one["heads"] == [1]
    assert one["weights"] == [[full["weights"][0][1]]]
    assert len(post(http, head=0).json()["weights"][0]) == 1


def test_the_route_is_answered_between_two_decode_steps(make_server, engines, checkpoint):
    engine = engines["slow"](checkpoint.model, delay=0.01)
    s = make_server(engine=engine)
    with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(1) as pool:
        long = pool.submit(http.post, "/v1/completions",
                           json={"model": "tiny", "prompt": "To", "max_tokens": 300})
        deadline = time.monotonic() + 10
        while s.scheduler.stats()["active_sequences"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        r = post(http, layer=0)
        assert r.status_code == 200
        assert s.scheduler.stats()["active_sequences"] == 1  # the completion is still decoding
        assert long.result().status_code == 200


@pytest.mark.parametrize("fields, status, param, code", [
    ({"text": TEXT + "x"}, 400, "text", "context_length_exceeded"),
    ({"text": ""}, 400, "text", None),
    ({"text": "To ☃"}, 400, "text", "unknown_characters"),
    ({"text": ["To"]}, 400, "text", "invalid_type"),
    ({"layer": 1}, 400, "layer", None),
    ({"layer": -1}, 400, "layer", None),
    ({"head": 2}, 400, "head", None),
    ({"head": "0"}, 400, "head", "invalid_type"),
    ({"head": 1.0}, 400, "head", "invalid_type"),
    ({"layer": 10**40}, 400, "layer", None),
    ({"model": "other"}, 404, "model", "model_not_found"),
    ({"logprobs": 5}, 400, "logprobs", "unknown_parameter"),
])
def test_bad_requests(http, fields, status, param, code):
    check_error(post(http, **fields), status, param, code)
    assert post(http, layer=0, head=0).status_code == 200  # still answering


def test_malformed_bodies(http):
    url = "/v1/tinygpt/attention"
    check_error(http.post(url, content=b"{", headers={"Content-Type": "application/json"}),
                400, None, "invalid_json")
    check_error(http.post(url, content=b"{}", headers={"Content-Type": "text/plain"}), 415, None)
    check_error(http.post(url, json={"model": "tiny"}), 400, "text",
                "missing_required_parameter")
    check_error(http.get(url), 405, None)


def test_api_key_and_body_limit(make_server):
    s = make_server(api_key="k3y", limits=ServeLimits(max_body_bytes=100))
    with httpx.Client(base_url=s.url, timeout=30) as http:
        check_error(post(http), 401, None, "invalid_api_key")
        ok = http.post("/v1/tinygpt/attention", json={"model": "tiny", "text": TEXT},
                       headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200
        big = http.post("/v1/tinygpt/attention", json={"model": "tiny", "text": "T" * 200},
                        headers={"Authorization": "Bearer k3y"})
        check_error(big, 413, None, "request_too_large")


def test_a_bigram_model_has_no_attention(checkpoint):
    from tests.serve.conftest import ServerThread

    from tinygpt.serve.app import create_app
    from tinygpt.serve.server import model_info

    model = BigramLM(BigramConfig(vocab_size=checkpoint.tokenizer.vocab_size))
    info = dataclasses.replace(model_info(checkpoint, "tiny"), kind="bigram", block_size=1)
    with ServerThread(create_app(Engine(model), checkpoint.tokenizer, info)) as s:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            check_error(post(http, text="T"), 400, "model", "no_attention")


def test_a_bpe_model_reports_its_tokens(bpe_checkpoint):  # noqa: F811 - the fixture
    """With byte-level BPE the axes are tokens (an emoji's byte pieces escaped) and the context
    is counted in tokens."""
    from tests.serve.conftest import ServerThread, _build_app

    from tinygpt.checkpoint import Checkpoint
    from tinygpt.models import GPT, GPTConfig

    tok = bpe_checkpoint.tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    state = {"model": "gpt", "model_config": dataclasses.asdict(model.config), "step": 0}
    gpt = Checkpoint(bpe_checkpoint.path, state, model, tok)
    with ServerThread(_build_app(gpt)) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        out = post(http, text="x🎉y").json()
        ids = tok.encode("x🎉y")
        assert out["tokens"] == [tok.token_text(i) for i in ids] and len(ids) == 5
        assert out["tokens"][1].startswith("\\x")
        assert [len(row) for row in out["weights"][0][0]] == [1, 2, 3, 4, 5]
        expected = attention_maps(model, torch.tensor(ids))
        assert out["weights"][0][1][4] == pytest.approx(expected[0, 1, 4].tolist(), abs=1e-4)
        long = "x🎉y🎉x🎉"  # 6 characters, more tokens than the context of 8
        assert len(tok.encode(long)) > 8
        r = post(http, text=long)
        check_error(r, 400, "text", "context_length_exceeded")
        assert f"{len(tok.encode(long))} tokens" in r.json()["error"]["message"]
