"""The run machinery around the training loop: everything that makes a run a *run*.

- the run directory: created, locked against a second process, its settings in ``config.json``
  from the start, ``metrics.jsonl`` cut back to the checkpoint on resume;
- ``--resume``: the run's own settings and newest checkpoint (chosen in ``tinygpt.resolve``),
  the same text, the run directory put back in order;
- ``--init-from``: another run's weights with a new optimizer and schedule;
- every random state (Python, numpy, torch, the batch generator), captured and restored;
- signals: the first SIGINT/SIGTERM asks the loop to save and stop, a second aborts;
- ``Run``: the model, optimizer, gradient scaler, corpus and batches a training run is made of,
  built from a ``TrainConfig`` (and a checkpoint to continue).

The loop itself lives in ``tinygpt.train`` and reads only ``Run`` and its own state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from tinygpt import distributed
from tinygpt.checkpoint import (
    LINK_NAMES,
    Checkpoint,
    TrainingCheckpoint,
    Warn,
    atomic_write,
    link_target,
    list_step_dirs,
    load_checkpoint,
    point_link,
    prune_checkpoints,
    remove_link,
    step_dir_name,
    sweep_partials,
)
from tinygpt.config import INIT_SOURCE, SETTINGS, TrainConfig
from tinygpt.data import BUILTIN_DATASETS, Corpus, load_corpus
from tinygpt.device import autocast_dtype, compile_supported, mps_available, pick_device
from tinygpt.distributed import SINGLE, DistEnv
from tinygpt.errors import TinyGPTError, TrainingInterrupted
from tinygpt.files import write_json
from tinygpt.learner.checks import require_checks
from tinygpt.learner.source import learner_model
from tinygpt.learner.spec import is_learner_kind
from tinygpt.models import GPTConfig, build_model, make_config
from tinygpt.optim import CombinedOptimizer, build_optimizer
from tinygpt.tokenizer import CharTokenizer, tokenizer_from_dict

if TYPE_CHECKING:
    from tinygpt.tensorboard import TensorBoardLog

RUN_CONFIG = "config.json"  # the run's settings, written when it starts
# The float16 loss scale a run starts from (PyTorch's default): the loss is multiplied by it
# before the backward pass, so that small gradients do not round to zero in float16.
INIT_LOSS_SCALE = 2.0**16
# A step skipped at this scale or below stops the run: the gradients overflow float16 unscaled.
MIN_LOSS_SCALE = 1.0

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
        model, cfg.optim.optimizer, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.beta1, cfg.optim.beta2), muon_lr=cfg.optim.muon_lr,
    )


def data_record(cfg: TrainConfig, corpus: Corpus) -> dict:
    spec = cfg.data.source
    if not (spec in BUILTIN_DATASETS and not Path(spec).exists()):
        spec = str(Path(spec).expanduser().resolve())
    return {
        "spec": spec,
        "fingerprint": corpus.fingerprint,
        "encoding_errors": cfg.data.encoding_errors,
        "num_tokens": len(corpus.tokens),
    }


def make_grad_scaler(amp_dtype: torch.dtype | None, device: torch.device,
                     saved: dict | None = None) -> torch.amp.GradScaler:
    """The gradient scaler of a float16 run, from ``saved`` (a checkpoint's ``grad_scaler``) when
    continuing one; in every other run a disabled scaler, whose methods change nothing.

    A float16 backward pass underflows below 6e-8: the scaler multiplies the loss by a large
    factor first, divides the gradients by it before clipping and the update, skips the update
    when they hold inf or NaN (the factor was too large) and halves the factor then; after 2000
    clean steps in a row it doubles it. bfloat16 has float32's range and needs none of this.
    """
    enabled = amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, init_scale=INIT_LOSS_SCALE, enabled=enabled)
    if enabled and saved is not None:
        scaler.load_state_dict(saved)
    return scaler


# ------------------------------------------------------------------------------- random states


def capture_rng() -> dict:
    """The global random states: Python, numpy, torch (CPU, CUDA, MPS). Training itself draws
    batches and dropout masks from generators seeded by the step, so these are saved for code
    that draws from the global ones."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # else it was never drawn from
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if mps_available():
        state["torch_mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Undo ``capture_rng``: the next random draws are the ones the saved run would have made."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch_cpu"])
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


LOCK_FILE = ".lock"
_LOCK_BYTE = 1 << 20  # msvcrt locks this byte, past the pid (a Windows lock bars reading too)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` so that two processes never write checkpoints into one run.

    The lock is the operating system's: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows.
    The kernel drops it when its process ends, however it ends (an exception, SIGKILL, a power
    cut), so a lock is never stale and nothing has to guess whether a recorded owner still runs
    -- a guess that reused process ids, or one run directory seen from two machines, would get
    wrong. The file holds the owner's pid, for the message a second process gets.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        release = _lock(fd)
        if release is None:
            raise TinyGPTError(
                f"another tinygpt process is training in {run_dir}{_lock_owner(fd)}; wait for it "
                f"or stop it first"
            )
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid():<20}\n".encode())  # fixed width: no truncation needed
            yield
        finally:
            release()
    finally:
        os.close(fd)


def _lock(fd: int) -> Callable[[], None] | None:
    """Take the lock on the open file ``fd`` without waiting: the function that releases it, or
    None if another process holds it. A platform with neither lock runs unlocked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        return lambda: fcntl.flock(fd, fcntl.LOCK_UN)
    try:
        import msvcrt
    except ImportError:
        return lambda: None
    os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return None

    def release() -> None:
        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    return release


def _lock_owner(fd: int) -> str:
    """`` (pid N)``, the owner the lock file records, or nothing if it cannot be read."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = int(os.read(fd, 32).split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return f" (pid {pid})"


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    names = ("last", "best", "metrics.jsonl", "loss.png")
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
        elif p.name in LINK_NAMES:
            remove_link(run_dir, p.name)
        else:
            p.unlink()
    sweep_partials(run_dir)


def truncate_metrics(path: Path, step: int, record: dict | None) -> None:
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


def prepare_resume_dir(
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
    if best_step is not None and (run_dir / step_dir_name(best_step)).is_dir():
        point_link(run_dir, "best", step_dir_name(best_step))
    elif link_target(run_dir, "best") is None:
        remove_link(run_dir, "best")  # it pointed at a folder that is gone
    protect = {ckpt.step} if best_step is None else {ckpt.step, best_step}
    prune_checkpoints(run_dir, keep, protect)
    truncate_metrics(run_dir / "metrics.jsonl", ckpt.step,
                      ckpt.state.get("metrics") if ckpt.state.get("evaluated") else None)


# ----------------------------------------------------------------------- resume and --init-from


def write_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Record the run's settings as it starts, before any checkpoint exists."""
    write_json(run_dir / RUN_CONFIG, cfg.to_dict())


def read_run_config(run_dir: Path) -> dict | None:
    """The settings ``write_run_config`` recorded, or None if there are none (or unreadable)."""
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def corpus_for_vocab(cfg: TrainConfig, corpus: Corpus | None, init: Checkpoint) -> Corpus:
    """The corpus encoded with the vocabulary of the model being fine-tuned (``corpus``: the text
    with its own character vocabulary, to check that the model knows every character)."""
    if not isinstance(init.tokenizer, CharTokenizer):  # byte-level BPE encodes any text
        return load_corpus(cfg.data.source, cfg.data.encoding_errors, tokenizer=init.tokenizer,
                           glob=cfg.data.glob)
    if corpus is None:
        corpus = load_corpus(cfg.data.source, cfg.data.encoding_errors, glob=cfg.data.glob)
    if corpus.tokenizer == init.tokenizer:
        return corpus
    unknown = init.tokenizer.unknown_chars("".join(corpus.tokenizer.chars))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise TinyGPTError(
            f"{cfg.data.source} has {len(unknown)} character(s) that the model in {cfg.run.init_from} does "
            f"not know ({shown}{more}); --init-from needs a text within the model's vocabulary"
        )
    return load_corpus(cfg.data.source, cfg.data.encoding_errors, tokenizer=init.tokenizer)


def _init_shape_keys(kind: str) -> tuple[str, ...]:
    """The model fields ``--init-from`` takes from the source (its ``init`` metadata)."""
    return tuple(s.name for s in SETTINGS.values() if s.part == "model" and s.init == INIT_SOURCE
                 and kind == "gpt")


def init_weights_from(model: nn.Module, cfg: TrainConfig, model_config, init: Checkpoint) -> None:
    if init.model_kind != cfg.kind:
        raise TinyGPTError(
            f"--init-from {cfg.run.init_from} holds a {init.model_kind} model, not {cfg.kind}"
        )
    mc = saved_model_config(init.state)
    for key in ("vocab_size", *_init_shape_keys(cfg.kind)):
        if getattr(model_config, key) != mc.get(key, _GPT_DEFAULTS.get(key)):
            raise TinyGPTError(
                f"the model of {cfg.run.init_from} has {key} = {mc.get(key)!r}, this run "
                f"{getattr(model_config, key)!r}; --init-from needs the same shape"
            )
    try:
        model.load_state_dict(init.model.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TinyGPTError(
            f"the weights of {cfg.run.init_from} do not fit this model: {first}"
        ) from None


def resume_corpus(cfg: TrainConfig, ckpt: TrainingCheckpoint) -> Corpus:
    data = ckpt.state["data"]
    corpus = load_corpus(cfg.data.source, cfg.data.encoding_errors)
    if corpus.fingerprint != data.get("fingerprint"):
        raise TinyGPTError(
            f"the text {cfg.data.source} is not the one the run was trained on (fingerprint "
            f"{corpus.fingerprint[:12]}, the run's is {str(data.get('fingerprint'))[:12]}); "
            f"--resume needs the same text -- to train on this one start a new run with "
            f"--init-from {cfg.run_dir}"
        )
    tokenizer = tokenizer_from_dict(ckpt.state["tokenizer"])
    if corpus.tokenizer != tokenizer:  # a fine-tuned run keeps its source model's vocabulary
        corpus = load_corpus(cfg.data.source, cfg.data.encoding_errors, tokenizer=tokenizer)
    return corpus


# ------------------------------------------------------------------------------------- signals


class SignalCatcher:
    """First SIGINT/SIGTERM: note it (the loop saves and stops). Second: abort at once."""

    def __init__(self, enabled: bool) -> None:
        self.signum: int | None = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum, saved=False)
        self.signum = signum

    def __enter__(self) -> SignalCatcher:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def compile_errors() -> Iterator[None]:
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


def newest_note(saved_step: int | None) -> str:
    if saved_step is None:
        return ""
    return f", the newest checkpoint (step {saved_step}) is intact"


# --------------------------------------------------------------------------------- what a run is


@dataclass
class Run:
    """What a training run is made of; built once by ``build_run``, read by the loop."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    corpus: Corpus
    model: nn.Module
    forward: Callable  # the model, or its compiled version (same parameters)
    optimizer: CombinedOptimizer
    amp_dtype: torch.dtype | None  # autocast dtype of the forward pass; None: float32
    eval_batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    base_state: dict  # what every checkpoint's state.json says about the run
    init: Checkpoint | None = None  # the --init-from source
    log: Callable[[str], None] = print
    dist: DistEnv = SINGLE  # this process's place in a torchrun job
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper, when there is one
    # float16 loss scaling (see make_grad_scaler); disabled in float32 and bfloat16 runs
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    board: TensorBoardLog | None = None  # --tensorboard's writer, opened once the run starts


def build_run(cfg: TrainConfig, resume: TrainingCheckpoint | None, warn: Warn,
              log: Callable[[str], None] = print, init: Checkpoint | None = None) -> Run:
    """Data, model and optimizer for ``cfg``; from ``resume``'s checkpoint when continuing,
    from the weights of ``init`` (the ``--init-from`` run, loaded here if not given) otherwise.

    Under torchrun the process joins the job first, and the model is wrapped for data-parallel
    training (``tinygpt.distributed``)."""
    dist_env, device_name = distributed.setup(cfg.run.device, cfg.run.dist_timeout_s)
    device = pick_device(device_name)
    check_batch_split(cfg, dist_env)
    if resume is not None:
        init = None
        corpus = resume_corpus(cfg, resume)
    else:
        if cfg.run.init_from:
            init = init or load_checkpoint(Path(cfg.run.init_from), "best", "cpu", warn)
            corpus = corpus_for_vocab(cfg, None, init)
        else:
            corpus = load_corpus(cfg.data.source, cfg.data.encoding_errors, glob=cfg.data.glob,
                                 bpe_vocab_size=cfg.data.bpe_vocab_size)
    corpus.check_block_size(cfg.model.block_size)
    own = is_learner_kind(cfg.kind)  # --model FILE.py:NAME, a class of the learner's own
    if own and resume is None and cfg.run.check and dist_env.is_main:
        require_checks(cfg.kind, log)

    torch.manual_seed(cfg.run.seed)
    model_config = cfg.model_config(_model_vocab_size(corpus, resume or init))
    if own:
        model, model_config = learner_model(model_config, str(device))
    else:
        model = build_model(cfg.kind, model_config)
    if init is not None:
        init_weights_from(model, cfg, model_config, init)
    if resume is not None:
        _load_resumed_weights(model, cfg, model_config, resume)
    model.to(device)
    optimizer = configure_optimizer(model, cfg)
    if resume is not None:
        try:
            optimizer.load_state_dict(resume.optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TinyGPTError(f"the optimizer state in {resume.path} does not fit: {e}") from None
    base_state = {
        "model": cfg.kind, "model_config": model_config.to_dict(),
        "tokenizer": corpus.tokenizer.to_dict(), "train_config": cfg.to_dict(),
        "data": data_record(cfg, corpus),
    }
    # The DDP wrapper and the compiled module share the model's parameters; evaluation,
    # checkpoints and sampling use the plain model. Compilation happens in the first training
    # step and counts as its time.
    ddp = None
    if dist_env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    forward = ddp or model
    if cfg.run.compile and not compile_supported(device):
        warn(f"--compile is not used on {device.type}: PyTorch's compiler backend for it is a "
             f"prototype; training runs the model uncompiled")
    forward = torch.compile(forward) if cfg.run.compile and compile_supported(device) else forward
    amp_dtype = autocast_dtype(cfg.run.dtype, device)
    scaler = make_grad_scaler(amp_dtype, device, resume.state.get("grad_scaler") if resume else None)
    return Run(cfg, Path(cfg.run_dir), device, corpus, model, forward, optimizer, amp_dtype,
               _eval_batches(cfg, corpus, device), base_state, init, log, dist_env, ddp, scaler)


def check_batch_split(cfg: TrainConfig, env: DistEnv) -> None:
    """Every batch must split evenly into ranks and micro-batches (one line if it does not)."""
    d = cfg.data
    parts = env.world_size * d.grad_accum
    warmup = d.batch_start is not None and d.batch_warmup_steps and d.batch_start < d.batch_size
    sizes = {d.batch_size} | ({d.batch_start} if warmup else set())
    for size in sorted(sizes):
        if size % parts:
            name = "--batch-size" if size == d.batch_size else "--batch-start"
            raise TinyGPTError(
                f"{name} {size} does not split into {env.world_size} process(es) x "
                f"{d.grad_accum} micro-batch(es); give a multiple of {parts}"
            )


def _model_vocab_size(corpus: Corpus, source: Checkpoint | TrainingCheckpoint | None) -> int:
    """Rows of the embedding table: the tokenizer's size, or the source model's when continuing
    or fine-tuning one that has more (imported models often pad their vocabulary)."""
    n = corpus.tokenizer.vocab_size
    if source is not None:
        n = max(n, int(saved_model_config(source.state).get("vocab_size", 0)))
    return n


def _load_resumed_weights(model: nn.Module, cfg: TrainConfig, model_config, resume) -> None:
    # Filled in with today's defaults: a field added since the checkpoint was written does not
    # make it a different model.
    saved_model = (resume.state["model"], saved_model_config(resume.state))
    if saved_model != (cfg.kind, model_config.to_dict()):
        raise TinyGPTError(
            f"the checkpoint {resume.path} holds a different model than its run's settings "
            f"describe; it cannot be resumed"
        )
    model.load_state_dict(resume.weights)


def _eval_batches(cfg: TrainConfig, corpus: Corpus, device: torch.device) -> dict:
    """Evaluation batches, drawn once from their own fixed seed: training draws never depend on
    evaluation, and a resumed run evaluates on the same batches."""
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    B, T = cfg.data.batch_size, cfg.model.block_size
    return {
        split: [
            tuple(t.to(device) for t in corpus.get_batch(split, B, T, gen))
            for _ in range(cfg.run.eval_iters)
        ]
        for split in ("train", "val")
    }
