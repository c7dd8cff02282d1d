"""A bounded soak of a real ``tinygpt serve``: honest, streaming, malformed and slow clients at
once. Every honest request succeeds; the server's open file descriptors and resident memory
come back to where they were after a warm-up. ``test_soak_short`` (10 s) and
``test_soak_ten_minutes`` are in the slow set; CI runs the short one (the default suite would
exceed its time on a 2-core AVX2 machine)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
LIMITS = ["--header-timeout", "1.5", "--body-timeout", "2", "--max-client-connections", "12",
          "--threads", "1", "--model-name", "tiny"]
COMPLETION = {"model": "tiny", "prompt": "To be", "max_tokens": 6}
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
CLOSE = HEAD + b"Connection: close\r\n"
MALFORMED = [  # (request, the status it must get)
    (CLOSE + b"Content-Length: 5\r\n\r\n{oops", 400),
    (HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (HEAD + b"X-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (CLOSE + b"Content-Length: 999999999\r\n\r\n", 413),
]


class Server:
    def __init__(self, run_dir: Path, log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(SRC))
        env.pop("TINYGPT_API_KEY", None)
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinygpt", "serve", str(run_dir), "--port", "0", *LIMITS],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r":(\d+)/", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"no URL printed: {line!r}")
        self.port = int(m.group(1))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mib(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def raw(port: int, address: str, data: bytes, every: float = 0.0, line: bytes = b"") -> bytes:
    """Send ``data`` (then ``line`` every ``every`` s, if given) from ``address``; what the
    server answers before it closes the connection (at most 30 s); ``b"reset"`` when the
    connection was reset before any answer was read (what a server that closes at once while
    the client is still sending causes: ``tinygpt serve`` lingers instead, so none is allowed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    answer = b""
    try:
        writer.write(data)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), every or 30)
            except asyncio.TimeoutError:
                writer.write(line)
                continue
            if not chunk:
                break
            answer += chunk
    except OSError:
        answer = answer or b"reset"
    finally:
        writer.close()
    return answer


def status(answer: bytes) -> int | str:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(m.group(1)) if m else "reset" if answer == b"reset" else "none"


async def clients(port: int, seconds: float, tally: Counter) -> None:
    until = time.monotonic() + seconds
    url = f"http://127.0.0.1:{port}/v1/completions"
    one_shot = httpx.Limits(max_keepalive_connections=0)

    async def honest(stream: bool) -> None:
        async with httpx.AsyncClient(timeout=20, limits=one_shot) as http:
            while time.monotonic() < until:
                if stream:
                    async with http.stream("POST", url, json={**COMPLETION, "stream": True}) as r:
                        lines = [line async for line in r.aiter_lines() if line]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                    tally["stream ok" if ok else f"stream {r.status_code}"] += 1
                else:
                    r = await http.post(url, json=COMPLETION)
                    tally["honest ok" if r.status_code == 200 else f"honest {r.status_code}"] += 1

    async def malformed() -> None:
        i = 0
        while time.monotonic() < until:
            data, expected = MALFORMED[i % len(MALFORMED)]
            got = status(await raw(port, "127.0.0.3", data))
            tally["malformed ok" if got == expected else f"malformed {got} for {i % 5}"] += 1
            i += 1
            await asyncio.sleep(0.05)

    async def slow(head: bytes, line: bytes, address: str) -> None:
        while time.monotonic() < until:
            tally[f"slow {status(await raw(port, address, head, 0.25, line))}"] += 1
            await asyncio.sleep(0.25)

    body = HEAD + b"Content-Length: 1000\r\n\r\n{"
    await asyncio.gather(
        honest(False), honest(False), honest(True), malformed(),
        *(slow(HEAD, b"X-Slow: 1\r\n", "127.0.0.2") for _ in range(24)),
        *(slow(body, b" ", "127.0.0.4") for _ in range(3)),
    )


def soak(run_dir: Path, tmp_path: Path, seconds: float) -> None:
    server = Server(run_dir, tmp_path / "serve.log")
    try:
        warm = Counter()
        asyncio.run(clients(server.port, 3.0, warm))  # allocator and caches reach their level
        time.sleep(3.0)  # the last slow connections are gone
        fds, rss = server.fds(), server.rss_mib()
        tally = Counter()
        asyncio.run(clients(server.port, seconds, tally))
        time.sleep(3.0)
        fds_after, rss_after = server.fds(), server.rss_mib()
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    print(f"soak {seconds:g} s: {dict(tally)}; fds {fds} -> {fds_after}; "
          f"RSS {rss:.1f} -> {rss_after:.1f} MiB")
    bad = {k: v for k, v in tally.items() if not (k.endswith(" ok") or k.startswith("slow"))}
    assert not bad, bad
    assert tally["honest ok"] > 10 and tally["stream ok"] > 3 and tally["malformed ok"] > 10
    # every slow connection reads its answer: none is reset, none closed without one
    assert set(k for k in tally if k.startswith("slow")) <= {"slow 408", "slow 429"}, dict(tally)
    assert tally["slow 408"] and tally["slow 429"]
    assert fds_after <= fds + 2
    assert rss_after <= rss + max(40.0, 0.1 * rss)
    assert "Traceback" not in log
    assert "connections closed:" in log  # the guards' tally reached the log


@pytest.mark.slow  # 10-30 s on a 2-core AVX2 machine
def test_soak_short(run_dir, tmp_path):
    soak(run_dir, tmp_path, 10.0)


@pytest.mark.slow
def test_soak_ten_minutes(run_dir, tmp_path):
    soak(run_dir, tmp_path, 600.0)
