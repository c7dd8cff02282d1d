"""Pictures are real PNGs, drawn without a display (no pyplot, Agg only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tinygpt.errors import TinyGPTError
from tinygpt.plots import (
    SAMPLE_COLUMNS,
    _mark_best,
    best_record,
    plot_attention,
    plot_bigram,
    plot_run,
    plot_runs,
    read_metrics,
    wrap_sample,
)

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
    # Token labels with dollar signs are text, not formulas (r"a$\b$" is not valid mathtext).
    png_size(plot_attention(maps[:1, :1, :2, :2], ["$", r"a$\b$"], tmp_path / "dollars.png"))
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


TINY_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
            "--eval-iters", "2", "--sample-chars", "0", "--warmup-steps", "2", "--device", "cpu"]


def tinygpt(*args) -> int:
    """``tinygpt ARGS`` in this process (the commands are cheap; a subprocess is not)."""
    from tinygpt.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny GPT runs: one causal, one without the mask."""
    tmp = tmp_path_factory.mktemp("runs")
    text = tmp / "text.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYGPT_HOME", str(tmp / "home"))
        for name, extra in (("causal", []), ("no-mask", ["--no-causal"])):
            runs[name] = tmp / name
            assert tinygpt("train", "--data", text, "--out", runs[name], *TINY_RUN, *extra,
                           "--max-steps", "6", "--eval-interval", "3") == 0
    return runs


def test_plot_command(two_runs, tmp_path, capsys):
    assert tinygpt("plot", two_runs["causal"]) == 0
    png_size(two_runs["causal"] / "loss.png")
    assert tinygpt("plot", two_runs["causal"], two_runs["no-mask"], "--out", tmp_path / "both.png") == 0
    png_size(tmp_path / "both.png")
    capsys.readouterr()
    assert tinygpt("plot", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err


def test_attention_command(two_runs, tmp_path, capsys):
    for name, run in two_runs.items():
        out = tmp_path / f"{name}.png"
        assert tinygpt("attention", run, "--prompt", "To be, or not", "--out", out) == 0
        assert "1 layers x 2 heads, 13 tokens" in capsys.readouterr().out
        png_size(out)
    assert tinygpt("attention", two_runs["causal"], "--prompt", "To be") == 0
    assert (two_runs["causal"] / "attention.png").is_file()


@pytest.mark.parametrize("prompt, fragment", [
    ("", "must not be empty"), ("Zebra \u2603", "does not know"),
    ("To be, or not to be: that is", "context is 16"),
])
def test_attention_command_bad_prompt(two_runs, capsys, prompt, fragment):
    assert tinygpt("attention", two_runs["causal"], "--prompt", prompt) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_tokens_axis_labels_read_without_an_offset():
    """Millions of tokens are written 1.2M on the top axis, not 1.2 with a '1e6' elsewhere."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tinygpt.plots import _tokens_axis

    records = [{"step": 100 * i, "tokens": 204_800 * i} for i in range(7)]
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [4.0 - 0.3 * i for i in range(7)])
    _tokens_axis(ax, records)
    FigureCanvasAgg(fig).draw()
    (top,) = ax.child_axes
    labels = [t.get_text() for t in top.xaxis.get_ticklabels() if t.get_text()]
    assert "1.2M" in labels and any(label.endswith("k") for label in labels), labels
    assert top.xaxis.get_offset_text().get_text() == ""


def test_the_best_step_is_marked(tmp_path):
    from matplotlib.figure import Figure

    records = [{"step": s, "val_loss": v} for s, v in ((0, 3.0), (10, 2.0), (20, 1.5), (30, 1.5),
                                                        (40, 1.9))]
    assert best_record(records)["step"] == 20  # the first of equals: the best checkpoint's
    assert best_record([{"step": 0}]) is None
    ax = Figure().add_subplot()
    _mark_best(ax, records)
    marked = {tuple(line.get_xdata()) for line in ax.lines}
    assert (20, 20) in marked and (20,) in marked  # the dotted line and the star
    assert any("best val 1.500" in t.get_text() for t in ax.texts)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png_size(plot_run(run))


def test_wrap_sample_keeps_lines_and_cuts_long_ones():
    text = "short line\n" + "word " * 40 + "\n\nx" * 3 + "\tend\x07"
    lines = wrap_sample(text)
    assert lines[0] == "short line"
    assert all(len(line) <= SAMPLE_COLUMNS for line in lines)
    assert "".join(lines[1:4]) == "word " * 40  # cut at spaces, nothing lost
    assert lines[-1] == "x   end\\x07"  # tabs expanded, control characters visible
    many = wrap_sample("a\n" * 100, max_lines=10)
    assert len(many) == 10 and many[-1] == "[... 92 more lines]"
