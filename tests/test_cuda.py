"""The CUDA path: bf16 autocast, float16 with its gradient scaler (a T4-like GPU), torch.compile,
exact resume, the KV cache, NCCL data parallelism.

Marked ``cuda`` (left out of the default run): ``python -m pytest -m cuda -n 0`` on a machine
with a GPU (one process: the tests take the GPUs in turn), or ``benchmarks/gpu_check.sh``. Every
test needs a GPU; the NCCL test needs two.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tinygpt.checkpoint import load_checkpoint
from tinygpt.generate import SamplingConfig
from tinygpt.sequence import generate_text

from .resume_helpers import env, flags, losses, main_in_process, tiny_settings, weights_digest

pytestmark = pytest.mark.cuda

GPU = dict(device="cuda", dropout=0.0, max_steps=30, eval_interval=10, dtype="bfloat16")


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a CUDA GPU (run them with -m cuda on a GPU machine)")


def test_bf16_compiled_training_learns_and_keeps_float32_weights(small_text, tmp_path):
    run = tmp_path / "run"
    assert main_in_process("train", *flags(tiny_settings(small_text, run, **GPU)), "--compile") == 0
    curve = losses(run)
    assert curve[-1][2] < curve[0][2] - 0.5  # val loss fell
    ckpt = load_checkpoint(run)
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())


def test_a_killed_cuda_run_resumes_bitwise(small_text, tmp_path):
    ref = tmp_path / "ref"
    assert main_in_process("train", *flags(tiny_settings(small_text, ref, **GPU))) == 0
    run = tmp_path / "run"
    args = flags(tiny_settings(small_text, run, **GPU))
    proc = subprocess.run([sys.executable, "-m", "tinygpt", "train", *args],
                          env=env(TINYGPT_FAULT_AFTER="step@17"), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert main_in_process("train", "--resume", run) == 0
    assert weights_digest(run) == weights_digest(ref)


def test_a_t4_like_gpu_trains_in_float16_and_resumes_bitwise(small_text, tmp_path, monkeypatch,
                                                             capsys):
    """A T4 (compute capability 7.5: float16 tensor cores, no bf16) is where ``--dtype auto``
    picks float16. Any newer GPU plays one here: ``TINYGPT_NATIVE_BF16=0`` says it has no bf16.
    The run learns with float32 weights, logs its loss scale and skipped steps, and a killed run
    resumes bitwise (the scaler's state comes back from the checkpoint)."""
    monkeypatch.setenv("TINYGPT_NATIVE_BF16", "0")
    kw = {**GPU, "dtype": "auto"}
    ref = tmp_path / "ref"
    assert main_in_process("train", *flags(tiny_settings(small_text, ref, **kw))) == 0
    assert "mixed precision: float16 matrix products" in capsys.readouterr().out
    lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] - 0.5
    assert lines[-1]["loss_scale"] > 0 and lines[-1]["skipped_steps"] >= 0
    assert all(p.dtype == torch.float32 for p in load_checkpoint(ref).model.parameters())

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tinygpt", "train",
                           *flags(tiny_settings(small_text, run, **kw))],
                          env=env(TINYGPT_FAULT_AFTER="step@17", TINYGPT_NATIVE_BF16="0"),
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert main_in_process("train", "--resume", run) == 0
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)


def test_cached_generation_on_the_gpu_matches_the_uncached_loop(small_text, tmp_path):
    run = tmp_path / "run"
    assert main_in_process("train", *flags(tiny_settings(small_text, run, **GPU))) == 0
    ckpt = load_checkpoint(run, device="cuda")
    greedy = SamplingConfig(0.0)
    fast = generate_text(ckpt.model, ckpt.tokenizer, "The", 60, greedy, use_cache=True)
    slow = generate_text(ckpt.model, ckpt.tokenizer, "The", 60, greedy, use_cache=False)
    assert fast == slow


def test_nccl_data_parallel_on_two_gpus(small_text, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tinygpt", "launch", "--standalone",
                           "--nproc-per-node", "2", "train",
                           *flags(tiny_settings(small_text, run, **{**GPU, "batch_size": 16}))],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert losses(run)[-1][2] < losses(run)[0][2]
