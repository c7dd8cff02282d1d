"""Fixtures for the server tests: a tiny trained model and real servers on ephemeral ports.

Servers run uvicorn in a background thread, listening on 127.0.0.1 port 0; ``make_server``
builds one with any limits, API key or engine, and stops it when the test ends.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from tinygpt.checkpoint import load_checkpoint  # noqa: E402
from tinygpt.config import TrainConfig  # noqa: E402
from tinygpt.engine import Engine  # noqa: E402
from tinygpt.serve.app import LOOPBACK_NAMES, create_app  # noqa: E402
from tinygpt.serve.options import ServeLimits  # noqa: E402
from tinygpt.serve.server import bind, model_info, url_of, uvicorn_config  # noqa: E402
from tinygpt.train import train  # noqa: E402

MODEL_ID = "tiny"
CORPUS_LINES = [
    "Ça va? Naïve café, señor — déjà vu. 你好，世界。 Grüße aus Köln!",
    "The quick brown fox jumps over the lazy dog; ünïcödé ist schön.",
    "To be, or not to be: that is the question. Ω ≈ ∑ λ → ∞.",
]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread is fastest, and much faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A GPT trained for a few steps on a small multilingual text (about a second)."""
    root = tmp_path_factory.mktemp("serve_model")
    text = "\n".join(CORPUS_LINES[i % 3] + f" {i}" for i in range(120)) + "\n"
    data = root / "corpus.txt"
    data.write_text(text, encoding="utf-8")
    out = root / MODEL_ID
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYGPT_HOME", str(root / "home"))
        cfg = TrainConfig.resolve({
            "data": str(data), "out": str(out), "n_layer": 1, "n_head": 2, "n_embd": 32,
            "block_size": 16, "max_steps": 60, "eval_interval": 60, "eval_iters": 2,
            "sample_chars": 0, "lr": 1e-2, "warmup_steps": 5, "device": "cpu",
        })
        train(cfg, log=lambda _: None, progress_bar=False)
    return out


@pytest.fixture(scope="session")
def checkpoint(run_dir):
    return load_checkpoint(run_dir, device="cpu")


def wait_for(cond, timeout: float = 10.0) -> None:
    """Wait until ``cond()`` is true (the server's worker reaching a state), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class ServerThread:
    """uvicorn serving ``app`` from a background thread on 127.0.0.1, port chosen by the OS."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock).rstrip("/")
        self.port = self.sock.getsockname()[1]
        # as tinygpt serve runs it: with the connection guards (deadlines, per-client cap)
        config = uvicorn_config(app, app.state.tinygpt.limits, graceful_s=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def scheduler(self):
        return self.app.state.tinygpt.scheduler

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class GatedEngine(Engine):
    """Each decode step waits until the test opens the gate: lets a test hold the server busy."""

    def __init__(self, model, gate: threading.Event) -> None:
        super().__init__(model)
        self.gate = gate

    def step(self, states):
        self.gate.wait(20)
        return super().step(states)


class SlowEngine(Engine):
    """Every decode step takes at least ``delay`` seconds; records the batch sizes it saw."""

    def __init__(self, model, delay: float = 0.0) -> None:
        super().__init__(model)
        self.delay = delay
        self.batch_sizes: list[int] = []

    def step(self, states):
        self.batch_sizes.append(len(states))
        if self.delay:
            time.sleep(self.delay)
        return super().step(states)


@pytest.fixture(scope="session")
def engines():
    """The engine classes tests can pass to ``make_server(engine=...)``."""
    return {"gated": GatedEngine, "slow": SlowEngine}


def _build_app(checkpoint, engine=None, limits=None, api_key=None, allowed_hosts=LOOPBACK_NAMES,
               chat_assistant="assistant"):
    engine = engine or Engine(checkpoint.model)
    info = model_info(checkpoint, MODEL_ID)
    return create_app(engine, checkpoint.tokenizer, info, limits or ServeLimits(), api_key,
                      allowed_hosts, chat_assistant)


@pytest.fixture(scope="session")
def server(checkpoint):
    """One shared server with default settings."""
    with ServerThread(_build_app(checkpoint)) as s:
        yield s


@pytest.fixture
def make_server(checkpoint):
    """``make_server(engine=None, limits=None, api_key=None, allowed_hosts=...)`` -> a running
    ``ServerThread``, stopped at the end of the test."""
    started: list[ServerThread] = []

    def make(**kwargs) -> ServerThread:
        s = ServerThread(_build_app(checkpoint, **kwargs)).__enter__()
        started.append(s)
        return s

    yield make
    for s in started:
        s.__exit__(None, None, None)
