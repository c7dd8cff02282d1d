"""Pictures: loss curves, attention maps, the ladder and the bigram table, as PNG files.

matplotlib is imported only when a picture is drawn, and only its Agg (file) backend is used: a
``Figure`` is built and saved directly, without ``pyplot``, so nothing ever opens a window and no
display is needed. Every file is written atomically (a crash never leaves half a PNG).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tinygpt.errors import TinyGPTError
from tinygpt.files import atomic_write

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

DPI = 100


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise TinyGPTError("pictures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _save(fig: Figure, out: Path, **savefig) -> Path:
    out = Path(out)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", **savefig)

    atomic_write(out, write)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The evaluation records of a run (``RUN/metrics.jsonl``), oldest first.

    A damaged line (say, cut short by a crash) is skipped rather than fatal.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TinyGPTError(f"{run_dir} has no metrics.jsonl; is it a training run directory?") from None
    except OSError as e:
        raise TinyGPTError(f"cannot read {path}: {e}") from None
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _tokens_axis(ax, records: list[dict]) -> None:
    """A second x axis on top: tokens seen, read off the records (not linear with a batch warmup)."""
    import numpy as np

    steps, tokens = _series(records, "tokens")
    if len(steps) < 2 or steps != sorted(steps) or tokens != sorted(tokens):
        return
    s, t = np.asarray(steps, float), np.asarray(tokens, float)
    if np.any(np.diff(s) <= 0) or np.any(np.diff(t) <= 0):
        return

    def extend(x, xp, fp):  # piecewise linear, continued past both ends (the axis has margins)
        x = np.asarray(x, float)
        y = np.interp(x, xp, fp)
        lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
        hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
        return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)

    from matplotlib.ticker import EngFormatter

    top = ax.secondary_xaxis("top", functions=(lambda x: extend(x, s, t), lambda y: extend(y, t, s)))
    top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, 1.2M: no offset text to misread
    top.set_xlabel("tokens seen")


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw ``RUN/loss.png``: train and val loss against step, tokens seen on the top axis.

    Reads ``RUN/metrics.jsonl``; returns the path written (``out`` if given).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "val", "-o")):
        steps, losses = _series(records, key)
        if steps:
            ax.plot(steps, losses, style, label=label, markersize=3)
    _mark_best(ax, records)
    ax.set_xlabel("step")
    per_char = _bits_per_nat(records)
    one_char_tokens = per_char is None or math.isclose(per_char, 1 / math.log(2), rel_tol=1e-6)
    ax.set_ylabel(f"loss (nats per {'character' if one_char_tokens else 'token'})")
    ax.set_title(f"{run_dir.resolve().name}: loss")
    ax.grid(alpha=0.3)
    if per_char is not None:  # the val loss in bits per character, comparable across tokenizers
        right = ax.secondary_yaxis("right", functions=(lambda x: x * per_char,
                                                       lambda x: x / per_char))
        right.set_ylabel("val bits per character")
    if records:
        ax.legend()
        _tokens_axis(ax, records)
    else:
        ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out or run_dir / "loss.png")


def best_record(records: list[dict]) -> dict | None:
    """The evaluation with the lowest val loss (the first of equals): the best checkpoint's."""
    scored = [r for r in records if isinstance(r.get("val_loss"), (int, float))
              and math.isfinite(r["val_loss"])]
    return min(scored, key=lambda r: r["val_loss"]) if scored else None


def _mark_best(ax, records: list[dict]) -> None:
    """A dotted line at the best step and its val loss written beside the point."""
    best = best_record(records)
    if best is None:
        return
    step, loss = best["step"], float(best["val_loss"])
    ax.axvline(step, color="C2", linestyle=":", linewidth=1.2)
    ax.plot([step], [loss], "*", color="C2", markersize=12, label=f"best: step {step}", zorder=3)
    last = max(r["step"] for r in records)
    ha = "right" if step > 0.6 * max(last, 1) else "left"
    ax.annotate(f"best val {loss:.3f}\nat step {step}", (step, loss), textcoords="offset points",
                xytext=(-8 if ha == "right" else 8, 10), ha=ha, fontsize=8, color="C2")


def _bits_per_nat(records: list[dict]) -> float | None:
    """Val bits per character for one nat per token, from the newest record that has both (the
    split's characters per token fix it); None for runs from before ``val_bpc``."""
    for r in reversed(records):
        loss, bpc = r.get("val_loss"), r.get("val_bpc")
        if isinstance(loss, (int, float)) and isinstance(bpc, (int, float)) and loss > 0:
            return bpc / loss
    return None


def plot_runs(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """Overlay the val (solid) and train (dashed) loss of several runs; labels are the folder names."""
    if not run_dirs:
        raise TinyGPTError("give at least one run directory")
    labels = list(labels) if labels else [Path(d).resolve().name for d in run_dirs]
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        records = read_metrics(Path(run_dir))
        color = f"C{i % 10}"
        steps, val = _series(records, "val_loss")
        ax.plot(steps, val, "-", color=color, label=f"{label} (val)")
        steps, train = _series(records, "train_loss")
        ax.plot(steps, train, "--", color=color, alpha=0.6, label=f"{label} (train)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title("loss: val solid, train dashed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def _char_label(c: str) -> str:
    """A character (or token) as an axis label: whitespace made visible, and "$" escaped so that
    matplotlib never reads a label as a formula."""
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(c, c).replace("$", r"\$")


def plot_attention(maps: torch.Tensor, chars: Sequence[str], out: Path, title: str = "") -> Path:
    """A grid of layers (rows) x heads (columns); each cell the (T, T) attention weights with the
    prompt's characters on both axes (rows: the position that looks; columns: where it looks)."""
    n_layer, n_head, T, _ = maps.shape
    if len(chars) != T:
        raise ValueError(f"{len(chars)} characters for maps over {T} positions")
    cell = max(2.0, min(3.2, 0.12 * T + 0.6))  # inches per map
    left, right, bottom, top = 0.8, 1.3, 0.8, 0.75  # inches around the grid
    width, height = cell * n_head + left + right, cell * n_layer * 1.08 + bottom + top
    fig = _figure(width, height, layout=None)
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=0.08, hspace=0.15)
    labels = [_char_label(c) for c in chars]
    show = T <= 48  # beyond that the characters would overlap
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
            ax.tick_params(length=0, labelsize=7)
    # Shared axes: the labels of the outer row and column serve the whole grid.
    axes[-1][0].set_xticks(range(T) if show else [], labels if show else [], fontsize=7)
    axes[-1][0].set_yticks(range(T) if show else [], labels if show else [], fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("attends to", fontsize=8)
    for row in axes:
        row[0].set_ylabel("position", fontsize=8)
    bar = (1 - (right - 0.25) / width, bottom / height, 0.15 / width, 1 - (bottom + top) / height)
    cax = fig.add_axes(bar)
    fig.colorbar(image, cax=cax, label="weight")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_ladder(rungs: Sequence[dict], out: Path) -> Path:
    """Left: val loss per rung, with the lecture's value; right: every rung's val-loss curve."""
    fig = _figure(12, 4.8)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
    names = [r["name"] for r in rungs]
    xs = range(len(rungs))
    ours = [r["val_loss"] for r in rungs]
    left.plot(xs, ours, "o-", color="C0", label="this run", markersize=7)
    lecture = [(i, r["lecture_val_loss"]) for i, r in enumerate(rungs) if r.get("lecture_val_loss")]
    if lecture:
        left.plot(*zip(*lecture), "D", color="C3", label="the lecture", markersize=6, alpha=0.8)
    for i, v in enumerate(ours):
        left.annotate(f"{v:.2f}", (i, v), textcoords="offset points", xytext=(8, 4), fontsize=8,
                      color="C0")
    left.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    left.set_xlim(-0.5, len(rungs) - 0.3)
    left.set_ylabel("whole-split val loss (nats per character)")
    left.set_title("val loss per rung")
    left.legend(fontsize="small")
    left.grid(alpha=0.3)
    for i, r in enumerate(rungs):
        curve = r.get("curve") or []
        if curve:
            right.plot([c[0] for c in curve], [c[1] for c in curve], color=f"C{i % 10}", label=r["name"])
    right.set_xlabel("step")
    right.set_ylabel("val loss (estimate)")
    right.set_title("curves while training")
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
    return _save(fig, out)


def plot_bigram(
    learned: torch.Tensor, counted: torch.Tensor, chars: Sequence[str], out: Path,
    learned_loss: float | None = None, optimum_loss: float | None = None,
) -> Path:
    """The bigram model's next-character probabilities (V, V) next to those counted from the text.

    Rows: the current character; columns: the next one. The colour scale is logarithmic so that
    rare pairs are visible too.
    """
    from matplotlib.colors import LogNorm

    V = len(chars)
    side = max(4.5, min(8.0, 0.1 * V + 2))
    fig = _figure(2 * side + 1, side + 0.6)
    axes = fig.subplots(1, 2)
    labels = [_char_label(c) for c in chars]
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    image = None
    titles = (
        f"learned by the model{'' if learned_loss is None else f' (loss {learned_loss:.3f})'}",
        f"counted from the text{'' if optimum_loss is None else f' (loss {optimum_loss:.3f})'}",
    )
    for ax, table, title in zip(axes, (learned, counted), titles, strict=True):
        image = ax.imshow(table.float().clamp_min(1e-4).numpy(), cmap="magma", norm=norm)
        ax.set_title(title, fontsize=10)
        step = 1 if V <= 70 else math.ceil(V / 70)
        ticks = list(range(0, V, step))
        ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=5)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=5)
        ax.set_xlabel("next character")
        ax.set_ylabel("current character")
    fig.colorbar(image, ax=axes, shrink=0.8, label="P(next | current)")
    fig.suptitle("bigram: P(next character | current character)")
    return _save(fig, out)


def plot_bars(
    groups: Sequence[str], series: dict[str, Sequence[float]], out: Path, title: str, ylabel: str
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=f"C{i}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


SAMPLE_COLUMNS = 80  # characters per line of a drawn sample
SAMPLE_MAX_LINES = 60


def wrap_sample(text: str, columns: int = SAMPLE_COLUMNS, max_lines: int = SAMPLE_MAX_LINES
                ) -> list[str]:
    """The lines of a sample as drawn: its own line breaks kept, long lines cut at ``columns``
    (at a space where there is one), tabs expanded, control characters shown escaped, and at
    most ``max_lines`` lines (the last one then says how many more there were)."""
    import textwrap

    from tinygpt.generate import visible_controls

    wrapper = textwrap.TextWrapper(width=columns, replace_whitespace=False, drop_whitespace=False,
                                   break_long_words=True, break_on_hyphens=False)
    lines: list[str] = []
    for line in text.split("\n"):
        line = visible_controls(line.expandtabs(4))
        lines.extend(wrapper.wrap(line) or [""])
    if len(lines) > max_lines:
        more = len(lines) - max_lines + 1
        lines = lines[: max_lines - 1] + [f"[... {more} more lines]"]
    return lines


def _monospace_families() -> list[str]:
    """A monospace font, then fonts with the glyphs it lacks (CJK), among those installed."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    wanted = ["DejaVu Sans Mono", "Noto Sans Mono", "Noto Sans Mono CJK SC", "Noto Sans CJK SC",
              "WenQuanYi Zen Hei Mono", "Source Han Sans", "DejaVu Sans"]
    return [f for f in wanted if f in installed] or ["monospace"]


def plot_sample(text: str, out: Path, caption: str, title: str = "") -> Path:
    """A sample drawn as a picture: monospace, wrapped at ``SAMPLE_COLUMNS``, the caption under it.

    The caption is placed under the text as measured, and the figure is cut to what is drawn:
    nothing is clipped or overlaps, whatever the glyphs' widths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    lines = wrap_sample(text)
    size = 10  # points
    width = SAMPLE_COLUMNS * size * 0.62 / 72 + 0.6  # inches
    height = len(lines) * size * 1.6 / 72 + 1.2
    fig = _figure(width, height, layout=None)
    FigureCanvasAgg(fig)  # a renderer to measure the text with
    fig.patch.set_facecolor("white")
    left, top = 0.3 / width, 1 - 0.3 / height
    if title:
        fig.text(left, top, title, fontsize=12, fontweight="bold", va="top")
        top -= 0.4 / height
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Glyph .* missing from")  # shown as boxes, not fatal
        body = fig.text(left, top, "\n".join(lines), family=_monospace_families(), fontsize=size,
                        va="top", linespacing=1.35, parse_math=False)
        below = body.get_window_extent(fig.canvas.get_renderer()).y0 / fig.bbox.height
        fig.text(left, below - 0.25 / height, caption, fontsize=9, color="0.3", va="top",
                 parse_math=False, wrap=True)
        return _save(fig, out, bbox_inches="tight", pad_inches=0.25)
