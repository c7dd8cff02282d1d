"""Benchmark ``tinygpt serve`` with concurrent streaming clients.

Two modes:

* scaling (default): for each client count in ``--clients`` (default 1 and 8), that many clients
  stream completions back to back for ``--duration`` seconds; prints the aggregate tokens/s and
  its ratio to the first count's.
* ``--load``: ``--load-clients`` (default 32) clients for ``--duration`` (default 60) seconds;
  reports errors by status, time to first token (p50/p99) and the server's memory (RSS) over time.

The server runs as a separate process (``python -m tinygpt serve ... --port 0``), so the clients
do not share its interpreter. Without ``--run-dir`` the model is a GPT of the ``cpu`` preset size
(4 layers, 4 heads, 128 wide, context 64) with random weights.

    python benchmarks/bench_serve.py                       # 1 vs 8 clients, 10 s each, 3 rounds
    python benchmarks/bench_serve.py --load --duration 60  # 32 clients for a minute
    python benchmarks/bench_serve.py --max-tokens 200      # completions longer than the context
    python benchmarks/bench_serve.py -- --threads 1        # flags after -- go to tinygpt serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PROMPT = "ROMEO:"  # with the default 58 new characters, a completion fills the 64-char context


def make_random_run(root: Path) -> Path:
    """A run directory holding a randomly initialised GPT of the cpu preset's size."""
    import torch

    from tinygpt.checkpoint import save_checkpoint
    from tinygpt.models import GPT, GPTConfig
    from tinygpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(string.printable)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4,
                       n_embd=128, dropout=0.0)
    model = GPT(config)
    run = root / "bench-cpu"
    state = {"model": "gpt", "model_config": config.to_dict(), "tokenizer": tokenizer.to_dict(),
             "step": 0, "train_config": {}, "data": {}}
    save_checkpoint(run / "best", model, None, state)
    return run


class Server:
    def __init__(self, run_dir: Path, extra: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinygpt", "serve", str(run_dir), "--port", "0",
             "--model-name", "bench", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        line = self.proc.stdout.readline()
        m = re.search(r" at (http://\S+?)/?(\s|$)", line)
        if not m:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = m.group(1)

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


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int, stats: dict,
                      deadline: float) -> None:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
            "stream": True}
    t0 = time.perf_counter()
    first = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stats["stream_errors"] += 1
                    return
                n = sum(len(c["text"]) for c in event["choices"])
                now = time.perf_counter()
                if n and first is None:
                    first = now - t0
                if now <= deadline:
                    stats["tokens"] += n
    except httpx.HTTPError as e:
        stats["transport_errors"][type(e).__name__] = (
            stats["transport_errors"].get(type(e).__name__, 0) + 1)
        return
    stats["status"][200] = stats["status"].get(200, 0) + 1
    if first is not None:
        stats["ttft"].append(first)


async def run_clients(url: str, clients: int, duration: float, prompt: str, max_tokens: int,
                      server: Server | None = None) -> dict:
    stats = {"tokens": 0, "status": {}, "ttft": [], "stream_errors": 0, "transport_errors": {},
             "rss_mib": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + duration

        async def client() -> None:
            while time.perf_counter() < deadline:
                await one_request(http, prompt, max_tokens, stats, deadline)

        async def sample_memory() -> None:
            while time.perf_counter() < deadline:
                stats["rss_mib"].append((round(time.perf_counter() - start, 1), server.rss_mib()))
                await asyncio.sleep(1.0)

        tasks = [client() for _ in range(clients)]
        if server is not None:
            tasks.append(sample_memory())
        await asyncio.gather(*tasks)
        stats["elapsed"] = time.perf_counter() - start
    stats["tokens_per_s"] = stats["tokens"] / duration
    return stats


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="serve this run (default: random cpu-size GPT)")
    ap.add_argument("--clients", default="1,8", help="client counts to compare (default: 1,8)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per measurement (default: 10; 60 with --load)")
    ap.add_argument("--prompt", default=PROMPT,
                    help=f"prompt of every request (default: {PROMPT!r})")
    ap.add_argument("--max-tokens", type=int, default=58, help="per request (default: 58)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds over the client counts; medians are compared (default: 3)")
    ap.add_argument("--load", action="store_true", help="run the load test instead")
    ap.add_argument("--load-clients", type=int, default=32, help="clients in --load (default: 32)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up (default: 3)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("server_args", nargs="*", help="extra flags for tinygpt serve (after --)")
    args = ap.parse_args()
    duration = args.duration or (60.0 if args.load else 10.0)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or make_random_run(Path(tmp))
        server = Server(run_dir, args.server_args)
        try:
            print(f"server {server.url} (pid {server.proc.pid}), model {run_dir}", flush=True)
            asyncio.run(run_clients(server.url, 2, args.warmup, args.prompt, args.max_tokens))
            results: dict = {"duration_s": duration, "prompt": args.prompt,
                             "max_tokens": args.max_tokens, "server_args": args.server_args,
                             "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
            work = (args.prompt, args.max_tokens)
            if args.load:
                results["load"] = load_test(server, args.load_clients, duration, *work)
            else:
                results["scaling"] = scaling(server, args.clients, duration, *work, args.repeat)
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def scaling(server: Server, counts: str, duration: float, prompt: str, max_tokens: int,
            repeat: int) -> dict:
    """Each client count in turn, ``repeat`` rounds (interleaved, so a change in the machine's
    background load hits every count alike); the ratio compares the medians."""
    levels = [int(x) for x in counts.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    for r in range(repeat):
        for n in levels:
            s = asyncio.run(run_clients(server.url, n, duration, prompt, max_tokens))
            row = {"tokens_per_s": round(s["tokens_per_s"], 1),
                   "requests_ok": s["status"].get(200, 0),
                   "ttft_p50_ms": round(1000 * percentile(s["ttft"], 50), 1),
                   "errors": {k: v for k, v in s["status"].items() if k != 200}}
            runs[n].append(row)
            print(f"round {r + 1}: {n:>3} clients: {row['tokens_per_s']:>8.1f} tokens/s aggregate,"
                  f" {row['requests_ok']} requests, TTFT p50 {row['ttft_p50_ms']} ms", flush=True)
    medians = {n: statistics.median(x["tokens_per_s"] for x in rows) for n, rows in runs.items()}
    base = medians[levels[0]]
    for n in levels:
        print(f"median {n:>3} clients: {medians[n]:>8.1f} tokens/s, "
              f"{medians[n] / base:5.2f}x of {levels[0]} client(s)")
    return {"runs": runs, "median_tokens_per_s": medians,
            "ratio": {n: round(medians[n] / base, 2) for n in levels}}


def load_test(server: Server, clients: int, duration: float, prompt: str,
              max_tokens: int) -> dict:
    s = asyncio.run(run_clients(server.url, clients, duration, prompt, max_tokens, server))
    # memory once the batch has filled (the first seconds allocate the batch's buffers)
    settle = min(10.0, duration / 6)
    rss = [m for t, m in s["rss_mib"] if t >= settle]
    five_xx = sum(v for k, v in s["status"].items() if k >= 500)
    out = {
        "clients": clients,
        "requests": s["status"],
        "five_xx": five_xx,
        "stream_errors": s["stream_errors"],
        "transport_errors": s["transport_errors"],
        "tokens_per_s": round(s["tokens_per_s"], 1),
        "ttft_p50_ms": round(1000 * percentile(s["ttft"], 50), 1),
        "ttft_p99_ms": round(1000 * percentile(s["ttft"], 99), 1),
        "ttft_max_ms": round(1000 * max(s["ttft"], default=float("nan")), 1),
        "rss_settle_s": settle,
        "rss_mib_at_settle": round(rss[0], 1) if rss else None,
        "rss_mib_at_end": round(rss[-1], 1) if rss else None,
        "rss_mib_max": round(max(rss), 1) if rss else None,
        "rss_mib_samples": s["rss_mib"],
    }
    print(f"{clients} clients for {duration:.0f} s: responses {s['status']}, 5xx {five_xx}, "
          f"stream errors {s['stream_errors']}, transport errors {s['transport_errors']}")
    print(f"aggregate {out['tokens_per_s']} tokens/s; time to first token p50 "
          f"{out['ttft_p50_ms']} ms, p99 {out['ttft_p99_ms']} ms, max {out['ttft_max_ms']} ms")
    print(f"server RSS MiB: {out['rss_mib_at_settle']} at {settle:.0f} s, "
          f"{out['rss_mib_at_end']} at the end, max {out['rss_mib_max']}")
    return out


if __name__ == "__main__":
    main()
