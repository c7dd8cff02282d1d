"""Pictures are real PNGs, drawn without a display (no pyplot, Agg only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tinygpt.errors import TinyGPTError
from tinygpt.plots import plot_attention, plot_bigram, plot_run, plot_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def write_metrics(run_dir, n=6, broken_tail=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"step": 10 * i, "train_loss": 4 - 0.3 * i, "val_loss": 4.1 - 0.3 * i, "lr": 1e-3,
                    "tokens": 320 * i, "elapsed_s": i, "tokens_per_s": 320})
        for i in range(n)
    ]
    text = "\n".join(lines) + "\n" + ('{"step": 6' if broken_tail else "")
    (run_dir / "metrics.jsonl").write_text(text)


def test_plot_run_writes_loss_png_next_to_metrics(tmp_path):
    write_metrics(tmp_path / "run")
    assert len(read_metrics(tmp_path / "run")) == 6  # the cut-off last line is skipped
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "loss.png"
    w, h = png_size(out)
    assert w >= 600 and h >= 350


def test_plot_run_with_no_evaluations_yet(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    png_size(plot_run(tmp_path / "run"))


def test_plot_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(TinyGPTError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_plot_runs_overlays(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b", n=3, broken_tail=False)
    png_size(plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png"))


def test_attention_and_bigram_pictures(tmp_path):
    maps = torch.rand(2, 3, 5, 5).softmax(-1)
    png_size(plot_attention(maps, list("ab c\n"), tmp_path / "att.png", title="t"))
    with pytest.raises(ValueError, match="characters"):
        plot_attention(maps, list("ab"), tmp_path / "x.png")
    p = torch.rand(4, 4).softmax(-1)
    png_size(plot_bigram(p, p, list("abc "), tmp_path / "bigram.png", 1.0, 0.9))


def test_no_pyplot_and_no_matplotlib_at_import():
    code = (
        "import sys, tinygpt.plots, tinygpt.cli; assert 'matplotlib' not in sys.modules; "
        "from tinygpt.plots import plot_bars; import tempfile, pathlib; "
        "plot_bars(['a'], {'x': [1.0]}, pathlib.Path(tempfile.mkdtemp()) / 'b.png', 't', 'y'); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"MPLBACKEND": "TkAgg", "PATH": ""})
