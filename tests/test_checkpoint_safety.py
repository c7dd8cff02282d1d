"""Checkpoints are complete or absent, verified on load, and never run code when loaded."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygpt import checkpoint as ckpt_mod
from tinygpt.checkpoint import (
    MANIFEST,
    CheckpointError,
    list_step_dirs,
    load_training_checkpoint,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)
from tinygpt.errors import TinyGPTError
from tinygpt.models import GPT, GPTConfig

from .resume_helpers import (
    leftovers,
    logged_steps,
    losses,
    main_in_process,
    train_in_process,
    weights_digest,
)


def rewrite_manifest(folder: Path) -> None:
    """What someone who tampers with a checkpoint would also do: make the manifest agree."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"size": (folder / name).stat().st_size,
                                   "sha256": sha256_file(folder / name)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def step_names(run: Path) -> list[str]:
    return sorted(p.name for _, p in list_step_dirs(run))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_a_run_leaves_complete_verified_checkpoints_and_no_temporary_files(small_text, tmp_path):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=40, keep=1)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best_step = min(records, key=lambda r: r["val_loss"])["step"]
    assert leftovers(run) == []
    assert os.readlink(run / "last") == "step-000040"
    assert os.readlink(run / "best") == f"step-{best_step:06d}"
    assert step_names(run) == sorted({"step-000030", "step-000040", f"step-{best_step:06d}"})
    for _, folder in list_step_dirs(run):
        manifest = json.loads((folder / MANIFEST).read_text())
        assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt",
                                          "state.json"}
        for name, meta in manifest["files"].items():
            assert sha256_file(folder / name) == meta["sha256"]
        assert verify_checkpoint(folder)["step"] == int(folder.name[5:])


@pytest.mark.parametrize("keep, expected", [(0, {40}), (3, {10, 20, 30, 40})])
def test_keep_n_older_checkpoints(small_text, tmp_path, keep, expected):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=40, keep=keep)
    best = int(os.readlink(run / "best")[5:])
    assert step_names(run) == sorted(f"step-{s:06d}" for s in expected | {best})


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8))


def state_for(model: GPT, step: int) -> dict:
    return {"model": "gpt", "model_config": model.config.to_dict(),
            "tokenizer": {"kind": "char", "chars": "abcde"}, "step": step}


def test_a_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    folder = save_checkpoint(tmp_path / "ckpt", model, opt, state_for(model, 1))
    before = (folder / "model.safetensors").read_bytes()

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ckpt", model, opt, state_for(model, 2))
    assert (folder / "model.safetensors").read_bytes() == before
    assert verify_checkpoint(folder)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial folder left


def test_non_finite_weights_are_never_saved(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(TinyGPTError, match="lm_head.weight is not finite"):
        save_checkpoint(tmp_path / "ckpt", model, None, state_for(model, 1))
    assert list(tmp_path.iterdir()) == []


def test_forced_nan_halts_before_the_step_and_the_last_checkpoint_stays_good(
    small_text, tmp_path, capsys
):
    run = tmp_path / "run"
    # A long warmup makes the LR grow each step until the loss overflows; it also makes the
    # schedule independent of --max-steps, so a shorter reference run takes the same steps.
    nan_settings = dict(lr=1e4, warmup_steps=1000, max_steps=60, eval_interval=5)
    with pytest.raises(TinyGPTError) as info:
        train_in_process(small_text, run, **nan_settings)
    message = str(info.value)
    assert "loss became nan" in message and "before the update" in message
    assert "try a lower --lr" in message
    failed_at = int(message.split(" at step ")[1].split(";")[0])

    newest = load_training_checkpoint(run)
    assert 0 < newest.step <= failed_at and newest.step % 5 == 0
    assert all(torch.isfinite(t).all() for t in newest.weights.values())
    assert logged_steps(run)[-1] == newest.step
    assert os.readlink(run / "last") == newest.path.name
    ref = tmp_path / "ref"
    train_in_process(small_text, ref, **{**nan_settings, "max_steps": newest.step})
    assert weights_digest(run) == weights_digest(ref)

    # Through the CLI the same failure is one line and exit status 2.
    settings = ["--preset", "cpu", "--data", small_text, "--out", tmp_path / "cli", "--n-layer", 1,
                "--n-head", 2, "--n-embd", 16, "--block-size", 16, "--batch-size", 8, "--lr", 1e4,
                "--warmup-steps", 1000, "--max-steps", 60, "--eval-interval", 5,
                "--eval-iters", 2, "--sample-chars", 0, "--device", "cpu"]
    assert main_in_process("train", *settings) == 2
    assert "try a lower --lr" in one_error_line(capsys)


class Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("target", ["optimizer.pt", "rng.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(small_text, tmp_path, capsys, target):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10, keep=0)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(Payload(marker), evil)
    torch.load(evil, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()
    marker.unlink()

    for _, folder in list_step_dirs(run):  # the attacker also fixes up the manifests
        (folder / target).write_bytes(evil.read_bytes())
        rewrite_manifest(folder)
    assert main_in_process("train", "--resume", run) == 2
    err = one_error_line(capsys)
    assert f"{target} holds Python objects other than tensors" in err and "refused" in err
    assert not marker.exists()
    # Sampling reads only the weights, which are intact.
    assert main_in_process("sample", run, "--num-chars", 5, "--seed", 1) == 0
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_falls_back_and_resume_still_matches(
    small_text, tmp_path, capsys
):
    run, ref = tmp_path / "run", tmp_path / "ref"
    # With a warmup longer than the run the LR does not depend on --max-steps, so a run of 30
    # steps extended to 40 takes the same steps as a run of 40.
    train_in_process(small_text, ref, max_steps=40, keep=1, warmup_steps=1000)
    train_in_process(small_text, run, max_steps=30, keep=1, warmup_steps=1000)
    weights = run / "step-000030" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))

    assert main_in_process("sample", run, "--checkpoint", "last", "--num-chars", 5) == 0
    err = capsys.readouterr().err
    assert "step-000030 is not usable" in err and "sha256" in err and "step-000020" in err

    assert main_in_process("train", "--resume", run, "--max-steps", 40) == 0
    out, err = capsys.readouterr()
    assert "resuming from" in out and "step-000020" in out
    assert "step-000030.damaged" in err
    assert (run / "step-000030.damaged").is_dir()
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)


def _nan_weights(folder: Path) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"][0, 0] = math.inf
    save_file(weights, str(folder / "model.safetensors"))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(b"\x07" * 16 + path.read_bytes()[16:])


@pytest.mark.parametrize("damage, fix_manifest, message", [
    (_truncate, False, "model.safetensors has"),  # size differs from the manifest
    (_truncate, True, "not a readable safetensors file"),
    (_garble, True, "not a readable safetensors file"),
    (_garble, False, "does not match its sha256"),
    (_nan_weights, True, "holds NaN or Inf"),
])
def test_damaged_weights_are_one_line_errors(small_text, tmp_path, capsys, damage, fix_manifest,
                                             message):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10, keep=0)
    for _, folder in list_step_dirs(run):
        damage(folder)
        if fix_manifest:
            rewrite_manifest(folder)
    for command in (["sample", run, "--num-chars", 5], ["eval", run], ["train", "--resume", run]):
        assert main_in_process(*command) == 2
        err = one_error_line(capsys)
        assert message in err, (command, err)


def test_missing_manifest_means_incomplete(tmp_path):
    model = tiny_model()
    folder = save_checkpoint(tmp_path / "ckpt", model, None, state_for(model, 3))
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        verify_checkpoint(folder)


def test_a_manifest_naming_files_outside_the_folder_is_refused(tmp_path):
    model = tiny_model()
    folder = save_checkpoint(tmp_path / "ckpt", model, None, state_for(model, 3))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../secret"] = {"size": 1, "sha256": "0"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="bad file name"):
        verify_checkpoint(folder)


def test_sample_and_eval_read_the_new_layout(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=20)
    capsys.readouterr()
    assert main_in_process("eval", run, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].endswith(os.readlink(run / "best"))
    assert main_in_process("eval", run / "step-000020", "--json") == 0  # a folder given directly
    assert json.loads(capsys.readouterr().out)["step"] == 20
    assert main_in_process("sample", run, "--num-chars", 5, "--seed", 3) == 0


@pytest.mark.parametrize("version", [1, 2])
def test_a_pre_release_checkpoint_is_refused_in_one_line(small_text, tmp_path, capsys, version):
    """Formats 1 (no manifest) and 2 (another rotary pairing) are not read: sample, eval and
    resume all say which format it is and what to do, with exit status 2."""
    new = tmp_path / "new"
    train_in_process(small_text, new, max_steps=10)
    old = tmp_path / "old"
    (old / "last").mkdir(parents=True)
    (old / "last" / "model.safetensors").write_bytes((new / "last/model.safetensors").read_bytes())
    state = json.loads((new / "last" / "state.json").read_text())
    (old / "last" / "state.json").write_text(json.dumps({**state, "format_version": version}))
    for command in (["sample", old, "--seed", 1], ["eval", old], ["train", "--resume", old]):
        assert main_in_process(*command) == 2
        line = one_error_line(capsys)
        assert f"checkpoint format {version}" in line and "retrain" in line


def test_only_one_process_trains_in_a_run_directory(small_text, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)
    with open(run / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main_in_process("train", "--resume", run, "--max-steps", 20) == 2
        assert "another tinygpt process is training" in one_error_line(capsys)
    assert logged_steps(run) == [0, 10]
