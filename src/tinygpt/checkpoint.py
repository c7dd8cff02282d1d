"""Checkpoints: weights in safetensors, everything else in JSON, optimizer state on its own.

A run directory looks like::

    RUN_DIR/
      metrics.jsonl          one JSON line per evaluation
      last/                  the newest checkpoint
        model.safetensors    weights (no pickle: loading cannot run code)
        optimizer.pt         optimizer state (tensors only, loaded with weights_only=True)
        state.json           format version, model kind + config, tokenizer, step, best val...
      best/                  the checkpoint with the lowest val loss so far

Every file is written to a temporary name, flushed to disk and renamed into place, and
``state.json`` is written last, so a checkpoint without a readable ``state.json`` is incomplete.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinygpt.errors import TinyGPTError
from tinygpt.models import build_model, make_config
from tinygpt.tokenizer import CharTokenizer

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)

    atomic_write(path, write)


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
) -> None:
    """Write one complete checkpoint into ``ckpt_dir``; ``state`` must describe the model."""
    ckpt_dir = Path(ckpt_dir)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TinyGPTError(f"refusing to save a checkpoint: weight {name} is not finite")
    # The state file goes last: while it is missing or stale the directory is not a new checkpoint.
    (ckpt_dir / STATE).unlink(missing_ok=True)
    atomic_write(ckpt_dir / WEIGHTS, lambda tmp: save_file(weights, tmp))
    if optimizer is not None:
        atomic_write(ckpt_dir / OPTIMIZER, lambda tmp: torch.save(optimizer.state_dict(), tmp))
    write_json(ckpt_dir / STATE, {"format_version": FORMAT_VERSION, **state})


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: nn.Module
    tokenizer: CharTokenizer

    @property
    def model_kind(self) -> str:
        return self.state["model"]

    @property
    def block_size(self) -> int | None:
        return self.state["model_config"].get("block_size")


def find_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """The checkpoint folder to load from a run directory (``best`` falls back to ``last``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TinyGPTError(f"no such run directory: {run_dir}")
    order = ["best", "last"] if which == "best" else [which]
    for name in order:
        if (run_dir / name / STATE).is_file():
            return run_dir / name
    if (run_dir / STATE).is_file():  # a checkpoint folder given directly
        return run_dir
    raise TinyGPTError(f"{run_dir} holds no checkpoint (train one with: tinygpt train --out {run_dir})")


def read_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TinyGPTError(f"cannot read {path}: {e}") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise TinyGPTError(
            f"{path} has checkpoint format version {version!r}; this tinygpt reads version "
            f"{FORMAT_VERSION} (upgrade tinygpt or retrain)"
        )
    return state


def load_checkpoint(
    run_dir: Path, which: str = "best", device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load model and tokenizer from a run directory (or a checkpoint folder)."""
    ckpt_dir = find_checkpoint(run_dir, which)
    state = read_state(ckpt_dir)
    try:
        config = make_config(state["model"], state["model_config"])
        tokenizer = CharTokenizer.from_dict(state["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise TinyGPTError(f"{ckpt_dir / STATE} is not a valid checkpoint description: {e}") from None
    model = build_model(state["model"], config)
    try:
        weights = load_file(str(ckpt_dir / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise TinyGPTError(f"cannot read weights {ckpt_dir / WEIGHTS}: {e}") from None
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TinyGPTError(f"weights {ckpt_dir / WEIGHTS}: tensor {name} holds NaN or Inf")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TinyGPTError(f"weights {ckpt_dir / WEIGHTS} do not fit the model: {first}") from None
    model.to(device)
    model.eval()
    return Checkpoint(ckpt_dir, state, model, tokenizer)

