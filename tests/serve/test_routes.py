"""The routes called as an ASGI app (no socket): what each answers, read from the app's state.

``serving(app)`` runs the app's lifespan (so its scheduler's worker thread runs the tiny model)
and gives an httpx client that calls the app in-process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.serve.conftest import MODEL_ID, _build_app  # noqa: E402

from tinygpt.serve.options import ServeLimits  # noqa: E402
from tinygpt.serve.state import AppState  # noqa: E402

REQ = {"model": MODEL_ID, "prompt": "To be", "max_tokens": 5, "seed": 3}


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=30) as client:
            yield client


def run(app, scenario):
    """Run ``await scenario(client, state)`` while ``app`` serves."""
    async def main():
        async with serving(app) as client:
            return await scenario(client, app.state.tinygpt)

    return asyncio.run(main())


def test_the_model_card_comes_from_the_state(checkpoint):
    limits = ServeLimits(max_tokens=77)

    async def scenario(client, state: AppState):
        listed = (await client.get("/v1/models")).json()
        one = (await client.get(f"/v1/models/{MODEL_ID}")).json()
        missing = await client.get("/v1/models/other/name")
        return listed, one, missing

    listed, one, missing = run(_build_app(checkpoint, limits=limits), scenario)
    assert listed["object"] == "list" and listed["data"] == [one]
    assert one["id"] == MODEL_ID and one["owned_by"] == "tinygpt"
    details = one["tinygpt"]
    assert details["limits"] == dataclasses.asdict(limits)
    assert details["vocab_size"] == checkpoint.tokenizer.vocab_size
    assert "id" not in details and "created" not in details
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert missing.json()["error"]["param"] == "model"


def test_two_apps_keep_their_own_state(checkpoint):
    small = _build_app(checkpoint, limits=ServeLimits(max_tokens=3, default_max_tokens=3))
    large = _build_app(checkpoint)

    async def scenario(client, state):
        return await client.post("/v1/completions", json={**REQ, "max_tokens": 4})

    assert run(small, scenario).json()["error"]["param"] == "max_tokens"
    assert run(large, scenario).status_code == 200


def test_a_completion_and_its_stream_say_the_same(checkpoint):
    async def scenario(client, state):
        whole = await client.post("/v1/completions", json=REQ)
        streamed = await client.post("/v1/completions", json={**REQ, "stream": True})
        return whole, streamed

    whole, streamed = run(_build_app(checkpoint), scenario)
    assert whole.status_code == 200
    body = whole.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    text = body["choices"][0]["text"]
    assert len(text) == 5 and body["usage"]["completion_tokens"] == 5
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["cache-control"] == "no-cache"
    data = [line[len("data: "):] for line in streamed.text.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text  # same seed, same text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_health_tells_when_the_worker_is_gone(checkpoint):
    async def scenario(client, state: AppState):
        before = await client.get("/health")
        await asyncio.to_thread(state.scheduler.close)
        after = await client.get("/health")
        refused = await client.post("/v1/completions", json=REQ)
        return before, after, refused

    before, after, refused = run(_build_app(checkpoint), scenario)
    assert before.json() == {"status": "ok"}
    assert after.status_code == 503
    assert after.json()["status"] == "error"
    assert after.json()["error"]["code"] == "shutting_down"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"


def test_attention_answers_every_layer_and_head(checkpoint):
    async def scenario(client, state):
        return await client.post("/v1/tinygpt/attention", json={"model": MODEL_ID,
                                                                "text": "To be"})

    r = run(_build_app(checkpoint), scenario)
    assert r.status_code == 200
    out = r.json()
    config = checkpoint.model.config
    assert out["layers"] == list(range(config.n_layer))
    assert out["heads"] == list(range(config.n_head))
    assert out["tokens"] == list("To be") and out["causal"] is True
    assert [len(row) for row in out["weights"][0][0]] == [1, 2, 3, 4, 5]
    assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in out["weights"][0][0])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/tinygpt/attention"])
def test_bad_bodies_are_4xx_in_process(checkpoint, path):
    async def scenario(client, state):
        headers = {"Content-Type": "application/json"}
        return [await client.post(path, content=body, headers=headers)
                for body in (b"", b"[", rb'{"model": "tiny", "text": "\ud800", "prompt": "x"}',
                             b'{"model": "tiny", "frobnicate": 1}')]

    answers = run(_build_app(checkpoint), scenario)
    assert [r.status_code for r in answers] == [400] * 4
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in answers)
