"""``tinygpt serve`` as a user runs it: a subprocess that prints its URL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tinygpt.errors import TinyGPTError

SRC = Path(__file__).resolve().parents[2] / "src"


def start(run_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TINYGPT_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinygpt", "serve", str(run_dir), "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline()
    m = re.search(r" at (http://\S+?)/?(\s|$)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"no URL printed: {line!r} {proc.stderr.read()}")
    return proc, m.group(1)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return err


def test_serve_prints_url_and_answers(run_dir):
    proc, url = start(run_dir, "--api-key", "abc", "--max-tokens", "50", "--model-name", "m")
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
        auth = {"Authorization": "Bearer abc"}
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()
        assert models["data"][0]["id"] == "m"
        assert models["data"][0]["tinygpt"]["limits"]["max_tokens"] == 50
        req = {"model": "m", "prompt": "To be", "max_tokens": 51}
        r = httpx.post(url + "/v1/completions", json=req, headers=auth, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = httpx.post(url + "/v1/completions", json={**req, "max_tokens": 50}, headers=auth,
                       timeout=30)
        assert r.json()["usage"]["completion_tokens"] == 50
    finally:
        err = stop(proc)
    assert proc.returncode == 0, err
    assert "warning" not in err


def test_serve_quantized_to_int8(run_dir):
    proc, url = start(run_dir, "--quantize", "int8", "--model-name", "m")
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "To be", "max_tokens": 20},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 20
    finally:
        err = stop(proc)
    assert proc.returncode == 0, err


def test_serve_refuses_an_unknown_quantization(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "tinygpt", "serve", str(run_dir), "--quantize", "fp4"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--quantize: invalid choice: 'fp4'" in proc.stderr


def test_serve_warns_without_key_off_loopback(run_dir):
    proc, url = start(run_dir, "--host", "0.0.0.0")
    try:
        port = url.rsplit(":", 1)[1]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # bound to all interfaces: no Host check (a proxy or LAN name is expected here)
        r = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": "box.lan"}, timeout=10)
        assert r.status_code == 200
    finally:
        err = stop(proc)
    assert "warning: listening on 0.0.0.0 without --api-key" in err


def test_serve_allowed_host_off_loopback(run_dir):
    proc, url = start(run_dir, "--host", "0.0.0.0", "--allowed-host", "box.lan",
                      "--api-key", "k")
    try:
        port = url.rsplit(":", 1)[1]
        health = f"http://127.0.0.1:{port}/health"
        assert httpx.get(health, headers={"Host": "box.lan:80"}, timeout=10).status_code == 200
        assert httpx.get(health, timeout=10).status_code == 200  # loopback names stay allowed
        assert httpx.get(health, headers={"Host": "evil.example"}, timeout=10).status_code == 400
    finally:
        err = stop(proc)
    assert "warning" not in err


@pytest.mark.parametrize("flags, message", [
    (["--max-queue", "-1"], "--max-queue must be an integer"),
    (["--max-tokens", "0"], "--max-tokens must be an integer"),
    (["--max-body-bytes", "99999999999"], "--max-body-bytes must be an integer"),
    (["--timeout", "nan"], "--timeout must be a number"),
    (["--timeout", "0"], "--timeout must be a number"),
    (["--max-n", "40"], "--max-n (40) cannot exceed --max-batch (32)"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--api-key", ""], "--api-key must be printable ASCII"),
    (["--api-key", "two words"], "--api-key must be printable ASCII"),
    (["--threads", "-1"], "--threads must be between 0 and 1024"),
    (["--host", "no.such.host.invalid"], "cannot resolve --host"),
])
def test_serve_bad_flags(capsys, run_dir, flags, message):
    from tinygpt.cli import main

    assert main(["serve", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("tinygpt serve: error: ") and len(err.strip().splitlines()) == 1


def test_serve_missing_run_dir(capsys, tmp_path):
    from tinygpt.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_serve_port_in_use(capsys, run_dir, server):
    from tinygpt.cli import main

    assert main(["serve", str(run_dir), "--port", str(server.port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_serve_flags_are_the_fields_of_serve_options(monkeypatch, tmp_path):
    """Every field of ServeOptions (and its ServeLimits) is a flag; serve gets one ServeOptions."""
    from dataclasses import fields

    from tinygpt.cli import main
    from tinygpt.serve import server
    from tinygpt.serve.options import ServeLimits, ServeOptions

    got = []
    monkeypatch.setattr(server, "serve", got.append)
    monkeypatch.setenv("TINYGPT_API_KEY", "from-env")
    assert main(["serve", str(tmp_path), "--port", "0", "--allowed-host", "a.lan",
                 "--allowed-host", "b.lan", "--max-n", "2", "--threads", "3", "--access-log",
                 "--checkpoint", "last"]) == 0
    (options,) = got
    assert options == ServeOptions(
        run_dir=str(tmp_path), port=0, api_key="from-env", allowed_hosts=("a.lan", "b.lan"),
        threads=3, access_log=True, checkpoint="last", limits=ServeLimits(max_n=2),
    )
    assert {f.name for f in fields(ServeOptions)} - {"limits"} <= set(vars(_serve_args(tmp_path)))


def _serve_args(run_dir):
    from tinygpt.cli import build_parser

    return build_parser().parse_args(["serve", str(run_dir)])


def test_serve_options_are_checked_when_made():
    from tinygpt.serve.options import ServeOptions

    with pytest.raises(ValueError, match="--port must be between 0 and 65535"):
        ServeOptions(run_dir="r", port=-1)
    with pytest.raises(ValueError, match="--threads must be between 0 and 1024"):
        ServeOptions(run_dir="r", threads=2000)
    with pytest.raises(TinyGPTError, match="--quantize must be one of none, int8, got 'int2'"):
        ServeOptions(run_dir="r", quantize="int2")
