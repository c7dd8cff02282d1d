"""Limits and security defaults: bounded queue, time limit, Host header, API key, batching.

The tests count steps and watch the scheduler's state instead of measuring seconds: ``Stepper``
runs a decode step only when the test allows it, ``ClockedEngine`` moves a fake clock on by one
second per step.
"""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.serve.conftest import wait_for

from tinygpt.engine import Engine
from tinygpt.serve.options import ServeLimits

REQ = {"model": "tiny", "prompt": "To be", "max_tokens": 4}


class Stepper(Engine):
    """Each decode step waits for a permit from the test (``allow``); records the batch sizes.
    ``calls > len(batch_sizes)`` means the worker is waiting inside a step."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.cv = threading.Condition()
        self.budget = 0
        self.calls = 0
        self.batch_sizes: list[int] = []

    def allow(self, n: int = 10**9) -> None:
        with self.cv:
            self.budget += n
            self.cv.notify_all()

    def hold(self) -> None:
        with self.cv:
            self.budget = 0

    def waiting(self) -> bool:
        with self.cv:
            return self.calls > len(self.batch_sizes)

    def step(self, states):
        with self.cv:
            self.calls += 1
            assert self.cv.wait_for(lambda: self.budget > 0, timeout=20)
            self.budget -= 1
            self.batch_sizes.append(len(states))
        return super().step(states)


class ClockedEngine(Engine):
    """Every decode step moves ``now`` on by one second: the scheduler's clock in a test."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def step(self, states):
        self.now += 1
        return super().step(states)


def test_queue_full_gives_429_with_retry_after(make_server, engines, checkpoint):
    gate = threading.Event()
    s = make_server(engine=engines["gated"](checkpoint.model, gate),
                    limits=ServeLimits(max_batch=1, max_n=1, max_queue=1))
    with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(http.post, "/v1/completions", json=REQ)
            wait_for(lambda: s.scheduler.stats()["active_sequences"] == 1)  # decoding, stuck
            second = pool.submit(http.post, "/v1/completions", json=REQ)
            wait_for(lambda: s.scheduler.stats()["queued_requests"] == 1)  # waiting its turn
            r = http.post("/v1/completions", json=REQ)
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
            # the event loop is not blocked by the stuck decode step: the server answers while
            # the step still waits at the gate
            assert http.get("/health").json() == {"status": "ok"}
            assert s.scheduler.stats() == {"active_sequences": 1, "queued_requests": 1,
                                           "steps": 0, "tokens": 0}
        finally:
            gate.set()
        assert first.result().status_code == 200
        assert second.result().status_code == 200
        assert http.post("/v1/completions", json=REQ).status_code == 200


def test_time_limit_cuts_the_output(make_server, checkpoint):
    engine = ClockedEngine(checkpoint.model)
    s = make_server(engine=engine, limits=ServeLimits(timeout=5.0))
    s.scheduler.clock = engine.clock  # one second per decode step
    with httpx.Client(base_url=s.url, timeout=30) as http:
        r = http.post("/v1/completions", json={**REQ, "max_tokens": 1000})
        assert r.status_code == 200
        out = r.json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 5  # five steps in five seconds
        assert len(out["choices"][0]["text"]) == 5
        assert s.scheduler.stats()["steps"] == 5

        with http.stream("POST", "/v1/completions",
                         json={**REQ, "max_tokens": 1000, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(c["choices"][0]["text"] for c in chunks)) == 5
        assert s.scheduler.stats()["steps"] == 10


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1", True),
    ("127.0.0.1:1234", True), ("[::1]", True), ("[::1]:8000", True), ("LOCALHOST:80", True),
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
    ("127.0.0.2", False), ("", False), ("10.0.0.1:8000", False),
])
def test_host_header_checked_on_loopback(server, host, ok):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path in ("/health", "/v1/models", "/"):
            r = http.get(path, headers={"Host": host})
            assert (r.status_code == 200) is ok, (path, r.status_code)
            if not ok:
                assert r.status_code == 400
                assert r.json()["error"]["code"] == "invalid_host"
        r = http.post("/v1/completions", json=REQ, headers={"Host": host})
        assert (r.status_code == 200) is ok


def test_allowed_hosts_extend_and_none_disables(make_server):
    s = make_server(allowed_hosts=["localhost", "127.0.0.1", "[::1]", "my.box"])
    assert httpx.get(s.url + "/health", headers={"Host": "my.box:80"}).status_code == 200
    assert httpx.get(s.url + "/health", headers={"Host": "other.box"}).status_code == 400
    open_server = make_server(allowed_hosts=None)
    assert httpx.get(open_server.url + "/health", headers={"Host": "any.where"}).status_code == 200


def test_api_key_required_everywhere_but_health(make_server):
    key = "k-" + "x" * 30
    s = make_server(api_key=key)
    routes = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/style.css"),
              ("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/completions"),
              ("GET", "/no/such/route")]
    with httpx.Client(base_url=s.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
        for wrong in (None, "Bearer wrong", "Bearer " + key[:-1], "Bearer " + key + "x",
                      "Basic " + base64.b64encode(b"user:wrong").decode(), "Token " + key,
                      "Bearer", "Basic !!!"):
            headers = {"Authorization": wrong} if wrong else {}
            for method, path in routes:
                r = http.request(method, path, json=REQ if method == "POST" else None,
                                 headers=headers)
                assert r.status_code == 401, (wrong, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert "Basic" in r.headers["WWW-Authenticate"]
        good = {"Authorization": "Bearer " + key}
        for method, path in routes[:-1]:
            r = http.request(method, path, json=REQ if method == "POST" else None, headers=good)
            assert r.status_code == 200, path
        assert http.get("/no/such/route", headers=good).status_code == 404
        # a browser logs in with HTTP Basic: any user name, the key as password
        basic = {"Authorization": "Basic " + base64.b64encode(f"me:{key}".encode()).decode()}
        assert http.get("/", headers=basic).status_code == 200
        assert http.post("/v1/completions", json=REQ, headers=basic).status_code == 200


def test_key_check_uses_compare_digest(monkeypatch, make_server):
    import hmac

    from tinygpt.serve import guard as app_module

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    s = make_server(api_key="abc")
    r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer abd"})
    assert r.status_code == 401
    assert calls == [(b"abd", b"abc")]


def test_page_security_headers(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in r.headers  # no CORS: other sites cannot read
    js = httpx.get(server.url + "/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js


def test_continuous_batching(make_server, checkpoint):
    """A request that arrives later joins the running batch and leaves it when done."""
    engine = Stepper(checkpoint.model)
    s = make_server(engine=engine)
    with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        long = pool.submit(http.post, "/v1/completions", json={**REQ, "max_tokens": 120})
        engine.allow(10)
        wait_for(lambda: len(engine.batch_sizes) == 10 and engine.waiting())  # in step 11
        short = pool.submit(http.post, "/v1/completions", json={**REQ, "max_tokens": 10})
        wait_for(lambda: s.scheduler.stats()["queued_requests"] == 1)
        engine.allow()
        assert short.result().status_code == 200
        assert long.result().status_code == 200
    # alone for 11 steps, together for the short request's 10, then alone again
    assert engine.batch_sizes == [1] * 11 + [2] * 10 + [1] * 99
    assert s.scheduler.stats()["tokens"] == 130


def test_seeded_text_does_not_depend_on_the_batch(make_server, checkpoint):
    engine = Stepper(checkpoint.model)
    s = make_server(engine=engine)
    seeded = {**REQ, "prompt": "The quick", "max_tokens": 40, "seed": 99, "top_k": 20}
    with httpx.Client(base_url=s.url, timeout=30) as http, ThreadPoolExecutor(6) as pool:
        engine.allow()
        alone = http.post("/v1/completions", json=seeded).json()["choices"][0]["text"]
        engine.hold()
        first = pool.submit(http.post, "/v1/completions", json={**REQ, "max_tokens": 60})
        wait_for(engine.waiting)  # the first noise request is in a step
        noise = [pool.submit(http.post, "/v1/completions", json={**REQ, "max_tokens": 60})
                 for _ in range(3)]
        crowded = pool.submit(http.post, "/v1/completions", json=seeded)
        wait_for(lambda: s.scheduler.stats()["queued_requests"] == 4)
        engine.allow()  # the next step admits all four into the first one's batch
        assert crowded.result().json()["choices"][0]["text"] == alone
        assert all(f.result().status_code == 200 for f in [first, *noise])
    assert max(engine.batch_sizes) == 5


def test_client_disconnect_frees_the_batch(make_server, engines, checkpoint):
    engine = engines["slow"](checkpoint.model, delay=0.01)
    s = make_server(engine=engine)
    with httpx.Client(base_url=s.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions",
                         json={**REQ, "max_tokens": 1000, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # got the first token; hang up
        wait_for(lambda: s.scheduler.stats()["active_sequences"] == 0, timeout=5)
        steps = len(engine.batch_sizes)
        assert steps < 500
        # a non-streaming request whose client goes away is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**REQ, "max_tokens": 1000}, timeout=0.3)
        wait_for(lambda: s.scheduler.stats()["active_sequences"] == 0, timeout=5)
        assert len(engine.batch_sizes) - steps < 500
