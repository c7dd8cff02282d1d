"""``tinygpt sample --png`` (the sample as a picture) and ``--copying`` (the copying meter)."""

from __future__ import annotations

import json

import pytest

from tinygpt.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on a text with non-ASCII (and CJK) characters, trained in this process."""
    from tinygpt.config import TrainConfig
    from tinygpt.train import train

    tmp = tmp_path_factory.mktemp("sample")
    text = tmp / "lyrics.txt"
    text.write_text("".join(f"Ünïcödé lyrics {i} — la la lá, 你好 ♪ $x$\n" for i in range(80)),
                    encoding="utf-8")
    cfg = TrainConfig.resolve(dict(
        preset="cpu", data=str(text), out=str(tmp / "run"), n_layer=1, n_head=2, n_embd=16,
        block_size=16, batch_size=8, max_steps=20, eval_interval=10, eval_iters=2,
        sample_chars=0, warmup_steps=2, lr=3e-3))
    train(cfg, log=lambda s: None, progress_bar=False)
    return tmp / "run"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_draws_the_sample(run, tmp_path, capsys):
    out = tmp_path / "sample.png"
    assert main(["sample", str(run), "--png", str(out), "--num-chars", "300", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out) > 300  # the text is printed as ever
    assert f"picture: {out}" in captured.err
    width, height = png_size(out)
    assert 600 <= width <= 1100  # 80 columns of 10-point monospace and margins
    assert 150 <= height <= 1500
    assert out.stat().st_size > 5_000  # text drawn, not an empty canvas


def test_more_lines_make_a_taller_picture(run, tmp_path, capsys):
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    for path, n in ((short, "40"), (long, "1500")):
        main(["sample", str(run), "--png", str(path), "--num-chars", n, "--seed", "2"])
    assert png_size(long)[1] > png_size(short)[1] + 200


def test_png_in_a_missing_folder_is_one_line_and_exit_2(run, tmp_path, capsys):
    code = main(["sample", str(run), "--png", str(tmp_path / "no" / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "no such folder" in err and err.count("\n") == 1


def test_copying_reports_the_meter_on_stderr(run, capsys):
    assert main(["sample", str(run), "--copying", "--num-chars", "200", "--seed", "3",
                 "--num-samples", "2"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "copying: the longest run" in x]
    assert len(lines) == 2 and lines[0].startswith("sample 1: ")
    assert "runs of 20+ characters" in lines[0] and "unseen val text" in lines[0]


def test_quantize_int8_samples_and_evaluates(run, capsys):
    assert main(["sample", str(run), "--quantize", "int8", "--num-chars", "30", "--seed", "1",
                 "--prompt", "la "]) == 0
    text = capsys.readouterr().out
    assert text.startswith("la ") and len(text) >= 30
    losses = {}
    for mode in ("none", "int8"):
        assert main(["eval", str(run), "--json", "--quantize", mode]) == 0
        losses[mode] = json.loads(capsys.readouterr().out)["val_loss"]
    # A different model (int8 weights), a close loss: this tiny run's weights are few and wide.
    assert losses["int8"] != losses["none"] and abs(losses["int8"] - losses["none"]) < 0.05


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_an_unknown_quantization_is_one_line_and_exit_2(run, command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, str(run), "--quantize", "int4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--quantize: invalid choice: 'int4'" in err
