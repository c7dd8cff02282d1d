"""One request cannot fail another: tiny sampling settings, a failing sequence, a dead worker."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.serve.conftest import wait_for

import tinygpt.sequence as sequence_module

HONEST = {"model": "tiny", "prompt": "To be", "max_tokens": 24, "temperature": 0.9, "seed": 7}
DENORMAL = [
    {"temperature": 1e-45},
    {"temperature": 5e-324},
    {"top_p": 5e-324},
    {"temperature": 5e-324, "top_p": 5e-324, "top_k": 2},
]


def post(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/v1/completions", json={**HONEST, **fields})


@pytest.fixture
def batched(make_server, engines, checkpoint):
    """A server whose decode steps wait for a gate and record their batch sizes, and a way to
    run one honest request together with others in the same batch."""

    class Recording(engines["gated"]):
        def __init__(self, model, gate):
            super().__init__(model, gate)
            self.batch_sizes: list[int] = []

        def step(self, states):
            self.batch_sizes.append(len(states))
            return super().step(states)

    def run(others: list[dict], engine=None) -> tuple[httpx.Response, list[httpx.Response], list]:
        gate = threading.Event()
        engine = engine or Recording(checkpoint.model, gate)
        engine.gate = gate
        s = make_server(engine=engine)
        with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(8) as pool:
            try:
                honest = pool.submit(post, http)
                wait_for(lambda: s.scheduler.stats()["active_sequences"] == 1)  # stuck at the gate
                rest = [pool.submit(post, http, **o) for o in others]
                wait_for(lambda: s.scheduler.stats()["queued_requests"] == len(others))
            finally:
                gate.set()  # the next step admits them all into the honest request's batch
            out = honest.result(), [f.result() for f in rest]
            assert http.get("/health").json() == {"status": "ok"}
        return (*out, engine.batch_sizes)

    return run


@pytest.mark.parametrize("fields", DENORMAL)
def test_denormal_settings_alone_give_the_greedy_text(server, fields):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = post(http, **fields)
        greedy = post(http, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert len(r.json()["choices"][0]["text"]) == HONEST["max_tokens"]


def test_denormal_settings_beside_an_honest_request_in_one_batch(server, batched):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        alone = post(http).json()["choices"][0]["text"]
        greedy = post(http, temperature=0).json()["choices"][0]["text"]
    honest, others, batch_sizes = batched(DENORMAL)
    assert max(batch_sizes) == 1 + len(DENORMAL)  # really decoded together
    assert honest.status_code == 200
    assert honest.json()["choices"][0]["text"] == alone  # the batch changed nothing
    for r in others:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy


def test_a_sequence_whose_sampling_fails_fails_its_own_request_only(
    server, batched, monkeypatch
):
    def sample_or_fail(logits, sampling, generator=None):
        if sampling.top_k == 3:  # the request chosen to fail
            raise RuntimeError("injected sampling failure")
        return real(logits, sampling, generator)

    real = sequence_module.sample_next
    with httpx.Client(base_url=server.url, timeout=30) as http:
        alone = post(http).json()["choices"][0]["text"]
    monkeypatch.setattr(sequence_module, "sample_next", sample_or_fail)
    honest, (victim, other), batch_sizes = batched([{"top_k": 3, "n": 2}, {"top_k": 4}])
    assert max(batch_sizes) == 4
    assert honest.status_code == 200 and honest.json()["choices"][0]["text"] == alone
    assert other.status_code == 200 and len(other.json()["choices"][0]["text"]) == 24
    assert victim.status_code == 500
    assert victim.json()["error"] == {"message": "generation failed: RuntimeError",
                                      "type": "server_error", "param": None,
                                      "code": "internal_error"}


def test_a_sequence_whose_forward_pass_fails_fails_its_own_request_only(
    server, batched, engines, checkpoint
):
    poison = checkpoint.tokenizer.encode("Ω")[0]

    class Poisoned(engines["gated"]):
        """Any step holding a sequence with the poison character fails, like a bad kernel."""

        def __init__(self, model):
            super().__init__(model, threading.Event())
            self.batch_sizes: list[int] = []

        def step(self, states):
            self.batch_sizes.append(len(states))
            if any(poison in s.tokens for s in states):
                raise RuntimeError("injected forward failure")
            return super().step(states)

    with httpx.Client(base_url=server.url, timeout=30) as http:
        alone = post(http).json()["choices"][0]["text"]
        other_alone = post(http, prompt="To be, or").json()["choices"][0]["text"]
    honest, (victim, other), batch_sizes = batched(
        [{"prompt": "Ω ≈"}, {"prompt": "To be, or"}], engine=Poisoned(checkpoint.model)
    )
    assert max(batch_sizes) == 3
    assert victim.status_code == 500 and victim.json()["error"]["code"] == "internal_error"
    # the others were stepped again from their windows: exactly the text they get alone
    assert honest.status_code == 200 and honest.json()["choices"][0]["text"] == alone
    assert other.status_code == 200 and other.json()["choices"][0]["text"] == other_alone


def test_a_dead_worker_is_reported_by_health_and_requests_get_503(make_server, engines,
                                                                   checkpoint):
    gate = threading.Event()
    s = make_server(engine=engines["gated"](checkpoint.model, gate))

    def crash(active):
        raise RuntimeError("injected worker bug")

    with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        assert http.get("/health").json() == {"status": "ok"}
        try:
            waiting = pool.submit(post, http)  # stuck at the gate when the worker dies
            wait_for(lambda: s.scheduler.stats()["active_sequences"] == 1)
            s.scheduler._step = crash  # the step after this one raises outside any request
        finally:
            gate.set()
        r = waiting.result()
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "worker_failed"
        assert "restart" in r.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error"
        assert health.json()["error"]["code"] == "worker_failed"
        assert not s.scheduler.alive and s.scheduler.stats()["active_sequences"] == 0
        late = post(http)  # refused at once: it never reaches the queue
        assert late.status_code == 503 and late.json()["error"]["code"] == "worker_failed"
        assert s.scheduler.stats()["queued_requests"] == 0
