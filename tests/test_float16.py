"""float16 mixed precision: the dtype choice, the gradient scaler, skipped steps, exact resume.

These run the float16 path on the CPU (autocast and GradScaler work there), on tiny models: on a
CPU without float16 hardware its products are emulated, so float16 there is for correctness
tests only -- ``--dtype auto`` never picks it on a CPU. The CUDA case (a T4-like GPU) is in
``tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import tinygpt.runs as runs
import tinygpt.train as train_module
from tinygpt.checkpoint import CheckpointError, check_grad_scaler
from tinygpt.config import TrainConfig
from tinygpt.device import autocast_dtype
from tinygpt.errors import TinyGPTError
from tinygpt.runs import build_run
from tinygpt.train import LoopState, progress_postfix, train, training_step

from .conftest import one_thread
from .resume_helpers import env, flags, losses, main_in_process, tiny_settings, weights_digest

QUIET = dict(log=lambda s: None, progress_bar=False, handle_signals=False)
# The modern recipe (Muon for the block matrices, AdamW for the rest) at a tiny size.
TINY_MODERN = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=8, eval_iters=2,
                   sample_chars=0, warmup_steps=5, device="cpu", dropout=0.0)


def records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def cfg_for(data, out, **kw) -> TrainConfig:
    return TrainConfig.resolve({"data": str(data), "out": str(out), **TINY_MODERN, **kw})


# ------------------------------------------------------------------------------ the dtype choice


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), torch.bfloat16),  # Hopper, Ampere: bf16 is native
    ((8, 0), torch.bfloat16),
    ((7, 5), torch.float16),  # T4, RTX 20 series: tensor cores, no bf16
    ((7, 0), torch.float16),  # V100
    ((6, 1), None),  # GTX 10 series: float16 is slow there, float32 it is
])
def test_auto_picks_float16_on_cuda_gpus_without_bf16(monkeypatch, capability, expected):
    monkeypatch.delenv("TINYGPT_NATIVE_BF16", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert autocast_dtype("auto", torch.device("cuda:0")) == expected
    assert autocast_dtype("float16", torch.device("cuda:0")) is torch.float16  # asked: obeyed


@pytest.mark.parametrize("native", ["0", "1"])
def test_auto_never_picks_float16_on_a_cpu(monkeypatch, native):
    monkeypatch.setenv("TINYGPT_NATIVE_BF16", native)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native == "1" else None)
    assert autocast_dtype("float16", cpu) is torch.float16  # for tests like these


def test_float16_is_a_dtype_setting_and_the_scaler_only_runs_with_it(small_text, tmp_path):
    assert TrainConfig.resolve({"dtype": "float16"}).run.dtype == "float16"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        TrainConfig.resolve({"dtype": "float8"})
    for dtype, enabled in (("float16", True), ("bfloat16", False), ("float32", False)):
        run = build_run(cfg_for(small_text, tmp_path / dtype, dtype=dtype), None, print)
        assert run.scaler.is_enabled() is enabled
        assert ("skipped" in progress_postfix(run, LoopState(), 1.0)) is enabled


# --------------------------------------------------------------------------------- the scaler


def test_the_update_sees_unscaled_float32_gradients(small_text, tmp_path):
    """After a float16 step every gradient is float32 and close to the float32 run's: the scaler
    multiplied the loss by 65536 for the backward pass and divided the gradients back before the
    clip and the update. float16 keeps 11 significant bits (rounding ~5e-4 per product), so
    the gradients agree to about 1%; left scaled they would be 65536 times too large."""
    grads = {}
    with one_thread():
        for dtype in ("float32", "float16"):
            run = build_run(cfg_for(small_text, tmp_path / dtype, dtype=dtype, grad_clip=0.0),
                            None, print)
            training_step(run, LoopState())
            grads[dtype] = [p.grad for p in run.model.parameters() if p.grad is not None]
            assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert {g.dtype for g in grads["float16"]} == {torch.float32}
    norm32 = torch.cat([g.flatten() for g in grads["float32"]])
    norm16 = torch.cat([g.flatten() for g in grads["float16"]])
    assert norm32.norm() > 0
    assert (norm16 - norm32).norm() / norm32.norm() < 0.02


def test_a_float16_loss_curve_follows_float32(small_text, tmp_path):
    """Same seed, same batches, the modern recipe (Muon and AdamW behind the scaler).

    The runs differ only by float16's rounding in the forward and backward passes (11
    significant bits: ~5e-4 relative per product); the losses are evaluated in float32, so the
    curves part only as far as those roundings move the weights -- and training amplifies small
    differences: float32 itself, with 2 threads instead of 1 (another summation order, 1e-7),
    parts from itself by up to 0.02 nats over 200 steps of this recipe (docs/precision.md).
    Over these 60 steps float16 and bfloat16 both stayed within 0.005 of float32. The bound,
    0.03, leaves room for another CPU's kernels while the loss falls by more than 1 nat, so a
    float16 path that dropped or corrupted updates would be far outside it. (AdamW and Muon
    normalise their steps, so gradients left scaled would not show here: the next test checks
    those directly.)"""
    kw = dict(max_steps=60, eval_interval=20, lr=3e-3)
    with one_thread():
        train(cfg_for(small_text, tmp_path / "f32", dtype="float32", **kw), **QUIET)
        train(cfg_for(small_text, tmp_path / "f16", dtype="float16", **kw), **QUIET)
    f32, f16 = records(tmp_path / "f32"), records(tmp_path / "f16")
    assert [r["step"] for r in f16] == [0, 20, 40, 60]
    assert f32[0]["val_loss"] - f32[-1]["val_loss"] > 1.0
    for a, b in zip(f32, f16):
        assert abs(a["val_loss"] - b["val_loss"]) < 0.03, (a, b)
        assert abs(a["train_loss"] - b["train_loss"]) < 0.03, (a, b)
    assert "skipped_steps" not in f32[-1] and "loss_scale" not in f32[-1]
    assert f16[-1]["skipped_steps"] >= 0 and f16[-1]["loss_scale"] > 0


def test_overflowing_gradients_skip_the_step_and_are_counted(small_text, tmp_path, monkeypatch,
                                                              capsys):
    """A loss scale of 2^40 makes every float16 backward pass overflow: each such step changes
    no weight, halves the scale and adds one to the count, until the scale fits; then the run
    learns. With no growth in 30 steps (it takes 2000 clean ones) the count is exactly the
    number of halvings."""
    monkeypatch.setattr(runs, "INIT_LOSS_SCALE", 2.0**40)
    run = tmp_path / "run"
    with one_thread():
        train(cfg_for(small_text, run, dtype="float16", max_steps=30, eval_interval=10,
                      lr=3e-3), **QUIET)
    r = records(run)
    assert r[0]["skipped_steps"] == 0 and r[0]["loss_scale"] == 2.0**40
    assert r[1]["skipped_steps"] == 10  # every step so far overflowed...
    assert r[1]["val_loss"] == r[0]["val_loss"]  # ... and none of them moved a weight
    last = r[-1]
    assert last["skipped_steps"] == math.log2(2.0**40 / last["loss_scale"])
    assert 10 < last["skipped_steps"] < 30  # the scale came down to where float16 fits
    assert last["val_loss"] < r[0]["val_loss"] - 0.01  # and then the run learned
    out = capsys.readouterr().out
    assert f"{last['skipped_steps']} skipped steps" in out  # the evaluation line says so
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["skipped_steps"] == last["skipped_steps"]
    assert state["grad_scaler"]["scale"] == last["loss_scale"]


def test_gradients_that_overflow_even_unscaled_stop_the_run(small_text, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "INIT_LOSS_SCALE", 2.0**40)
    monkeypatch.setattr(train_module, "MIN_LOSS_SCALE", 2.0**40)  # as if the scale were down to 1
    with pytest.raises(TinyGPTError, match="overflow float16 even unscaled .* --dtype bfloat16"):
        train(cfg_for(small_text, tmp_path / "run", dtype="float16", max_steps=5), **QUIET)


def test_a_damaged_scaler_state_is_refused():
    good = torch.amp.GradScaler("cpu").state_dict()
    check_grad_scaler(good)
    check_grad_scaler(None)  # not a float16 run
    for bad in ({**good, "scale": -1.0}, {**good, "scale": float("nan")}, {"scale": 2.0},
                {**good, "_growth_tracker": "x"}, [1, 2]):
        with pytest.raises(CheckpointError, match="grad_scaler"):
            check_grad_scaler(bad)


# ---------------------------------------------------------------------------------- resuming

_PATCHED_MAIN = ("import sys, tinygpt.runs as r; r.INIT_LOSS_SCALE = 2.0**40; "
                 "from tinygpt.cli import main; sys.exit(main(sys.argv[1:]))")


def test_a_killed_float16_run_resumes_bitwise(small_text, tmp_path, monkeypatch):
    """Killed (SIGKILL) in the middle of its skipped steps, a float16 run resumes from its
    step-5 checkpoint with the loss scale it had there (2^35), not a fresh one, and ends bitwise
    identical to a run that never stopped. The resumed process starts from the default scale:
    only the checkpoint's state can give it the right one."""
    kw = dict(dtype="float16", dropout=0.0, max_steps=20, eval_interval=5)
    monkeypatch.setattr(runs, "INIT_LOSS_SCALE", 2.0**40)
    ref = tmp_path / "ref"
    with one_thread():
        train(TrainConfig.resolve(tiny_settings(small_text, ref, **kw)), **QUIET)
    monkeypatch.setattr(runs, "INIT_LOSS_SCALE", 2.0**16)

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _PATCHED_MAIN, "train", *flags(tiny_settings(small_text, run, **kw))],
        env=env(TINYGPT_FAULT_AFTER="step@7"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    saved = json.loads((run / "last" / "state.json").read_text())
    assert (saved["step"], saved["skipped_steps"], saved["grad_scaler"]["scale"]) == (5, 5, 2.0**35)
    assert main_in_process("train", "--resume", run) == 0

    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)
    assert [(r["skipped_steps"], r["loss_scale"]) for r in records(run)] == [
        (r["skipped_steps"], r["loss_scale"]) for r in records(ref)]
