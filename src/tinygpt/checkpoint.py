"""Checkpoints that survive crashes: one folder per saved step, committed by a manifest.

A run directory (checkpoint format 3) looks like::

    RUN_DIR/
      metrics.jsonl            one JSON line per evaluation
      step-000500/             one complete checkpoint per saved step
        model.safetensors      weights (safetensors: loading cannot run code)
        optimizer.pt           optimizer state  } tensors and plain data only,
        rng.pt                 random states    } loaded with torch.load(weights_only=True)
        state.json             format version, model kind + config, tokenizer, train config,
                               corpus fingerprint, step, losses, best val, time used, and in
                               float16 runs the gradient scaler's state (``grad_scaler``)...
        manifest.json          size and sha256 of every file above; written last
      step-001000/
      last -> step-001000      symbolic links, switched atomically once a step folder is complete
      best -> step-000500      (the lowest val loss so far)

Where symbolic links cannot be made (Windows without developer mode or admin rights), ``last`` and
``best`` are small pointer files instead, each holding the name of its step folder on one line
(``step-001000``), replaced atomically like the links. ``link_target`` reads either kind (and the
real ``last`` folder of format 1); every reader of a run goes through it.

Saving writes every file into a fresh hidden folder (``.step-001000.partial-XXXX``): each file
goes to a temporary name, is flushed, fsynced and renamed; ``manifest.json`` comes last and is the
commit marker. The folder is then fsynced and renamed to ``step-001000``, the run directory is
fsynced, and the ``last`` (and maybe ``best``) link is replaced by ``os.replace`` of a new link.
Older step folders beyond ``keep`` are removed only after that. A crash at any instant therefore
leaves every earlier checkpoint untouched; half-written folders have hidden names and are swept
away by the next run in that directory.

Loading verifies the manifest (sizes and sha256) before reading anything. If a checkpoint does not
verify, the newest one that does is used instead and a warning says so. ``last`` means the newest
complete step folder (the link is a convenience: the loader does not need it).

Fault injection for tests: with ``TINYGPT_FAULT_AFTER=POINT@STEP`` in the environment the process
kills itself with SIGKILL at that point of the save of step STEP. POINT is a file name (after that
file is complete inside the partial folder), ``commit`` (after the folder rename, before the
links), ``link`` (after the links, before pruning), or ``step`` (right after optimizer step STEP,
see ``train.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinygpt.errors import TinyGPTError
from tinygpt.files import atomic_write, fsync_dir, read_json_object, sha256_file, usual_mode, write_json
from tinygpt.learner.source import build_recorded, follow_device
from tinygpt.learner.spec import LearnerConfig, is_learner_kind
from tinygpt.models import build_model, make_config
from tinygpt.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT_VERSION = 3
# Formats 1 and 2 came from pre-release versions (no manifest; another rotary channel pairing).
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"  # a BPE tokenizer, as Hugging Face tokenizers writes it
STEP_DIR = re.compile(r"step-(\d+)")
FAULT_ENV = "TINYGPT_FAULT_AFTER"
FAULT_RANK_ENV = "TINYGPT_FAULT_RANK"
FAULT_ONCE_ENV = "TINYGPT_FAULT_ONCE"

Warn = Callable[[str], None]
# What torch.amp.GradScaler.state_dict() holds: plain numbers, saved in state.json.
GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


class CheckpointError(TinyGPTError):
    """A checkpoint folder that is incomplete, damaged or unsafe to load."""


def warn_stderr(message: str) -> None:
    print(f"tinygpt: warning: {message}", file=sys.stderr, flush=True)


def fault_point(point: str, step: int) -> None:
    """Die here (SIGKILL, no cleanup) if ``TINYGPT_FAULT_AFTER`` names this point and step (in a
    torchrun job: on the rank ``TINYGPT_FAULT_RANK`` names, else on every rank)."""
    rank = os.environ.get(FAULT_RANK_ENV)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get(FAULT_ENV) == f"{point}@{step}":
        once = os.environ.get(FAULT_ONCE_ENV)  # a file: die only the first time (it is created)
        if once:
            try:
                open(once, "x").close()
            except FileExistsError:
                return
        sys.stdout.flush()
        sys.stderr.flush()
        kill = getattr(signal, "SIGKILL", None)
        if kill is not None:
            os.kill(os.getpid(), kill)
        os._exit(137)


# --------------------------------------------------------------------------------------- writing


def _nonfinite_tensor(obj, prefix: str = "") -> str | None:
    """Name of the first floating-point tensor in a nested structure that holds NaN or Inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not torch.isfinite(obj).all():
            return prefix or "tensor"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(
        obj, (list, tuple)) else ()
    for k, v in items:
        bad = _nonfinite_tensor(v, f"{prefix}.{k}" if prefix else str(k))
        if bad:
            return bad
    return None


def _write_checkpoint_files(
    folder: Path,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    rng_state: dict | None,
    state: dict,
) -> None:
    """Write a checkpoint's files into ``folder`` (an empty folder), the manifest last."""
    step = state.get("step", -1)
    files = [(WEIGHTS, lambda tmp: save_file(weights, tmp))]
    if optimizer_state is not None:
        files.append((OPTIMIZER, lambda tmp: torch.save(optimizer_state, tmp)))
    if rng_state is not None:
        files.append((RNG, lambda tmp: torch.save(rng_state, tmp)))
    state, tokenizer_json = _tokenizer_file(state)
    if tokenizer_json is not None:
        files.append((TOKENIZER, lambda tmp: Path(tmp).write_text(tokenizer_json, encoding="utf-8")))
    full_state = {"format_version": FORMAT_VERSION, **state}
    files.append((STATE, lambda tmp: Path(tmp).write_text(
        json.dumps(full_state, ensure_ascii=False, indent=1), encoding="utf-8")))
    manifest = {"format_version": FORMAT_VERSION, "files": {}}
    for name, write in files:
        atomic_write(folder / name, write)
        manifest["files"][name] = {
            "size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name),
        }
        fault_point(name, step)
    write_json(folder / MANIFEST, manifest)
    fault_point(MANIFEST, step)
    fsync_dir(folder)


def _separate_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of the weights in which no two share memory, as safetensors requires: a tied
    head (``--tie-embeddings``) is the embedding table under a second name and is stored twice."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _tokenizer_file(state: dict) -> tuple[dict, str | None]:
    """A BPE tokenizer is saved as its own ``tokenizer.json`` (loadable by ``tokenizers`` as it
    is, and covered by the manifest); ``state.json`` then names the file instead of holding it."""
    tok = state.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("tokenizer_json"), str):
        return state, None
    described = {k: v for k, v in tok.items() if k != "tokenizer_json"}
    return {**state, "tokenizer": {**described, "file": TOKENIZER}}, tok["tokenizer_json"]


def _with_tokenizer(ckpt_dir: Path, state: dict) -> dict:
    """``state`` with the tokenizer its ``tokenizer.json`` holds read back in (see
    ``_tokenizer_file``)."""
    tok = state.get("tokenizer")
    if not isinstance(tok, dict) or tok.get("file") != TOKENIZER:
        return state
    try:
        text = (Path(ckpt_dir) / TOKENIZER).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{TOKENIZER} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {TOKENIZER}: {_one_line(e)}") from None
    described = {k: v for k, v in tok.items() if k != "file"}
    return {**state, "tokenizer": {**described, "tokenizer_json": text}}


def _remove_tree(path: Path) -> None:
    """Delete a folder: first renamed to a hidden name (atomic), then removed."""
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{os.urandom(3).hex()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    rng_state: dict | None = None,
) -> Path:
    """Write one complete checkpoint as the folder ``ckpt_dir``; ``state`` must describe the model.

    The files are written into a hidden partial folder beside ``ckpt_dir`` which is renamed into
    place once its manifest is written, so ``ckpt_dir`` is either absent, the old checkpoint, or
    the complete new one. Non-finite weights or optimizer state are refused before anything is
    written.
    """
    ckpt_dir = Path(ckpt_dir)
    weights = _separate_tensors(model.state_dict())
    bad = _nonfinite_tensor(weights)
    if bad:
        raise TinyGPTError(f"refusing to save a checkpoint: weight {bad} is not finite")
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    if optimizer_state is not None and _nonfinite_tensor(optimizer_state):
        raise TinyGPTError("refusing to save a checkpoint: the optimizer state is not finite")
    parent = ckpt_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=parent, prefix=f".{ckpt_dir.name}.partial-"))
    try:
        os.chmod(partial, usual_mode(0o777))
        _write_checkpoint_files(partial, weights, optimizer_state, rng_state, state)
        if ckpt_dir.exists() or ckpt_dir.is_symlink():
            _remove_tree(ckpt_dir)
        os.replace(partial, ckpt_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_dir(parent)
    return ckpt_dir


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


LINK_NAMES = ("last", "best")  # the run directory's links (or pointer files) to step folders
_POINTER_MAX_BYTES = 256  # a pointer file holds one step folder's name


def point_link(run_dir: Path, name: str, target: str) -> None:
    """Point ``run_dir/name`` at the step folder ``target``, atomically replacing what was there.

    A symbolic link where the platform lets this process make one; otherwise a pointer file
    holding ``target`` (see the module docstring). A real folder of that name (format 1) is left
    alone.
    """
    link = Path(run_dir) / name
    if link.is_dir() and not link.is_symlink():
        return
    tmp = link.with_name(f".{name}.link-{os.getpid()}")
    try:
        _remove_entry(tmp)
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, link)
        return
    except OSError:  # no symbolic links here (or none over this entry): a pointer file
        _remove_entry(tmp)
    if link.is_symlink():  # Windows does not rename a file over a link to a folder
        _remove_entry(link)
    atomic_write(link, lambda tmp: Path(tmp).write_text(target + "\n", encoding="utf-8"))


def _remove_entry(path: Path) -> None:
    """Remove a file, a pointer file or a symbolic link (Windows removes links to folders with
    ``rmdir``); never a real folder."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        if path.is_symlink():
            os.rmdir(path)
        elif path.exists() and not path.is_dir():
            raise


def remove_link(run_dir: Path, name: str) -> None:
    """Remove the link or pointer file ``run_dir/name`` if there is one (a real folder stays)."""
    link = Path(run_dir) / name
    if link.is_symlink() or link.is_file():
        _remove_entry(link)


def read_pointer(path: Path) -> str | None:
    """The step folder name a pointer file holds, or None if ``path`` is not a pointer file."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _POINTER_MAX_BYTES:
            return None
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if STEP_DIR.fullmatch(text) else None


def resolve_link(path: Path) -> Path | None:
    """The folder ``path`` stands for: the target of a symbolic link, the step folder a pointer
    file names, a real folder itself; None when it stands for no existing folder."""
    path = Path(path)
    if path.is_symlink():
        target = path.parent / os.readlink(path)
    elif path.is_dir():
        return path
    else:
        name = read_pointer(path)
        if name is None:
            return None
        target = path.parent / name
    return target if target.is_dir() else None


def link_target(run_dir: Path, name: str) -> Path | None:
    """The checkpoint folder ``run_dir/name`` (``last`` or ``best``) points at, or None."""
    return resolve_link(Path(run_dir) / name)


def resolve_run_path(path: Path) -> Path:
    """A path given to a reader (sample, eval, serve, export, ``--resume``, ``--init-from``):
    ``RUN_DIR/best`` or ``RUN_DIR/last`` as a pointer file becomes the step folder it names, as a
    symbolic link would; anything else is returned as it is."""
    path = Path(path)
    if read_pointer(path) is not None:
        target = resolve_link(path)
        if target is not None:
            return target
    return path


def list_step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-NNNNNN`` folder, newest first."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        m = STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            out.append((int(m.group(1)), p))
    return sorted(out, key=lambda t: t[0], reverse=True)


def prune_checkpoints(run_dir: Path, keep: int, protect: set[int]) -> None:
    """Remove step folders except those in ``protect`` and the ``keep`` newest others."""
    others = [(s, p) for s, p in list_step_dirs(run_dir) if s not in protect]
    for _, path in others[keep:]:
        _remove_tree(path)


def save_run_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rng_state: dict,
    is_best: bool,
    keep: int,
) -> Path:
    """Save step ``state["step"]`` as ``run_dir/step-NNNNNN``, point ``last`` (and ``best``)
    at it, then prune older step folders beyond ``keep`` (``last`` and ``best`` always stay)."""
    run_dir = Path(run_dir)
    step = int(state["step"])
    folder = save_checkpoint(run_dir / step_dir_name(step), model, optimizer, state, rng_state)
    fault_point("commit", step)
    point_link(run_dir, "last", folder.name)
    if is_best:
        point_link(run_dir, "best", folder.name)
    fsync_dir(run_dir)
    fault_point("link", step)
    protect = {step}
    if state.get("best_step") is not None:
        protect.add(int(state["best_step"]))
    prune_checkpoints(run_dir, keep, protect)
    return folder


def sweep_partials(run_dir: Path) -> list[Path]:
    """Remove what interrupted saves left behind (hidden partial folders, trash, temp links)."""
    removed = []
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return removed
    for p in entries:
        n = p.name
        if n.startswith(".step-") and ".partial-" in n or n.startswith(".trash-") or (
            n.startswith((".last.link-", ".best.link-"))
        ) or (n.startswith((".metrics.jsonl.", ".last.", ".best.")) and n.endswith(".tmp")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: nn.Module
    tokenizer: Tokenizer

    @property
    def model_kind(self) -> str:
        return self.state["model"]

    @property
    def block_size(self) -> int | None:
        return self.state["model_config"].get("block_size")


@dataclass
class TrainingCheckpoint:
    """Everything needed to continue a run exactly: weights, optimizer, random states, state."""

    path: Path
    state: dict
    weights: dict[str, torch.Tensor]
    optimizer_state: dict
    rng_state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path, path.name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _one_line(e: BaseException | str) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def read_state(ckpt_dir: Path) -> dict:
    """The checkpoint's ``state.json`` (no manifest check; see ``verify_checkpoint``)."""
    path = Path(ckpt_dir) / STATE
    try:
        state = _read_json(path)
    except CheckpointError as e:
        raise TinyGPTError(f"cannot read {path}: {e}") from None
    check_format(path, state.get("format_version"))
    try:
        return _with_tokenizer(Path(ckpt_dir), state)
    except CheckpointError as e:
        raise TinyGPTError(f"cannot read {Path(ckpt_dir) / TOKENIZER}: {e}") from None


def check_format(path: Path, version) -> None:
    """Refuse, in one line, a checkpoint that this tinygpt does not read."""
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        raise TinyGPTError(
            f"{path} was made by an older, pre-release tinygpt (checkpoint format {version}); "
            f"this one reads format {FORMAT_VERSION}: retrain the model with this version"
        )
    raise TinyGPTError(
        f"{path} has checkpoint format version {version!r}; this tinygpt reads version "
        f"{FORMAT_VERSION} (upgrade tinygpt or retrain)"
    )


def verify_checkpoint(ckpt_dir: Path) -> dict:
    """Check the manifest (sizes and sha256 of every file) and return the parsed ``state.json``.

    Raises ``CheckpointError`` saying what is wrong, ``TinyGPTError`` for a checkpoint of another
    format version.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError("no such checkpoint folder")
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.exists():
        if (ckpt_dir / STATE).is_file():  # pre-release folders had no manifest
            check_format(ckpt_dir / STATE, _read_json(ckpt_dir / STATE).get("format_version"))
        raise CheckpointError(f"{MANIFEST} is missing (the save never completed)")
    manifest = _read_json(manifest_path)
    files = manifest.get("files")
    version = manifest.get("format_version")
    check_format(manifest_path, version)
    if not isinstance(files, dict):
        raise CheckpointError(f"{MANIFEST} lists no files")
    if STATE not in files or WEIGHTS not in files:
        raise CheckpointError(f"{MANIFEST} does not list {STATE} and {WEIGHTS}")
    for name, meta in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{MANIFEST} lists a bad file name {name!r}")
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if not isinstance(meta, dict) or path.stat().st_size != meta.get("size"):
            raise CheckpointError(
                f"{name} has {path.stat().st_size} bytes, {MANIFEST} says {meta.get('size')!r} "
                f"(truncated or modified)"
            )
        if sha256_file(path) != meta.get("sha256"):
            raise CheckpointError(
                f"{name} does not match its sha256 in {MANIFEST} (damaged or modified)"
            )
    state = _read_json(ckpt_dir / STATE)
    if state.get("format_version") != version:
        raise CheckpointError(
            f"{STATE} has format version {state.get('format_version')!r}, expected {version}"
        )
    tok = state.get("tokenizer")
    if isinstance(tok, dict) and tok.get("file") == TOKENIZER and TOKENIZER not in files:
        raise CheckpointError(f"{MANIFEST} does not list {TOKENIZER}")
    return _with_tokenizer(ckpt_dir, state)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a damaged file or NaN/Inf values raise ``CheckpointError``."""
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path.name} is not a readable safetensors file (truncated or garbled: {_one_line(e)})"
        ) from None
    bad = _nonfinite_tensor(weights)
    if bad:
        raise CheckpointError(f"{path.name}: tensor {bad} holds NaN or Inf")
    return weights


def load_tensor_file(path: Path) -> dict:
    """A ``torch.save`` file holding only tensors and plain data; never unpickles anything else."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path.name} holds Python objects other than tensors and plain data; refused to load "
            f"it (damaged or tampered with: {_one_line(e)})"
        ) from None
    except (RuntimeError, OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path.name} is not readable ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} does not hold a dictionary")
    return obj


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / MANIFEST).exists() or (path / STATE).exists()


def _candidates(run_dir: Path, which: str) -> list[Path]:
    """Checkpoint folders to try, in order of preference."""
    if _is_checkpoint_folder(run_dir):  # a checkpoint folder given directly: no fallback
        return [run_dir]
    steps = [p for _, p in list_step_dirs(run_dir)]
    legacy = [run_dir / n for n in ("last",) if (run_dir / n).is_dir()
              and not (run_dir / n).is_symlink()]
    order = steps + legacy
    if which == "best":
        best = link_target(run_dir, "best")
        if best is not None:
            order = [best] + order
    out, seen = [], set()
    for p in order:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _first_usable(run_dir: Path, candidates: list[Path], load, warn: Warn | None):
    """``load(folder)`` for the first candidate that loads; warns about the ones skipped."""
    warn = warn or warn_stderr
    failures: list[tuple[Path, CheckpointError]] = []
    for folder in candidates:
        try:
            result = load(folder)
        except CheckpointError as e:
            failures.append((folder, e))
            continue
        for bad, err in failures:
            warn(f"checkpoint {bad} is not usable ({err}); using {folder} instead")
        return result
    if failures:
        folder, err = failures[0]
        n = len(failures) - 1
        more = f" (and {n} older checkpoint(s) failed too)" if n else ""
        raise TinyGPTError(f"cannot load checkpoint {folder}: {err}{more}")
    raise TinyGPTError(
        f"{run_dir} holds no checkpoint (train one with: tinygpt train --out {run_dir})"
    )


def find_checkpoint(run_dir: Path, which: str = "best", warn: Warn | None = None) -> Path:
    """The verified checkpoint folder to load from a run directory.

    ``best`` falls back to ``last``; ``last`` is the newest step folder that verifies.
    """
    run_dir = resolve_run_path(Path(run_dir))
    if not run_dir.is_dir():
        raise TinyGPTError(f"no such run directory: {run_dir}")

    def check(folder: Path) -> Path:
        verify_checkpoint(folder)
        return folder

    return _first_usable(run_dir, _candidates(run_dir, which), check, warn)


def _model_from(folder: Path, state: dict) -> tuple[nn.Module, Tokenizer]:
    own = is_learner_kind(state.get("model"))  # a class of the learner's own, from its file
    try:
        config = (LearnerConfig(**state["model_config"]) if own
                  else make_config(state["model"], state["model_config"]))
        tokenizer = tokenizer_from_dict(state["tokenizer"])
    except (KeyError, TypeError, ValueError, TinyGPTError) as e:
        raise CheckpointError(
            f"{STATE} is not a valid checkpoint description: {_one_line(e)}"
        ) from None
    # The learner's file is imported again: a missing or changed file is one line (TinyGPTError).
    model = build_recorded(config) if own else build_model(state["model"], config)
    weights = load_weights(folder / WEIGHTS)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{WEIGHTS} does not fit the model: {_one_line(e)}") from None
    return model, tokenizer


def load_checkpoint(
    run_dir: Path,
    which: str = "best",
    device: str | torch.device = "cpu",
    warn: Warn | None = None,
) -> Checkpoint:
    """Load model and tokenizer from a run directory (or a checkpoint folder).

    Every candidate is verified against its manifest; a damaged one is skipped with a warning.
    """
    run_dir = resolve_run_path(Path(run_dir))
    if not run_dir.is_dir():
        raise TinyGPTError(f"no such run directory: {run_dir}")

    def load(folder: Path) -> Checkpoint:
        state = verify_checkpoint(folder)
        model, tokenizer = _model_from(folder, state)
        return Checkpoint(folder, state, model, tokenizer)

    ckpt = _first_usable(run_dir, _candidates(run_dir, which), load, warn)
    ckpt.model.to(device)
    follow_device(ckpt.model, device)
    ckpt.model.eval()
    return ckpt


def check_grad_scaler(saved) -> None:
    """Refuse a ``grad_scaler`` entry of ``state.json`` that is not a scaler's state (None: the
    run was not in float16)."""
    if saved is None:
        return
    numbers = isinstance(saved, dict) and all(
        isinstance(saved.get(k), (int, float)) and not isinstance(saved.get(k), bool)
        for k in GRAD_SCALER_KEYS)
    scale = saved.get("scale") if numbers else None
    if scale is None or not (0 < scale < float("inf")):
        raise CheckpointError(f"{STATE} holds a damaged grad_scaler (the float16 loss scale)")


def load_training_checkpoint(run_dir: Path, warn: Warn | None = None) -> TrainingCheckpoint:
    """The newest complete checkpoint of a run with its optimizer and random states."""
    run_dir = resolve_run_path(Path(run_dir))
    if not run_dir.is_dir():
        raise TinyGPTError(f"no such run directory: {run_dir}")
    if (run_dir / MANIFEST).exists():
        raise TinyGPTError(
            f"{run_dir} is a single checkpoint; resume the run directory that holds it "
            f"(--resume {run_dir.parent})"
        )
    candidates = [p for _, p in list_step_dirs(run_dir)]
    if not candidates:
        if (run_dir / "last").is_dir():
            read_state(run_dir / "last")  # a pre-release run says so
        raise TinyGPTError(f"{run_dir} holds no checkpoint to resume")

    def load(folder: Path) -> TrainingCheckpoint:
        state = verify_checkpoint(folder)
        for key in ("step", "model", "model_config", "tokenizer", "train_config", "data"):
            if key not in state:
                raise CheckpointError(f"{STATE} lacks {key!r}")
        model, _ = _model_from(folder, state)  # the weights fit the described model
        weights = model.state_dict()
        optimizer_state = load_tensor_file(folder / OPTIMIZER)
        if _nonfinite_tensor(optimizer_state):
            raise CheckpointError(f"{OPTIMIZER} holds NaN or Inf")
        rng_state = load_tensor_file(folder / RNG)
        for key in ("python", "numpy", "torch_cpu"):
            if key not in rng_state:
                raise CheckpointError(f"{RNG} lacks the {key!r} random state")
        check_grad_scaler(state.get("grad_scaler"))
        return TrainingCheckpoint(folder, state, weights, optimizer_state, rng_state)

    return _first_usable(run_dir, candidates, load, warn)
