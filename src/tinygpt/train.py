"""The training loop: sample a batch, compute the loss, backpropagate, step the optimizer.

Around that core: a learning-rate schedule (linear warmup, then cosine or warmup-stable-decay),
gradient clipping, periodic evaluation, a progress bar, ``metrics.jsonl`` and checkpoints.
``--max-time`` budgets training time: evaluations and checkpoints do not eat into it, so how often
one evaluates does not change what the budget buys.

A run survives being stopped: SIGINT or SIGTERM finish the current step and save a checkpoint,
and ``train(cfg, resume=...)`` (``tinygpt train --resume RUN_DIR``) continues from the newest
complete checkpoint with the model, optimizer, schedule position, step, best val loss, time used
and every random state restored. On the CPU a resumed run ends bitwise identical to a run that
never stopped, whether it was stopped by a signal, a crash or SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from tinygpt.checkpoint import (
    Checkpoint,
    TrainingCheckpoint,
    Warn,
    atomic_write,
    fault_point,
    find_checkpoint,
    list_step_dirs,
    load_checkpoint,
    load_training_checkpoint,
    point_link,
    prune_checkpoints,
    read_state,
    save_run_checkpoint,
    step_dir_name,
    sweep_partials,
    warn_stderr,
)
from tinygpt.config import TrainConfig
from tinygpt.data import BUILTIN_DATASETS, Corpus, load_corpus
from tinygpt.device import autocast_dtype, mps_available, pick_device
from tinygpt.errors import TinyGPTError, TrainingInterrupted
from tinygpt.evaluate import evaluate_tokens
from tinygpt.generate import SamplingConfig, generate_tokens, make_generator
from tinygpt.models import GPTConfig, build_model, make_config
from tinygpt.optim import (
    CombinedOptimizer,
    batch_size_at,
    build_optimizer,
    lr_factor,
    tokens_seen,
)
from tinygpt.tokenizer import CharTokenizer

# Settings that --resume may change: none of them changes what a step computes beyond rounding
# (device and compile reorder float arithmetic; max_steps and max_time do re-stretch the cosine
# schedule over the new length -- that is what extending means).
RESUME_MAY_CHANGE = (
    "max_steps", "max_time", "device", "compile", "eval_interval", "sample_chars", "keep",
)
# With --init-from the model's shape comes from the source checkpoint (and must match if given);
# dropout and causal default to the source's values but may be changed for fine-tuning.
INIT_DEFAULT_KEYS = {"gpt": ("dropout", "attn_dropout", "causal"), "bigram": ()}
INIT_SHAPE_KEYS = {
    "gpt": tuple(f.name for f in fields(GPTConfig)
                 if f.name != "vocab_size" and f.name not in INIT_DEFAULT_KEYS["gpt"]),
    "bigram": (),
}
_GPT_DEFAULTS = {f.name: f.default for f in fields(GPTConfig)}  # for checkpoints older than a field


def saved_model_config(state: dict) -> dict:
    """The model config a checkpoint's ``state.json`` describes, in today's spelling: fields added
    since it was written take their defaults, older spellings (``qk_norm`` true/false) are read
    as they were meant."""
    mc = dict(state.get("model_config") or {})
    if state.get("model") != "gpt":
        return mc
    try:
        return make_config("gpt", {**_GPT_DEFAULTS, **mc}).to_dict()
    except (TypeError, ValueError):
        return mc  # an invalid description is reported where the weights are loaded


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> CombinedOptimizer:
    """The optimizer ``cfg`` asks for (see ``tinygpt.optim``)."""
    return build_optimizer(
        model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr,
    )


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    model: nn.Module
    tokenizer: CharTokenizer
    sample: str


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _data_record(cfg: TrainConfig, corpus: Corpus) -> dict:
    spec = cfg.data
    if not (spec in BUILTIN_DATASETS and not Path(spec).exists()):
        spec = str(Path(spec).expanduser().resolve())
    return {
        "spec": spec,
        "fingerprint": corpus.fingerprint,
        "encoding_errors": cfg.encoding_errors,
        "num_tokens": len(corpus.tokens),
    }


# ------------------------------------------------------------------------------- random states


def capture_rng(batch_gen: torch.Generator) -> dict:
    """Every random state a run draws from: Python, numpy, torch (CPU, CUDA, MPS), the batches."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
        "batch_gen": batch_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # else it was never drawn from
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():
        state["torch_mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: dict, batch_gen: torch.Generator) -> None:
    """Undo ``capture_rng``: the next random draws are the ones the saved run would have made."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch_cpu"])
        batch_gen.set_state(state["batch_gen"])
        cuda = state.get("torch_cuda")
        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda is not None and n_cuda and len(cuda) == n_cuda:
            torch.cuda.set_rng_state_all(cuda)
        mps = state.get("torch_mps")
        if mps is not None and mps_available():
            torch.mps.set_rng_state(mps)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise TinyGPTError(f"the checkpoint's random states cannot be restored: {e}") from None


# ---------------------------------------------------------------------------- the run directory


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` so that two processes never write checkpoints into one run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TinyGPTError(
                f"another tinygpt process is training in {run_dir}; wait for it or stop it first"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    names = ("last", "best", "metrics.jsonl")
    existing = [run_dir / n for n in names if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    existing += [p for _, p in list_step_dirs(run_dir)]
    if existing and not overwrite:
        raise TinyGPTError(
            f"{run_dir} already holds a run; choose another --out, pass --overwrite to replace it, "
            f"or continue it with --resume {run_dir}"
        )
    for p in existing:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    sweep_partials(run_dir)


def _truncate_metrics(path: Path, step: int, record: dict | None) -> None:
    """Keep the lines of ``metrics.jsonl`` before ``step`` (and ``record`` for ``step`` itself).

    Lines past the checkpoint came from the part of the run that is being redone; a line cut
    short by a crash ends the kept part.
    """
    kept: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            s = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            break
        if not isinstance(s, int) or s >= step:
            break
        kept.append(line)
    if record is not None:
        kept.append(json.dumps(record))
    text = "".join(x + "\n" for x in kept)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _prepare_resume_dir(
    run_dir: Path, ckpt: TrainingCheckpoint, keep: int, warn: Warn
) -> None:
    sweep_partials(run_dir)
    for s, p in list_step_dirs(run_dir):
        if s > ckpt.step:  # newer than the newest usable checkpoint: it failed to load
            dest = p.with_name(p.name + ".damaged")
            i = 1
            while dest.exists():
                i += 1
                dest = p.with_name(f"{p.name}.damaged{i}")
            os.replace(p, dest)
            warn(f"moved the unusable checkpoint {p} aside to {dest.name}")
    point_link(run_dir, "last", ckpt.path.name)
    best_step = ckpt.state.get("best_step")
    best = run_dir / "best"
    if best_step is not None and (run_dir / step_dir_name(best_step)).is_dir():
        point_link(run_dir, "best", step_dir_name(best_step))
    elif best.is_symlink() and not best.exists():
        best.unlink()
    protect = {ckpt.step} if best_step is None else {ckpt.step, best_step}
    prune_checkpoints(run_dir, keep, protect)
    _truncate_metrics(run_dir / "metrics.jsonl", ckpt.step,
                      ckpt.state.get("metrics") if ckpt.state.get("evaluated") else None)


# ----------------------------------------------------------------------- resume and --init-from


def prepare_resume(
    run_dir: Path, given: dict | None = None, warn: Warn | None = None
) -> tuple[TrainConfig, TrainingCheckpoint]:
    """The configuration and checkpoint to continue the run in ``run_dir``.

    The run's own saved configuration is used. ``given`` (flags and TOML settings) may change only
    the settings in ``RESUME_MAY_CHANGE``; ``data`` may name the same text at a new place (its
    fingerprint must match); any other setting must equal the saved one.
    """
    run_dir = Path(run_dir)
    given = dict(given or {})
    if given.pop("overwrite", False):
        raise TinyGPTError("--overwrite and --resume contradict each other; pass one of them")
    if given.get("init_from"):
        raise TinyGPTError(
            "--init-from starts a new run and --resume continues one; pass one of them"
        )
    given.pop("init_from", None)
    out = given.pop("out", None)
    if out is not None and Path(out).expanduser().resolve() != run_dir.resolve():
        raise TinyGPTError(f"--out {out} is not the run being resumed ({run_dir}); leave --out out")
    data = given.pop("data", None)
    ckpt = load_training_checkpoint(run_dir, warn)
    # A setting added since the checkpoint was written had its default value in that run.
    known = {f.name: f.default for f in fields(TrainConfig)}
    saved = {**known, **ckpt.state["train_config"]}
    allowed = ", ".join(_flag(k) for k in RESUME_MAY_CHANGE)
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE:
            continue
        if key not in known:
            raise TinyGPTError(f"unknown setting {key!r}")
        if value != saved[key]:
            raise TinyGPTError(
                f"{_flag(key)} {value} differs from the run's {key} = {saved[key]!r}; --resume "
                f"continues a run as it was configured (only {allowed} and --data for the same "
                f"text may be given); to start a new run from its weights use --init-from {run_dir}"
            )
    merged = {**saved, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}
    merged.update(out=str(run_dir), overwrite=False, init_from=saved.get("init_from"))
    merged["data"] = data if data is not None else ckpt.state["data"]["spec"]
    try:
        cfg = TrainConfig(**merged)
    except TypeError as e:
        raise TinyGPTError(
            f"the settings saved in {ckpt.path} are not understood by this tinygpt: {e}"
        ) from None
    if cfg.max_steps is not None and cfg.max_steps < ckpt.step:
        raise TinyGPTError(
            f"--max-steps {cfg.max_steps} is below the step of the checkpoint ({ckpt.step}); "
            f"give a larger --max-steps to train further"
        )
    return cfg, ckpt


def settings_for_init_from(settings: dict, warn: Warn | None = None) -> dict:
    """``settings`` with the model kind and shape taken from the ``init_from`` checkpoint.

    A shape setting given explicitly must match the checkpoint's.
    """
    source = Path(settings["init_from"])
    state = read_state(find_checkpoint(source, "best", warn))
    kind, mc = state.get("model"), saved_model_config(state)
    if settings.get("model", kind) != kind:
        raise TinyGPTError(f"--model {settings['model']} does not match {source}, a {kind} model")
    out = {**settings, "model": kind}
    for key in INIT_SHAPE_KEYS.get(kind, ()):
        value = mc.get(key, _GPT_DEFAULTS[key])
        if key in settings and settings[key] != value:
            raise TinyGPTError(
                f"{_flag(key)} {settings[key]} does not match {source}, whose {key} is "
                f"{value!r}; --init-from keeps the model's architecture"
            )
        out[key] = value
    for key in INIT_DEFAULT_KEYS.get(kind, ()):
        out.setdefault(key, mc.get(key, _GPT_DEFAULTS[key]))
    return out


def _corpus_for_vocab(cfg: TrainConfig, corpus: Corpus, init: Checkpoint) -> Corpus:
    """The corpus encoded with the vocabulary of the model being fine-tuned."""
    if corpus.tokenizer == init.tokenizer:
        return corpus
    unknown = init.tokenizer.unknown_chars("".join(corpus.tokenizer.chars))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise TinyGPTError(
            f"{cfg.data} has {len(unknown)} character(s) that the model in {cfg.init_from} does "
            f"not know ({shown}{more}); --init-from needs a text within the model's vocabulary"
        )
    return load_corpus(cfg.data, cfg.encoding_errors, tokenizer=init.tokenizer)


def _init_weights_from(model: nn.Module, cfg: TrainConfig, model_config, init: Checkpoint) -> None:
    if init.model_kind != cfg.model:
        raise TinyGPTError(
            f"--init-from {cfg.init_from} holds a {init.model_kind} model, not {cfg.model}"
        )
    mc = saved_model_config(init.state)
    for key in ("vocab_size", *INIT_SHAPE_KEYS.get(cfg.model, ())):
        if getattr(model_config, key) != mc.get(key, _GPT_DEFAULTS.get(key)):
            raise TinyGPTError(
                f"the model of {cfg.init_from} has {key} = {mc.get(key)!r}, this run "
                f"{getattr(model_config, key)!r}; --init-from needs the same shape"
            )
    try:
        model.load_state_dict(init.model.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TinyGPTError(
            f"the weights of {cfg.init_from} do not fit this model: {first}"
        ) from None


def _resume_corpus(cfg: TrainConfig, ckpt: TrainingCheckpoint) -> Corpus:
    data = ckpt.state["data"]
    corpus = load_corpus(cfg.data, cfg.encoding_errors)
    if corpus.fingerprint != data.get("fingerprint"):
        raise TinyGPTError(
            f"the text {cfg.data} is not the one the run was trained on (fingerprint "
            f"{corpus.fingerprint[:12]}, the run's is {str(data.get('fingerprint'))[:12]}); "
            f"--resume needs the same text -- to train on this one start a new run with "
            f"--init-from {cfg.run_dir}"
        )
    tokenizer = CharTokenizer.from_dict(ckpt.state["tokenizer"])
    if corpus.tokenizer != tokenizer:  # a fine-tuned run keeps its source model's vocabulary
        corpus = load_corpus(cfg.data, cfg.encoding_errors, tokenizer=tokenizer)
    return corpus


# ------------------------------------------------------------------------------------- signals


class _SignalCatcher:
    """First SIGINT/SIGTERM: note it (the loop saves and stops). Second: abort at once."""

    def __init__(self, enabled: bool) -> None:
        self.signum: int | None = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum, saved=False)
        self.signum = signum

    def __enter__(self) -> _SignalCatcher:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------ training


@torch.no_grad()
def estimate_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    progress_bar: bool | None = None,
    resume: TrainingCheckpoint | None = None,
    warn: Warn | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Train a model as ``cfg`` says; returns the final model and its losses.

    ``resume`` (from ``prepare_resume``) continues a run from its checkpoint. ``progress_bar=None``
    shows the bar only when stderr is a terminal. With ``handle_signals`` (and in the main thread)
    SIGINT/SIGTERM save a checkpoint and raise ``TrainingInterrupted``.
    """
    warn = warn or warn_stderr
    run_dir = Path(cfg.run_dir)
    device = pick_device(cfg.device)
    init = None
    if resume is not None:
        corpus = _resume_corpus(cfg, resume)
    else:
        corpus = load_corpus(cfg.data, cfg.encoding_errors)
        if cfg.init_from:
            init = load_checkpoint(Path(cfg.init_from), "best", "cpu", warn)
            corpus = _corpus_for_vocab(cfg, corpus, init)
    corpus.check_block_size(cfg.block_size)
    tokenizer = corpus.tokenizer

    torch.manual_seed(cfg.seed)
    model_config = cfg.model_config(tokenizer.vocab_size)
    model = build_model(cfg.model, model_config)
    if init is not None:
        _init_weights_from(model, cfg, model_config, init)
    if resume is not None:
        # Filled in with today's defaults: a field added since the checkpoint was written
        # does not make it a different model.
        saved_model = (resume.state["model"], saved_model_config(resume.state))
        if saved_model != (cfg.model, model_config.to_dict()):
            raise TinyGPTError(
                f"the checkpoint {resume.path} holds a different model than its run's settings "
                f"describe; it cannot be resumed"
            )
        model.load_state_dict(resume.weights)
    model.to(device)
    optimizer = configure_optimizer(model, cfg)
    if resume is not None:
        try:
            optimizer.load_state_dict(resume.optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TinyGPTError(f"the optimizer state in {resume.path} does not fit: {e}") from None

    with _run_lock(run_dir):
        if resume is not None:
            _prepare_resume_dir(run_dir, resume, cfg.keep, warn)
        else:
            _prepare_run_dir(run_dir, cfg.overwrite)
        return _train_loop(cfg, log, progress_bar, resume, init, handle_signals, run_dir, device,
                           corpus, model_config, model, optimizer)


def _train_loop(cfg, log, progress_bar, resume, init, handle_signals, run_dir, device, corpus,
                model_config, model, optimizer) -> TrainResult:
    tokenizer = corpus.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model {cfg.model} ({cfg.preset}): {n_params / 1e6:.3f}M parameters, vocab "
        f"{tokenizer.vocab_size}, {len(corpus.tokens):,} tokens, device {device}, run {run_dir}"
    )
    if init is not None:
        log(f"weights from {init.path} (step {init.state.get('step')}); new optimizer and schedule")
    amp_dtype = autocast_dtype(cfg.dtype, device)
    if amp_dtype is not None:
        log("mixed precision: bfloat16 matrix products, float32 weights and optimizer")
    # The compiled module shares the model's parameters; evaluation, checkpoints and sampling use
    # the plain model. Compilation happens in the first training step and counts as its time.
    forward = torch.compile(model) if cfg.compile else model
    if cfg.compile:
        log("compiling the model with torch.compile: the first step takes a while")

    # Batches come from their own generators: training draws never depend on evaluation. The
    # evaluation batches are drawn once from a fixed seed, so a resumed run gets the same ones.
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    B, T = cfg.batch_size, cfg.block_size
    eval_batches = {
        split: [
            tuple(t.to(device) for t in corpus.get_batch(split, B, T, eval_gen))
            for _ in range(cfg.eval_iters)
        ]
        for split in ("train", "val")
    }

    max_steps, max_time = cfg.max_steps, cfg.max_time_s
    base_state = {
        "model": cfg.model,
        "model_config": model_config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "train_config": cfg.to_dict(),
        "data": _data_record(cfg, corpus),
    }
    metrics_path = run_dir / "metrics.jsonl"
    best_val, best_step = math.inf, None
    train_loss = val_loss = math.nan
    tokens_per_s = 0.0
    step, elapsed = 0, 0.0  # elapsed: training time, without evaluations and checkpoints

    def progress_of(step: int, elapsed: float) -> float:
        p = 0.0
        if max_steps:
            span = max(max_steps - cfg.warmup_steps, 1)
            p = max(p, (step - cfg.warmup_steps) / span)
        if max_time:
            p = max(p, elapsed / max_time)
        return p

    def factor_at(step: int, elapsed: float) -> float:
        return lr_factor(cfg.schedule, step, progress_of(step, elapsed), cfg.warmup_steps,
                         cfg.min_lr_ratio, cfg.decay_fraction)

    lr = cfg.lr * factor_at(0, 0.0)
    saved_step = None  # the step of the newest checkpoint on disk
    if resume is not None:
        st = resume.state
        step, elapsed = resume.step, float(st["elapsed_s"])
        best_val = st["best_val_loss"] if st.get("best_val_loss") is not None else math.inf
        best_step = st.get("best_step")
        train_loss, val_loss = st.get("train_loss", math.nan), st.get("val_loss", math.nan)
        lr, tokens_per_s = st.get("lr", lr), st.get("tokens_per_s", 0.0)
        saved_step = step
        log(f"resuming from {resume.path} at step {step}")
        if max_steps is not None and step >= max_steps:
            log(f"the run already reached --max-steps {max_steps}; give a larger one to go further")

    def save(step: int, elapsed: float, record: dict | None, improved: bool) -> None:
        nonlocal saved_step
        state = {
            **base_state, "step": step, "train_loss": train_loss, "val_loss": val_loss,
            "best_val_loss": None if math.isinf(best_val) else best_val, "best_step": best_step,
            "elapsed_s": elapsed, "lr": lr, "tokens_per_s": tokens_per_s,
            "evaluated": record is not None, "metrics": record,
        }
        save_run_checkpoint(run_dir, model, optimizer, state, capture_rng(batch_gen),
                            is_best=improved, keep=cfg.keep)
        saved_step = step

    def evaluate_and_save(step: int, elapsed: float) -> None:
        nonlocal best_val, best_step, train_loss, val_loss
        train_loss = estimate_loss(model, eval_batches["train"])
        if cfg.full_val:
            val_loss = evaluate_tokens(model, corpus.split("val"), T, batch_size=64,
                                       device=device)["val_loss"]
        else:
            val_loss = estimate_loss(model, eval_batches["val"])
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise TinyGPTError(
                f"the evaluation at step {step} gave loss {val_loss}: the weights are no longer "
                f"finite; nothing was saved{_newest(saved_step)} -- try a lower --lr"
            )
        record = {
            "step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
            "tokens": tokens_seen(step, B, cfg.batch_start, cfg.batch_warmup_steps, T),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 1),
        }
        improved = val_loss < best_val
        if improved:
            best_val, best_step = val_loss, step
        # The checkpoint first, then the log line: a resumed run restores the line from the
        # checkpoint if a crash came between the two.
        save(step, elapsed, record, improved)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        bar.write(f"step {step:>6}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")

    total = max_steps if max_time is None else None
    bar = tqdm(total=total, initial=step,
               disable=(not progress_bar) if progress_bar is not None else None,
               unit="step", dynamic_ncols=True, leave=False)
    model.train()
    skip_eval_at = step if resume is not None and resume.state.get("evaluated") else None
    if resume is not None:
        restore_rng(resume.rng_state, batch_gen)  # last: nothing may draw after this
    catcher = _SignalCatcher(handle_signals)
    try:
        with catcher, warnings.catch_warnings():
            # Inductor leaves the complex multiply of the rotary embeddings to PyTorch's own
            # kernel and warns that this may be slow; measured, the compiled step is no slower.
            warnings.filterwarnings("ignore", "Torchinductor does not support code generation "
                                    "for complex operators")
            while True:
                done = (max_steps is not None and step >= max_steps) or (
                    max_time is not None and elapsed >= max_time
                )
                if (step % cfg.eval_interval == 0 or done) and step != skip_eval_at:
                    evaluate_and_save(step, elapsed)
                if done:
                    break
                if catcher.signum is not None:
                    if saved_step != step:
                        name = signal.Signals(catcher.signum).name
                        log(f"{name}: saving a checkpoint at step {step} (send it again to "
                            f"abort at once)")
                        save(step, elapsed, None, False)
                    raise TrainingInterrupted(catcher.signum, saved=True)

                t_step = time.perf_counter()
                factor = factor_at(step, elapsed)
                lr = cfg.lr * factor
                for group in optimizer.param_groups:  # each group follows the curve from its peak
                    group["lr"] = group["base_lr"] * factor
                b = batch_size_at(step, B, cfg.batch_start, cfg.batch_warmup_steps)
                x, y = corpus.get_batch("train", b, T, batch_gen)
                x, y = x.to(device), y.to(device)
                with _compile_errors():
                    with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                        _, loss = forward(x, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = torch.zeros(())
                loss_value = loss.item()
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
                    raise TinyGPTError(
                        f"loss became {loss_value} (gradient norm {grad_norm.item()}) at step "
                        f"{step}; training stopped before the update{_newest(saved_step)} -- "
                        f"try a lower --lr"
                    )
                try:
                    optimizer.step()
                except RuntimeError as e:  # e.g. an LR too large for float32
                    raise TinyGPTError(
                        f"the update at step {step} failed ({str(e).strip().splitlines()[0]}); "
                        f"training stopped{_newest(saved_step)} -- try a lower --lr"
                    ) from None
                step += 1
                fault_point("step", step)
                dt = time.perf_counter() - t_step
                elapsed += dt
                rate = b * T / max(dt, 1e-9)
                tokens_per_s = rate if step == 1 else 0.9 * tokens_per_s + 0.1 * rate
                bar.update(1)
                postfix = {"loss": f"{loss_value:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if max_time is not None:
                    postfix["left"] = f"{max(max_time - elapsed, 0):.0f}s"
                bar.set_postfix(postfix, refresh=False)
    except TrainingInterrupted as e:
        e.step, e.checkpoint_step, e.run_dir = step, saved_step, str(run_dir)
        raise
    finally:
        bar.close()

    sample = ""
    if cfg.sample_chars:
        sample = sample_text(model, tokenizer, cfg.sample_chars, seed=cfg.seed, device=device,
                             block_size=getattr(model_config, "block_size", 1))
    return TrainResult(run_dir, step, train_loss, val_loss, best_val, model, tokenizer, sample)


@contextlib.contextmanager
def _compile_errors() -> Iterator[None]:
    """Turn a failure of torch.compile into a one-line error that says what to do."""
    try:
        yield
    except Exception as e:
        from torch._dynamo.exc import TorchDynamoException  # compile failures derive from it

        if not isinstance(e, TorchDynamoException):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TinyGPTError(
            f"torch.compile failed ({first[:200]}); train without --compile (a resumed run "
            f"too: --resume RUN_DIR --no-compile)"
        ) from None


def _newest(saved_step: int | None) -> str:
    if saved_step is None:
        return ""
    return f", the newest checkpoint (step {saved_step}) is intact"


def resume_run(
    run_dir: Path, overrides: dict | None = None, log: Callable[[str], None] = print, **kwargs
) -> TrainResult:
    """Continue the run in ``run_dir`` (``overrides`` as for ``prepare_resume``)."""
    warn = kwargs.get("warn")
    cfg, ckpt = prepare_resume(Path(run_dir), overrides, warn)
    return train(cfg, log=log, resume=ckpt, **kwargs)


def sample_text(
    model: nn.Module,
    tokenizer: CharTokenizer,
    num_chars: int,
    seed: int,
    device: torch.device | str = "cpu",
    block_size: int = 1,
    prompt: str = "\n",
) -> str:
    """A sample started from ``prompt`` (a newline if the vocabulary has one)."""
    ids = tokenizer.encode(prompt) if not tokenizer.unknown_chars(prompt) else [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = make_generator(seed, device)
    tokens = generate_tokens(model, idx, num_chars, SamplingConfig(), gen, block_size)
    out = [int(t[0]) for t in tokens]
    return tokenizer.decode(out)
