"""``--tensorboard DIR``: the event files hold what metrics.jsonl and loss.png hold, read back here
with TensorBoard's own reader (``EventAccumulator``). The tensorboard package is in the dev
extra, so these run wherever the suite does."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinygpt.config import TrainConfig
from tinygpt.tensorboard import MISSING, SCALARS
from tinygpt.train import train

from .conftest import one_thread
from .resume_helpers import flags, main_in_process, tiny_settings

QUIET = dict(log=lambda s: None, progress_bar=False, handle_signals=False)


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def curve(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_event_file_holds_the_metrics_the_sample_and_the_figure(small_text, tmp_path):
    run, board = tmp_path / "run", tmp_path / "tb"
    settings = tiny_settings(small_text, run, max_steps=20, eval_interval=10, sample_chars=40,
                             tensorboard=str(board))
    with one_thread():
        result = train(TrainConfig.resolve(settings), **QUIET)
    assert list(board.glob("events.out.tfevents.*"))
    events = read_events(board)
    logged = records(run)
    for key in ("train_loss", "val_loss", "train_bpc", "val_bpc", "lr", "tokens_per_s"):
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in logged]
        assert curve(events, SCALARS[key]) == expected, key  # float32 in the event file
    assert "amp/skipped_steps" not in events.Tags()["scalars"]  # a float32 run: no scaler

    (text,) = events.Tensors("sample/text_summary")
    assert text.step == 20
    assert text.tensor_proto.string_val[0].decode() == "```\n" + result.sample + "\n```"
    assert len(result.sample) > 0
    (image,) = events.Images("loss")
    import matplotlib.image

    height, width = matplotlib.image.imread(str(run / "loss.png")).shape[:2]
    assert (image.step, image.width, image.height) == (20, width, height)
    assert image.encoded_image_string.startswith(b"\x89PNG")


def test_float16_runs_log_the_skipped_steps_and_the_scale(small_text, tmp_path):
    run, board = tmp_path / "run", tmp_path / "tb"
    settings = tiny_settings(small_text, run, max_steps=10, eval_interval=5, dtype="float16",
                             tensorboard=str(board))
    with one_thread():
        train(TrainConfig.resolve(settings), **QUIET)
    events = read_events(board)
    logged = records(run)
    assert curve(events, "amp/skipped_steps") == [(r["step"], r["skipped_steps"]) for r in logged]
    assert curve(events, "amp/loss_scale") == [(r["step"], r["loss_scale"]) for r in logged]


def test_a_resumed_run_hides_what_was_logged_after_its_checkpoint(small_text, tmp_path):
    """The step-20 checkpoint is lost (as if the process died before writing it, after logging
    step 20): the resumed run continues from step 10, and TensorBoard shows each step once, with
    the values of the run that went on."""
    run, board = tmp_path / "run", tmp_path / "tb"
    args = flags(tiny_settings(small_text, run, max_steps=20, eval_interval=10,
                               tensorboard=str(board)))
    assert main_in_process("train", *args) == 0
    shutil.rmtree(run / "step-000020")
    assert main_in_process("train", "--resume", run) == 0  # --tensorboard is the run's setting
    events = read_events(board)
    logged = records(run)
    assert [r["step"] for r in logged] == [0, 10, 20]
    assert curve(events, "loss/val") == [
        (r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in logged]


def test_without_the_tensorboard_package_the_flag_is_one_line(small_text, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    args = flags(tiny_settings(small_text, tmp_path / "run", tensorboard=str(tmp_path / "tb")))
    assert main_in_process("train", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tinygpt train: error: {MISSING}"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
