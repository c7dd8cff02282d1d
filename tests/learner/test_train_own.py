"""``tinygpt check`` on the command line, and ``tinygpt train --model FILE.py:NAME``: the
learner's class trained, sampled with its own generate, evaluated, resumed; its file recorded
and checked again when the run is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinygpt.cli import main

ZOO = Path(__file__).parent / "zoo"
TINY = ["--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--batch-size", "4",
        "--block-size", "8", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--sample-chars", "20"]


def test_check_exit_status_and_json(capsys):
    assert main(["check", str(ZOO / "gpt_ok.py:GPTLanguageModel")]) == 0
    out = capsys.readouterr().out
    assert "ok   causality" in out and "all checks pass" in out
    assert main(["check", str(ZOO / "no_crop.py"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["class"] == "GPTLanguageModel"
    assert [c["status"] for c in report["checks"] if c["name"] == "generate"] == ["fail"]
    assert main(["check", str(ZOO / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["check", str(ZOO / "gpt_ok.py:Head")]) == 1  # a module, not a language model


@pytest.fixture
def own_model(tmp_path) -> Path:
    path = tmp_path / "mygpt.py"
    shutil.copyfile(ZOO / "gpt_ok.py", path)
    return path


def test_train_sample_eval_resume_a_class_of_ones_own(own_model, small_text, tmp_path, capsys):
    run = tmp_path / "run"
    spec = f"{own_model}:GPTLanguageModel"
    assert main(["train", "--model", spec, "--data", str(small_text), "--out", str(run), *TINY,
                 "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "--- sample ---" in out
    state = json.loads((run / "best" / "state.json").read_text())
    mc = state["model_config"]
    assert mc["name"] == "GPTLanguageModel" and mc["path"] == str(own_model.resolve())
    assert len(mc["sha256"]) == 64 and (mc["n_embd"], mc["block_size"]) == (16, 8)
    assert (run / "loss.png").is_file()

    assert main(["sample", str(run), "--num-chars", "30", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["sample", str(run), "--num-chars", "30", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and len(first) >= 30  # the class's own generate
    assert main(["sample", str(run), "--num-chars", "30", "--seed", "3", "--tinygpt-sampler",
                 "--top-k", "2"]) == 0
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 6
    assert main(["train", "--resume", str(run), "--max-steps", "9"]) == 0
    assert "done: 9 steps" in capsys.readouterr().out

    own_model.write_text(own_model.read_text() + "\n# changed\n")
    assert main(["sample", str(run)]) == 2
    assert "has changed since the run was trained" in capsys.readouterr().err
    own_model.unlink()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is missing" in err and len(err.splitlines()) == 1


def test_a_failing_check_stops_the_run_unless_told(small_text, tmp_path, capsys):
    args = ["train", "--model", str(ZOO / "no_mask.py"), "--data", str(small_text), *TINY]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    captured = capsys.readouterr()
    assert "FAIL causality" in captured.out and "--no-check" in captured.err
    assert not (tmp_path / "a" / "last").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--no-check"]) == 0
    assert (tmp_path / "b" / "last").exists()


def test_bad_model_values(capsys, small_text):
    assert main(["train", "--model", "nope.py", "--data", str(small_text)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "rnn"])
    assert e.value.code == 2 and "FILE.py:NAME" in capsys.readouterr().err


def test_a_bigram_of_ones_own_trains(small_text, tmp_path, capsys):
    run = tmp_path / "bigram"
    assert main(["train", "--model", str(ZOO / "bigram_ok.py"), "--data", str(small_text),
                 "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "warn loss at initialisation" in out and "done: 6 steps" in out
