"""Shared fixtures. Tests are hermetic: no network, and TINYGPT_HOME points into a temp dir.

Bitwise comparisons depend on the thread count (it changes how sums are split): tests that compare
across processes pin it in every process (``one_thread`` here, ``OMP_NUM_THREADS=1`` there).
``TINYGPT_TEST_THREADS=N`` runs the whole suite, and the processes it starts, with N threads
(``python -m pytest -n 0`` runs it in one process instead of one worker per CPU).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def pytest_configure(config) -> None:
    threads = os.environ.get("TINYGPT_TEST_THREADS") or worker_threads()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = threads


def worker_threads() -> str | None:
    """Under pytest-xdist the workers share the CPUs: each gets its share of threads. On two
    cores limited to AVX2, the suite took 4:54 in one process with two threads, 4:19 in two
    workers with two threads each (oversubscribed), 3:09-3:14 in two workers with one each."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return None
    from tinygpt.device import usable_cpus

    return str(max(1, usable_cpus() // int(workers)))


@contextlib.contextmanager
def one_thread():
    """Run the block with one torch thread (as subprocesses started with OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def find_shakespeare() -> Path | None:
    """Tiny Shakespeare from $TINYGPT_TEST_SHAKESPEARE or the shared data folder beside the repo."""
    env = os.environ.get("TINYGPT_TEST_SHAKESPEARE")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data" / "tinyshakespeare.txt"]
    return next((p for p in candidates if p.is_file()), None)


@pytest.fixture(autouse=True)
def tinygpt_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty TINYGPT_HOME (datasets + token caches)."""
    home = tmp_path_factory.mktemp("tinygpt_home")
    monkeypatch.setenv("TINYGPT_HOME", str(home))
    return home


@pytest.fixture
def shakespeare(tinygpt_home) -> Path:
    """Installs Tiny Shakespeare into the test's TINYGPT_HOME, as a user (or CI) would."""
    src = find_shakespeare()
    if src is None:
        pytest.skip("Tiny Shakespeare not found; set TINYGPT_TEST_SHAKESPEARE=/path/to/input.txt")
    dest = tinygpt_home / "datasets" / "tinyshakespeare.txt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def run_cli(
    *args: str, timeout: float = 300, check: bool = False, **kw
) -> subprocess.CompletedProcess:
    """Run ``python -m tinygpt ARGS`` in a fresh process (this checkout's source first)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(kw.pop("env", {}))
    proc = subprocess.run(
        [sys.executable, "-m", "tinygpt", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tinygpt {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def small_text(tmp_path) -> Path:
    """A few KB of text with non-ASCII characters, written by the test itself."""
    lines = [
        "Ça va? Naïve café, señor — déjà vu. 你好，世界。 Grüße aus Köln!",
        "The quick brown fox jumps over the lazy dog; ünïcödé ist schön.",
        "To be, or not to be: that is the question. Ω ≈ ∑ λ → ∞.",
    ]
    text = "\n".join(lines[i % 3] + f" {i}" for i in range(120)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path
