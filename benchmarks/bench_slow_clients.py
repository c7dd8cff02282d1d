"""How ``tinygpt serve`` holds against slow clients (everything on loopback).

For ``--duration`` seconds (default 40):

* ``--slow`` connections (default 1000) from 127.0.0.2 send a request line, then one header line
  every ``--interval`` seconds (default 2) and never finish; when the server closes one, it waits
  an interval and connects again;
* ``--bodies`` connections (default 5) from 127.0.0.3 send full headers, then their body one byte
  per interval (and also reconnect when closed);
* ``--honest`` clients (default 4) from 127.0.0.1 send short ``/v1/completions`` requests back to
  back, each on a new connection, with a 10 s client timeout.

Prints the honest requests' success rate, statuses and p50/p99 latency; how long the trickling
connections lived (refused at once, closed by the server, still open at the end) and what the
server answered them; and the server's open file descriptors and resident memory before, at the
peak and a few seconds after the slow clients are gone.

    python benchmarks/bench_slow_clients.py
    python benchmarks/bench_slow_clients.py --slow 300 --duration 130
    python benchmarks/bench_slow_clients.py --src /path/to/other/src   # another tinygpt's code
    python benchmarks/bench_slow_clients.py -- --header-timeout 5     # flags for tinygpt serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import make_random_run  # noqa: E402

SLOW_ADDRESS = "127.0.0.2"
BODY_ADDRESS = "127.0.0.3"
HONEST_ADDRESS = "127.0.0.1"


class Server:
    """``tinygpt serve`` in its own process; its log goes to a file (it may be long)."""

    def __init__(self, run_dir: Path, src: Path, extra: list[str], log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(src))
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinygpt", "serve", str(run_dir), "--port", "0",
             "--model-name", "bench", "--threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        line = self.proc.stdout.readline()
        m = re.search(r":(\d+)/", line)
        if not m:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line!r} (log: {log})")
        self.port = int(m.group(1))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Trickles:
    """What happened to one kind of trickling connection."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, float]] = []  # (the server's status line, seconds lived)
        self.open_at_end: list[float] = []  # seconds lived
        self.failed_connects = 0

    def summary(self) -> dict:
        by_answer: dict[str, list[float]] = {}
        for answer, life in self.closed:
            by_answer.setdefault(answer, []).append(life)
        return {
            "connections": len(self.closed) + len(self.open_at_end),
            "closed_by_server": {
                answer: {"count": len(lives), "life_median_s": round(percentile(lives, 50), 2),
                         "life_max_s": round(max(lives), 2)}
                for answer, lives in sorted(by_answer.items())},
            "open_at_end": len(self.open_at_end),
            "open_at_end_age_max_s": round(max(self.open_at_end, default=float("nan")), 1),
            "failed_connects": self.failed_connects,
        }


async def trickle(port: int, address: str, head: bytes, line: bytes, interval: float,
                  until: float, stats: Trickles) -> None:
    """Connect, send ``head``, then ``line`` every ``interval`` s until the server closes the
    connection; then wait an interval and connect again, until ``until``."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0))
        except OSError:
            stats.failed_connects += 1
            await asyncio.sleep(interval)
            continue
        start = time.monotonic()
        answer = b""
        try:
            writer.write(head)
            while time.monotonic() < until:
                try:
                    data = await asyncio.wait_for(reader.read(4096), interval)
                except asyncio.TimeoutError:
                    writer.write(line)
                    await writer.drain()
                    continue
                if not data:
                    break
                answer += data
            else:
                stats.open_at_end.append(time.monotonic() - start)
                writer.close()
                return
        except OSError:  # reset by the server
            pass
        status = answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else "no answer"
        stats.closed.append((status, time.monotonic() - start))
        writer.close()
        await asyncio.sleep(interval)


async def honest(port: int, until: float, latencies: list[float], statuses: Counter) -> None:
    """Short completions back to back, each on a new connection from 127.0.0.1."""
    import httpx

    body = {"model": "bench", "prompt": "ROMEO:", "max_tokens": 8}
    transport = httpx.AsyncHTTPTransport(local_address=HONEST_ADDRESS)
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(transport=transport, limits=limits, timeout=10.0) as http:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                r = await http.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
                statuses[r.status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
                await asyncio.sleep(0.1)
            latencies.append(time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def attack(server: Server, args) -> dict:
    port, interval = server.port, args.interval
    until = time.monotonic() + args.duration
    heads, bodies = Trickles(), Trickles()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    body_head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    slow = [asyncio.create_task(trickle(port, SLOW_ADDRESS, head, b"X-Slow: 1\r\n", interval, until, heads))
            for _ in range(args.slow)]
    slow += [asyncio.create_task(trickle(port, BODY_ADDRESS, body_head, b" ", interval, until, bodies))
             for _ in range(args.bodies)]
    await asyncio.sleep(min(3.0, args.duration / 4))  # let them connect
    peak = {"fds": server.fds(), "rss_mib": server.rss_mib()}
    latencies: list[float] = []
    statuses: Counter = Counter()
    await asyncio.gather(*(honest(port, until, latencies, statuses) for _ in range(args.honest)))
    peak = {"fds": max(peak["fds"], server.fds()), "rss_mib": max(peak["rss_mib"], server.rss_mib())}
    await asyncio.gather(*slow)
    ok = statuses.get(200, 0)
    total = sum(statuses.values())
    return {
        "honest": {"requests": total, "ok": ok, "success_rate": round(ok / max(total, 1), 4),
                   "statuses": {str(k): v for k, v in statuses.items()},
                   "p50_s": round(percentile(latencies, 50), 3),
                   "p99_s": round(percentile(latencies, 99), 3)},
        "trickled_headers": heads.summary(),
        "trickled_bodies": bodies.summary(),
        "peak": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slow", type=int, default=1000, help="trickling header connections")
    p.add_argument("--bodies", type=int, default=5, help="trickling body connections")
    p.add_argument("--honest", type=int, default=4, help="honest clients")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of attack")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between trickled lines")
    p.add_argument("--src", type=Path, default=REPO / "src", help="the tinygpt source to serve")
    p.add_argument("--run-dir", type=Path, help="a run to serve (default: a random cpu-size GPT)")
    p.add_argument("server_args", nargs="*", help="flags for tinygpt serve (after --)")
    args = p.parse_args()
    if not (1 <= args.duration <= 600 and 0 <= args.slow <= 5000 and 0 <= args.bodies <= 100):
        p.error("keep it bounded: --duration in [1, 600], --slow <= 5000, --bodies <= 100")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or make_random_run(Path(tmp))
        server = Server(run_dir, args.src.resolve(), args.server_args, Path(tmp) / "serve.log")
        try:
            before = {"fds": server.fds(), "rss_mib": round(server.rss_mib(), 1)}
            result = asyncio.run(attack(server, args))
            time.sleep(3.0)
            result["before"] = before
            result["after"] = {"fds": server.fds(), "rss_mib": round(server.rss_mib(), 1)}
        finally:
            server.stop()
            log = (Path(tmp) / "serve.log").read_text(errors="replace").splitlines()
        result["server_log_lines"] = len(log)
        result["server_log_sample"] = [line for line in log if "tinygpt" in line][-3:] or log[-3:]
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("src", "run_dir")}
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
