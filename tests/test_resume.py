"""--resume continues a run exactly; --init-from starts a new one from a run's weights."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from tinygpt.checkpoint import list_step_dirs, load_checkpoint, verify_checkpoint

from .resume_helpers import (
    flags,
    leftovers,
    logged_steps,
    losses,
    main_in_process,
    run_tinygpt,
    start_tinygpt,
    stop,
    tiny_settings,
    train_in_process,
    wait_for_step,
    weights_digest,
)


def _kill_resume_chain(small_text, tmp_path, faults):
    ref = tmp_path / "ref"
    train_in_process(small_text, ref)
    run = tmp_path / "run"
    args = ["train", *flags(tiny_settings(small_text, run))]
    for i, fault in enumerate(faults):
        proc = run_tinygpt(*args, fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr)
        if fault.split("@")[0] in ("model.safetensors", "optimizer.pt", "rng.pt", "state.json",
                                   "manifest.json"):  # killed in the middle of a save
            assert any(".partial-" in name for name in leftovers(run)), fault
        if i == 0:
            assert [p.name for _, p in list_step_dirs(run)] == ["step-000000"]
        args = ["train", "--resume", run]
    assert main_in_process(*args) == 0

    assert weights_digest(run) == weights_digest(ref)
    assert weights_digest(run, "best") == weights_digest(ref, "best")
    assert losses(run) == losses(ref)
    assert logged_steps(run) == [0, 10, 20, 30, 40]  # no duplicates, nothing extra
    assert leftovers(run) == []
    assert (run / "last").resolve().name == "step-000040"
    assert [p.name for _, p in list_step_dirs(run)] == [p.name for _, p in list_step_dirs(ref)]
    for _, folder in list_step_dirs(run):
        verify_checkpoint(folder)


@pytest.mark.slow  # 10-30 s on a 2-core AVX2 machine
def test_killed_at_several_points_and_resumed_ends_bitwise_identical(small_text, tmp_path):
    """SIGKILL between steps and during a checkpoint save; each resume carries on."""
    _kill_resume_chain(small_text, tmp_path, [
        "step@7",                # between two checkpoints
        "model.safetensors@10",  # inside a save: only the weights written
        "manifest.json@20",      # the save is complete but not yet committed (renamed)
        "commit@30",             # committed; `last` still points at the previous one
    ])


@pytest.mark.slow
def test_killed_at_every_point_of_a_save(small_text, tmp_path):
    _kill_resume_chain(small_text, tmp_path, [
        "model.safetensors@10", "optimizer.pt@10", "rng.pt@10", "state.json@10",
        "manifest.json@10", "commit@20", "step@27", "link@30", "step@33",
    ])


@pytest.mark.slow  # 15-20 s on a 2-core AVX2 machine
def test_external_sigkill_then_resume(small_text, tmp_path):
    """A real kill -9 from outside, at whatever step the run has reached."""
    settings = tiny_settings(small_text, tmp_path / "run", max_steps=80, eval_interval=10)
    proc = start_tinygpt("train", *flags(settings))
    wait_for_step(tmp_path / "run", 10, proc)
    stop(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert logged_steps(tmp_path / "run")[-1] < 80
    assert main_in_process("train", "--resume", tmp_path / "run") == 0

    train_in_process(small_text, tmp_path / "ref", max_steps=80, eval_interval=10)
    assert weights_digest(tmp_path / "run") == weights_digest(tmp_path / "ref")
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_resume_restores_best_val_and_time_budget(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=20)
    before = json.loads((run / "last" / "state.json").read_text())
    assert main_in_process("train", "--resume", str(run), "--max-steps", "30") == 0
    after = json.loads((run / "last" / "state.json").read_text())
    assert after["step"] == 30 and after["train_config"]["max_steps"] == 30
    assert after["elapsed_s"] >= before["elapsed_s"]  # the clock continues, it does not restart
    assert after["best_val_loss"] <= before["best_val_loss"]
    assert logged_steps(run) == [0, 10, 20, 30]


def test_resume_refuses_a_changed_model(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)
    before = (run / "metrics.jsonl").read_text()
    assert main_in_process("train", "--resume", str(run), "--n-layer", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--n-layer 2 differs from the run's n_layer = 1" in err and "--init-from" in err
    assert main_in_process("train", "--resume", str(run), "--lr", "0.5") == 2
    assert "--lr 0.5 differs" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_refuses_a_changed_corpus(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)
    small_text.write_text(small_text.read_text(encoding="utf-8") + "one more line\n",
                          encoding="utf-8")
    assert main_in_process("train", "--resume", str(run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is not the one the run was trained on" in err and "fingerprint" in err


def test_resume_accepts_the_same_text_at_a_new_place(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)
    moved = tmp_path / "elsewhere.txt"
    shutil.copyfile(small_text, moved)
    small_text.unlink()
    assert main_in_process("train", "--resume", run, "--data", moved, "--max-steps", 20) == 0
    assert logged_steps(run) == [0, 10, 20]


def test_resume_refusals_are_one_line(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=20)
    cases = [
        (["--max-steps", "10"], "below the step of the checkpoint (20)"),
        (["--overwrite"], "--overwrite and --resume"),
        (["--init-from", str(run)], "--init-from starts a new run"),
        (["--out", str(tmp_path / "other")], "is not the run being resumed"),
    ]
    for extra, message in cases:
        assert main_in_process("train", "--resume", str(run), *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main_in_process("train", "--resume", str(tmp_path / "nothing")) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=20)
    digest, metrics = weights_digest(run), (run / "metrics.jsonl").read_text()
    assert main_in_process("train", "--resume", str(run)) == 0
    assert "already reached --max-steps 20" in capsys.readouterr().out
    assert weights_digest(run) == digest and (run / "metrics.jsonl").read_text() == metrics


def test_init_from_starts_a_new_run_from_the_weights(small_text, tmp_path, capsys):
    src = tmp_path / "src"
    train_in_process(small_text, src, max_steps=30, n_layer=2)
    lines = (src / "metrics.jsonl").read_text().splitlines()
    src_best = min(json.loads(x)["val_loss"] for x in lines)
    new = tmp_path / "new"
    # The shape comes from the source run (n_layer=2), the rest from these flags.
    settings = tiny_settings(small_text, new, max_steps=10, lr=1e-4)
    del settings["n_layer"]
    assert main_in_process("train", "--init-from", str(src), *flags(settings)) == 0
    assert f"weights from {src}" in capsys.readouterr().out
    lines = [json.loads(x) for x in (new / "metrics.jsonl").read_text().splitlines()]
    # Same eval batches, same weights: the new run starts where the source's best checkpoint was.
    assert lines[0]["step"] == 0 and lines[0]["val_loss"] == src_best
    state = json.loads((new / "last" / "state.json").read_text())
    assert state["model_config"]["n_layer"] == 2 and state["train_config"]["init_from"] == str(src)
    assert state["step"] == 10  # a new schedule and a new step count
    assert load_checkpoint(new).model_kind == "gpt"


def test_init_from_on_a_text_within_the_vocabulary(small_text, tmp_path, capsys):
    src = tmp_path / "src"
    train_in_process(small_text, src, max_steps=10)
    subset = tmp_path / "subset.txt"
    subset.write_text("the quick brown fox, the lazy dog.\n" * 40, encoding="utf-8")
    settings = tiny_settings(subset, tmp_path / "new", max_steps=10)
    assert main_in_process("train", "--init-from", str(src), *flags(settings)) == 0
    ckpt = load_checkpoint(tmp_path / "new")
    assert ckpt.tokenizer == load_checkpoint(src).tokenizer  # the source's vocabulary is kept
    capsys.readouterr()
    # ... and resuming that run keeps encoding its text with that vocabulary.
    assert main_in_process("train", "--resume", str(tmp_path / "new"), "--max-steps", "20") == 0


def test_init_from_refuses_another_vocabulary_or_shape(small_text, tmp_path, capsys):
    src = tmp_path / "src"
    train_in_process(small_text, src, max_steps=10)
    other = tmp_path / "other.txt"
    other.write_text("ZZZ qqq ### " * 100, encoding="utf-8")
    settings = tiny_settings(other, tmp_path / "a")
    assert main_in_process("train", "--init-from", str(src), *flags(settings)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "character(s) that the model" in err and "'#'" in err and "vocabulary" in err
    settings = tiny_settings(small_text, tmp_path / "b", n_layer=3)
    assert main_in_process("train", "--init-from", str(src), *flags(settings)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n-layer 3 does not match" in err
    assert main_in_process("train", "--init-from", tmp_path / "missing", "--data", small_text) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_bfloat16_run_killed_and_resumed_ends_bitwise_identical(small_text, tmp_path):
    """Mixed precision changes the arithmetic, not its determinism: kill and resume still match
    the uninterrupted run bit for bit."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    settings = tiny_settings(small_text, run, max_steps=20, dtype="bfloat16")
    assert run_tinygpt("train", *flags(settings), fault="step@13").returncode == -signal.SIGKILL
    assert main_in_process("train", "--resume", run) == 0
    train_in_process(small_text, ref, max_steps=20, dtype="bfloat16")
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)


def test_resume_may_switch_compile_on_or_off(small_text, tmp_path, monkeypatch):
    """--compile is a speed setting like --device: a resumed run may change it (torch.compile
    is replaced by a recording identity here, the real one is tested in test_train)."""

    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    assert main_in_process("train", "--resume", run, "--max-steps", "20", "--compile") == 0
    state = json.loads((run / "last" / "state.json").read_text())
    assert compiled and state["step"] == 20 and state["train_config"]["compile"] is True


def _edit_state(folder, edit) -> None:
    """Change a checkpoint's state.json with ``edit(state)`` and re-seal its manifest."""
    from tinygpt.files import sha256_file

    state = json.loads((folder / "state.json").read_text())
    edit(state)
    (folder / "state.json").write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": (folder / "state.json").stat().st_size,
                                       "sha256": sha256_file(folder / "state.json")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(folder)


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(small_text, tmp_path):
    """A run saved before dtype/compile/attn_dropout/sampling existed had their defaults: it
    resumes, and giving the default value explicitly is not a change."""
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=10)

    def drop(state):
        for key in ("dtype", "compile", "attn_dropout", "sampling"):
            del state["train_config"][key]
        del state["model_config"]["attn_dropout"]

    _edit_state((run / "last").resolve(), drop)
    assert main_in_process("train", "--resume", run, "--max-steps", "20",
                           "--dtype", "float32", "--sampling", "random") == 0
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 20


def test_killed_in_the_middle_of_a_batch_warmup_and_resumed_ends_bitwise_identical(
        small_text, tmp_path):
    """The batch size is a function of the step, and so are the windows drawn epoch by epoch
    (``--sampling epoch``: the sequences seen so far say where in the epochs' orders the next
    batch starts), so a run killed at step 13 of a 16-step warmup (checkpoint at 10) continues
    with the same batches."""
    warmup = dict(max_steps=20, batch_start=2, batch_warmup_steps=16, sampling="epoch")
    train_in_process(small_text, tmp_path / "ref", **warmup)
    args = ["train", *flags(tiny_settings(small_text, tmp_path / "run", **warmup))]
    assert run_tinygpt(*args, fault="step@13").returncode == -signal.SIGKILL
    assert main_in_process("train", "--resume", tmp_path / "run") == 0
    assert weights_digest(tmp_path / "run") == weights_digest(tmp_path / "ref")
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(small_text, tmp_path, capsys):
    """Killed in the middle of the first save (nothing complete on disk), the same command with
    --resume starts the run again with the settings it was started with (config.json), says so
    in one line, and ends like a run that was never killed."""
    ref = tmp_path / "ref"
    train_in_process(small_text, ref)
    run = tmp_path / "run"
    proc = run_tinygpt("train", *flags(tiny_settings(small_text, run)), fault="model.safetensors@0")
    assert proc.returncode == -signal.SIGKILL
    assert list_step_dirs(run) == [] and (run / "config.json").is_file()
    assert main_in_process("train", "--resume", run) == 0
    assert "holds no checkpoint yet: starting the run from step 0" in capsys.readouterr().err
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)


def test_resume_of_a_missing_run_directory_is_refused_in_one_line(tmp_path, capsys):
    assert main_in_process("train", "--resume", tmp_path / "nowhere") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0] and "--out" in err[0]


def test_save_every_saves_between_evaluations_and_a_kill_there_resumes_exactly(small_text, tmp_path):
    """With --save-every far below a step's time, every step is saved although the run evaluates
    only at its start and end: a kill at step 17 loses one step, and the resumed run ends bitwise
    identical to one never killed."""
    timed = dict(eval_interval=1000, save_every="1ms")
    ref = tmp_path / "ref"
    train_in_process(small_text, ref, **timed)
    run = tmp_path / "run"
    proc = run_tinygpt("train", *flags(tiny_settings(small_text, run, **timed)), fault="step@17")
    assert proc.returncode == -signal.SIGKILL
    assert (run / "last").resolve().name == "step-000016"
    assert main_in_process("train", "--resume", run) == 0
    assert weights_digest(run) == weights_digest(ref)
    assert losses(run) == losses(ref)
    assert logged_steps(run) == [0, 40]  # saves that are not evaluations add no metrics lines
