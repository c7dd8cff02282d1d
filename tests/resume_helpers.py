"""Helpers shared by the resume, checkpoint-safety and signal tests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinygpt.cli import main
from tinygpt.config import TrainConfig
from tinygpt.train import train

SRC = Path(__file__).resolve().parents[1] / "src"

# A tiny GPT of the lecture's architecture (AdamW), with dropout.
TINY = dict(
    preset="cpu", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=8, dropout=0.1,
    eval_iters=2, sample_chars=0, warmup_steps=5, device="cpu",
)


def flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def tiny_settings(data, out, **kw) -> dict:
    return {"data": str(data), "out": str(out), **TINY, "max_steps": 40, "eval_interval": 10,
            **kw}


def train_in_process(data, out, **kw):
    """The reference run, in this process, single-threaded like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.resolve(tiny_settings(data, out, **kw))
        return train(cfg, log=lambda s: None, progress_bar=False, handle_signals=False)
    finally:
        torch.set_num_threads(threads)


def main_in_process(*args) -> int:
    """``tinygpt ARGS`` in this process (cheaper than a subprocess), single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"  # same arithmetic as the in-process reference
    e.update(extra)
    return e


def run_tinygpt(*args, fault: str | None = None, timeout: float = 120):
    extra = {"TINYGPT_FAULT_AFTER": fault} if fault else {}
    return subprocess.run([sys.executable, "-m", "tinygpt", *map(str, args)], env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def start_tinygpt(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tinygpt", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until metrics.jsonl reports ``step`` or later; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(run)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("training made no progress")


def logged_steps(run: Path) -> list[int]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line)["step"])
        except ValueError:
            break
    return out


def losses(run: Path) -> list[tuple]:
    """The deterministic part of metrics.jsonl (timings differ from run to run)."""
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [tuple(json.loads(x)[k] for k in ("step", "train_loss", "val_loss", "lr", "tokens"))
            for x in lines]


def weights_digest(run: Path, which: str = "last") -> str:
    return hashlib.sha256((Path(run) / which / "model.safetensors").read_bytes()).hexdigest()


def leftovers(run: Path) -> list[str]:
    """Hidden names an interrupted save could leave behind (the lock file is permanent)."""
    return sorted(p.name for p in Path(run).rglob(".*") if p.name != ".lock")


def error_line(proc) -> str:
    """The single line a failing command prints on stderr."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.communicate(timeout=60)
