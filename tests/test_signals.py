"""SIGINT and SIGTERM: finish the step, save, exit 130 / 143; a second signal aborts at once."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from tinygpt import checkpoint as ckpt_mod
from tinygpt.checkpoint import list_step_dirs, load_training_checkpoint
from tinygpt.config import TrainConfig
from tinygpt.errors import TrainingInterrupted
from tinygpt.train import train

from .resume_helpers import (
    flags,
    leftovers,
    losses,
    main_in_process,
    start_tinygpt,
    tiny_settings,
    train_in_process,
    wait_for_step,
    weights_digest,
)

# A warmup longer than any run here keeps the LR independent of --max-steps, so a run stopped
# at step k and resumed up to k + 6 can be compared with a run of k + 6 steps.
ENDLESS = dict(max_steps=10**6, warmup_steps=10**6, lr=1.0, eval_interval=25)


def assert_resumes_exactly(small_text, tmp_path, run, step):
    assert main_in_process("train", "--resume", run, "--max-steps", step + 6) == 0
    ref = tmp_path / "ref"
    train_in_process(small_text, ref, **{**ENDLESS, "max_steps": step + 6})
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_exits_with_its_code(small_text, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start_tinygpt("train", *flags(tiny_settings(small_text, run, **ENDLESS)))
    wait_for_step(run, 25, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    step = json.loads((run / "last" / "state.json").read_text())["step"]
    assert step >= 25
    assert lines[0] == (f"tinygpt train: stopped by {sig.name} at step {step}, checkpoint saved "
                        f"(step {step}); resume with: tinygpt train --resume {run}")
    assert leftovers(run) == []
    assert load_training_checkpoint(run).step == step
    assert_resumes_exactly(small_text, tmp_path, run, step)


def test_a_second_signal_aborts_at_once(small_text, tmp_path):
    run = tmp_path / "run"
    proc = start_tinygpt("train", *flags(tiny_settings(small_text, run, **ENDLESS)))
    wait_for_step(run, 25, proc)
    # Stopped, the process collects both signals and handles them together: the first asks for
    # a checkpoint, the second aborts before one is written.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "aborted by SIGTERM" in lines[0], err
    newest = load_training_checkpoint(run)
    assert newest.step % 25 == 0  # only the regular checkpoints: none for the aborted step
    assert f"newest checkpoint is step {newest.step}" in lines[0]
    assert leftovers(run) == []
    assert_resumes_exactly(small_text, tmp_path, run, newest.step)


def _train_sending_sigint_at(small_text, out, points):
    """Train in this process; SIGINT arrives right after the named points of a save."""

    def send(point, step):
        if (point, step) in points:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = TrainConfig.resolve(tiny_settings(small_text, out))
    original, threads = ckpt_mod.fault_point, torch.get_num_threads()
    ckpt_mod.fault_point = send
    torch.set_num_threads(1)  # like the reference runs
    try:
        return train(cfg, log=lambda s: None, progress_bar=False)
    finally:
        ckpt_mod.fault_point = original
        torch.set_num_threads(threads)


def test_sigint_during_a_save_lets_the_save_finish(small_text, tmp_path):
    run = tmp_path / "run"
    # Python's default, or SIG_IGN when started from a shell that ignores SIGINT (nohup, a
    # background job): training must leave whichever it found.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        _train_sending_sigint_at(small_text, run, {("model.safetensors", 10)})
    e = info.value
    assert (e.saved, e.step, e.checkpoint_step, e.exit_code) == (True, 10, 10, 130)
    assert [p.name for _, p in list_step_dirs(run)] == ["step-000010", "step-000000"]
    assert load_training_checkpoint(run).step == 10 and leftovers(run) == []
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_two_sigints_abort_a_save_and_keep_the_previous_checkpoint(small_text, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        _train_sending_sigint_at(small_text, run, {("model.safetensors", 20),
                                                   ("optimizer.pt", 20)})
    e = info.value
    assert (e.saved, e.checkpoint_step, e.exit_code) == (False, 10, 130)
    assert "aborted by SIGINT" in str(e) and "newest checkpoint is step 10" in str(e)
    assert "step-000020" not in [p.name for _, p in list_step_dirs(run)]
    assert leftovers(run) == []  # the half-written folder was removed on the way out
    assert load_training_checkpoint(run).step == 10
    assert main_in_process("train", "--resume", run) == 0
    ref = tmp_path / "ref"
    train_in_process(small_text, ref)
    assert weights_digest(run) == weights_digest(ref) and losses(run) == losses(ref)
