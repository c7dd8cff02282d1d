"""The training loop: sample a batch, compute the loss, backpropagate, clip, step the optimizer,
and now and then evaluate (and save a checkpoint).

This module is the loop a learner reads; everything that makes it a robust *run* -- the run
directory, resuming, ``--init-from``, random states, signals, locking -- is in ``tinygpt.runs``.
What changes from step to step is one ``LoopState``; what a run is made of (model, optimizer,
data, batches) is one ``Run``.

``--max-time`` budgets training time: evaluations and checkpoints do not eat into it, so how often
one evaluates does not change what the budget buys. On the CPU a resumed run ends bitwise
identical to a run that never stopped, whether it was stopped by a signal, a crash or SIGKILL.

With ``--dtype float16`` the loss is scaled before the backward pass (``Run.scaler``, see
``tinygpt.runs.make_grad_scaler``) and the gradients unscaled before clipping; a step whose
gradients overflow float16 changes no weight and is counted (``skipped_steps``, in the progress
line, ``metrics.jsonl`` and every checkpoint, which also holds the scaler's state).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from tinygpt.checkpoint import (
    Checkpoint,
    TrainingCheckpoint,
    Warn,
    fault_point,
    save_run_checkpoint,
    warn_stderr,
)
from tinygpt.config import RunConfig, TrainConfig
from tinygpt.copying import CopyReport
from tinygpt.data import epoch_starts
from tinygpt.distributed import (
    barrier,
    batch_generator,
    max_all,
    micro_batches,
    no_sync,
    seed_dropout,
    sum_all,
)
from tinygpt.errors import TinyGPTError, TrainingInterrupted
from tinygpt.generate import SamplingConfig, generate_tokens, make_generator
from tinygpt.learner.source import learner_config, own_generate
from tinygpt.models.modes import eval_mode
from tinygpt.optim import batch_size_at, lr_factor, tokens_seen
from tinygpt.runs import (
    MIN_LOSS_SCALE,
    Run,
    SignalCatcher,
    build_run,
    capture_rng,
    compile_errors,
    newest_note,
    prepare_resume_dir,
    prepare_run_dir,
    restore_rng,
    run_lock,
    write_run_config,
)
from tinygpt.tensorboard import TensorBoardLog, require_tensorboard
from tinygpt.tokenizer import Tokenizer


@dataclass
class TrainResult:
    """How a run ended. ``model`` is the final model; ``sample`` comes from the best checkpoint
    (``best_step``), as ``tinygpt sample`` would draw it, with its copying meter."""

    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    model: nn.Module
    tokenizer: Tokenizer
    sample: str
    best_step: int | None = None
    overfitting_step: int | None = None  # the evaluation that noticed overfitting
    stopped_for_overfitting: bool = False
    copying: CopyReport | None = None  # of the sample
    copying_reference: CopyReport | None = None  # of as much unseen val text


@dataclass
class LoopState:
    """Everything the loop changes as it goes (and every checkpoint records)."""

    step: int = 0
    elapsed: float = 0.0  # training time in seconds, without evaluations and checkpoints
    train_loss: float = math.nan
    val_loss: float = math.nan
    best_val: float = math.inf
    best_step: int | None = None
    best_train: float = math.nan  # the train loss at the best step
    overfitting_step: int | None = None  # where the overfitting notice was given (once)
    lr: float = 0.0
    tokens_per_s: float = 0.0
    skipped_steps: int = 0  # float16: steps whose gradients overflowed, so nothing was updated
    saved_step: int | None = None  # the step of the newest checkpoint on disk
    saved_at: float = 0.0  # time.monotonic() of that checkpoint (for --save-every)

    @classmethod
    def from_checkpoint(cls, st: dict) -> LoopState:
        best = st.get("best_val_loss")
        return cls(
            step=st["step"], elapsed=float(st["elapsed_s"]),
            train_loss=st.get("train_loss", math.nan), val_loss=st.get("val_loss", math.nan),
            best_val=math.inf if best is None else best, best_step=st.get("best_step"),
            best_train=_number(st.get("best_train_loss")),
            overfitting_step=st.get("overfitting_step"),
            lr=st.get("lr", 0.0), tokens_per_s=st.get("tokens_per_s", 0.0),
            skipped_steps=int(st.get("skipped_steps", 0)),
            saved_step=st["step"], saved_at=time.monotonic(),
        )


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    progress_bar: bool | None = None,
    resume: TrainingCheckpoint | None = None,
    warn: Warn | None = None,
    handle_signals: bool = True,
    init: Checkpoint | None = None,
) -> TrainResult:
    """Train a model as ``cfg`` says; returns the final model and its losses.

    ``resume`` continues a run from its checkpoint; ``init`` is the loaded ``--init-from``
    source (both as ``tinygpt.resolve.resolve_start`` gives them; ``init`` is loaded from
    ``cfg.run.init_from`` when not given).
    ``progress_bar=None`` shows the bar only when stderr is a terminal. With ``handle_signals``
    (and in the main thread) SIGINT/SIGTERM save a checkpoint and raise ``TrainingInterrupted``.
    """
    warn = warn or warn_stderr
    if cfg.run.tensorboard:
        require_tensorboard()  # before any work: a missing package is one line
    run = build_run(cfg, resume, warn, log, init)
    main = run.dist.is_main  # rank 0 of a torchrun job (or the only process) writes the run
    with run_lock(run.run_dir) if main else contextlib.nullcontext():
        if resume is not None:
            if main:
                prepare_resume_dir(run.run_dir, resume, cfg.run.keep, warn)
            state = LoopState.from_checkpoint(resume.state)
        else:
            if main:
                prepare_run_dir(run.run_dir, cfg.run.overwrite)
                write_run_config(run.run_dir, cfg)
            state = LoopState(lr=cfg.optim.lr * lr_multiplier(cfg, 0, 0.0), saved_at=time.monotonic())
        barrier(run.dist)  # the other ranks start once the run directory is ready
        if main:
            _announce(run, state, resume)
            run.board = _open_board(cfg, resume)
        hide = (None if progress_bar is None else not progress_bar) if main else True
        bar = tqdm(total=cfg.run.max_steps if cfg.run.max_time is None else None, initial=state.step,
                   disable=hide, unit="step", dynamic_ncols=True, leave=False)
        try:
            with SignalCatcher(handle_signals) as catcher:
                if resume is not None:
                    restore_rng(resume.rng_state)
                train_loop(run, state, bar, catcher,
                           skip_eval=resume is not None and resume.state.get("evaluated"))
            result = _result(run, state)
            if run.board is not None:
                run.board.finish(state.step, result.sample, run.run_dir / "loss.png")
        except TrainingInterrupted as e:
            e.step, e.checkpoint_step, e.run_dir = state.step, state.saved_step, str(run.run_dir)
            raise
        finally:
            bar.close()
            if run.board is not None:
                run.board.close()
    return result


def train_loop(run: Run, state: LoopState, bar: tqdm, catcher: SignalCatcher,
               skip_eval: bool = False) -> None:
    """Step until the step count or the time budget is reached, evaluating every
    ``eval_interval`` steps and at the end (``skip_eval``: the resumed step was evaluated)."""
    rc = run.cfg.run
    first = state.step
    with warnings.catch_warnings():
        # Inductor leaves the complex multiply of the rotary embeddings to PyTorch's own kernel
        # and warns that this may be slow; measured, the compiled step is no slower.
        warnings.filterwarnings("ignore", "Torchinductor does not support code generation "
                                "for complex operators")
        while True:
            done = (rc.max_steps is not None and state.step >= rc.max_steps) or (
                rc.max_time_s is not None and state.elapsed >= rc.max_time_s)
            skip = skip_eval and state.step == first
            if (state.step % rc.eval_interval == 0 or done) and not skip:
                evaluate_and_save(run, state, bar)
                if rc.stop_when_overfitting and state.overfitting_step == state.step:
                    return  # the checkpoint of this step is saved
            elif _save_is_due(rc, state):
                save(run, state, record=None, improved=False)
            if done:
                return
            signum = max_all(run.dist, catcher.signum or 0, run.device)  # every rank agrees
            if signum:
                _stop_for_signal(run, state, signum)
            loss = training_step(run, state)
            bar.update(1)
            bar.set_postfix(progress_postfix(run, state, loss), refresh=False)


def progress_postfix(run: Run, state: LoopState, loss: float) -> dict[str, str]:
    """What the progress bar shows after the step count: the loss, tokens/s, in float16 runs the
    skipped steps, and with ``--max-time`` the training time left."""
    postfix = {"loss": f"{loss:.4f}", "tok/s": f"{state.tokens_per_s:,.0f}"}
    if run.scaler.is_enabled():
        postfix["skipped"] = str(state.skipped_steps)
    rc = run.cfg.run
    if rc.max_time_s is not None:
        postfix["left"] = f"{max(rc.max_time_s - state.elapsed, 0):.0f}s"
    return postfix


def training_step(run: Run, state: LoopState) -> float:
    """One optimizer step: batch, forward, loss, backward, clip, update. Returns the loss."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    t0 = time.perf_counter()
    factor = lr_multiplier(cfg, state.step, state.elapsed)
    state.lr = cfg.optim.lr * factor
    for group in optimizer.param_groups:  # each group follows the curve from its own peak
        group["lr"] = group["base_lr"] * factor
    # The batch of this step is a function of (seed, step); this process trains on its rows.
    d, T, seed = cfg.data, cfg.model.block_size, cfg.run.seed
    B = batch_size_at(state.step, d.batch_size, d.batch_start, d.batch_warmup_steps)
    starts = None
    if d.sampling == "epoch":  # the next B windows of the epochs' orders
        done = tokens_seen(state.step, d.batch_size, d.batch_start, d.batch_warmup_steps, T) // T
        starts = epoch_starts(run.corpus.n_train, T, seed, done, B)
    x, y = run.corpus.get_batch("train", B, T, batch_generator(seed, state.step),
                                rows=run.dist.share(B), starts=starts)
    x, y = x.to(run.device), y.to(run.device)  # (B/W, T) inputs and (B/W, T) next characters

    optimizer.zero_grad(set_to_none=True)
    scaler = run.scaler  # float16: scales the loss up and the gradients back (else: no-ops)
    K, losses = d.grad_accum, []
    with compile_errors():
        for k, (xk, yk) in enumerate(micro_batches(x, y, K)):
            seed_dropout(seed, state.step, run.dist.rank, k)
            # Gradients add up over the micro-batches; DDP averages them over the processes
            # after the last one. Dividing by K makes the sum a mean over the whole batch.
            with no_sync(run.ddp, sync=k == K - 1):
                with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp_dtype is not None):
                    _, loss = run.forward(xk, yk)
                scaler.scale(loss / K).backward()
            losses.append(loss.detach())
    scaler.unscale_(optimizer)  # the true gradients, for the clip and the update
    clip = cfg.optim.grad_clip
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                 if clip > 0 else torch.zeros(()))
    loss_value = torch.stack(losses).mean().item()
    # Under the scaler, gradients that overflow float16 skip the step; a loss that is not finite
    # (computed before any scaling) means the model itself diverged, as in float32.
    if not math.isfinite(loss_value) or not (scaler.is_enabled() or math.isfinite(grad_norm.item())):
        raise TinyGPTError(
            f"loss became {loss_value} (gradient norm {grad_norm.item()}) at step {state.step}; "
            f"training stopped before the update{newest_note(state.saved_step)} -- try a lower --lr"
        )
    optimizer_step(run, state)

    state.step += 1
    fault_point("step", state.step)
    dt = time.perf_counter() - t0
    state.elapsed += dt
    rate = B * T / max(dt, 1e-9)
    state.tokens_per_s = rate if state.step == 1 else 0.9 * state.tokens_per_s + 0.1 * rate
    return loss_value


def optimizer_step(run: Run, state: LoopState) -> None:
    """The optimizer step; under float16 the scaler's: skipped (and counted) when the gradients
    hold inf or NaN, and the loss scale adjusted."""
    scaler = run.scaler
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    try:
        scaler.step(run.optimizer)  # the plain optimizer step without float16
    except RuntimeError as e:  # e.g. an LR too large for float32
        raise TinyGPTError(
            f"the update at step {state.step} failed ({str(e).strip().splitlines()[0]}); "
            f"training stopped{newest_note(state.saved_step)} -- try a lower --lr"
        ) from None
    scaler.update()
    if not scaler.is_enabled() or scaler.get_scale() >= scale:
        return
    state.skipped_steps += 1  # the scale only falls when the step found inf/NaN gradients
    if scale <= MIN_LOSS_SCALE:
        raise TinyGPTError(
            f"the gradients overflow float16 even unscaled (loss scale {scale:g}) at step "
            f"{state.step}; training stopped{newest_note(state.saved_step)} -- try a lower --lr, "
            f"or --dtype bfloat16 or float32"
        )


def lr_multiplier(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """The schedule's factor of the peak learning rate at ``step`` (see ``tinygpt.optim``): the
    curve stretches over the step count or the time budget, whichever is further along."""
    o, rc = cfg.optim, cfg.run
    progress = 0.0
    if rc.max_steps:
        progress = (step - o.warmup_steps) / max(rc.max_steps - o.warmup_steps, 1)
    if rc.max_time_s:
        progress = max(progress, elapsed / rc.max_time_s)
    return lr_factor(o.schedule, step, max(progress, 0.0), o.warmup_steps, o.min_lr_ratio,
                     o.decay_fraction)


@torch.no_grad()
def estimate_loss(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout); the processes of a torchrun job
    share the batches and add up their results."""
    model, env = run.model, run.dist
    with eval_mode(model):
        losses = [model(x, y)[1].item() for x, y in batches[env.rank::env.world_size]]
    total, count = sum_all(env, [sum(losses), len(losses)], run.device)
    return total / count


def bits_per_char(loss_per_token: float, corpus, split: str) -> float:
    """A loss in nats per token as bits per character of ``split``."""
    tokens, chars = len(corpus.split(split)), corpus.num_chars(split)
    return loss_per_token * tokens / max(chars, 1) / math.log(2)


def evaluate_and_save(run: Run, state: LoopState, bar: tqdm) -> None:
    """Train and val loss now; a checkpoint, a line of ``metrics.jsonl`` and ``loss.png``."""
    from tinygpt.evaluate import evaluate_tokens

    cfg = run.cfg
    state.train_loss = estimate_loss(run, run.eval_batches["train"])
    corpus = run.corpus
    val_bpc = None
    if cfg.run.full_val:
        full = evaluate_tokens(run.model, corpus.split("val"), cfg.model.block_size, batch_size=64,
                               device=run.device, tokenizer=corpus.tokenizer)
        state.val_loss, val_bpc = full["val_loss"], full["bits_per_char"]
    else:
        state.val_loss = estimate_loss(run, run.eval_batches["val"])
    if not (math.isfinite(state.train_loss) and math.isfinite(state.val_loss)):
        raise TinyGPTError(
            f"the evaluation at step {state.step} gave loss {state.val_loss}: the weights are no "
            f"longer finite; nothing was saved{newest_note(state.saved_step)} -- try a lower --lr"
        )
    record = {
        "step": state.step, "train_loss": state.train_loss, "val_loss": state.val_loss,
        # Bits per character, comparable across tokenizers: on batches, the loss per token times
        # the split's tokens per character (exact over the whole val split with --full-val).
        "train_bpc": bits_per_char(state.train_loss, corpus, "train"),
        "val_bpc": val_bpc if val_bpc is not None else bits_per_char(state.val_loss, corpus, "val"),
        "lr": state.lr,
        "tokens": tokens_seen(state.step, cfg.data.batch_size, cfg.data.batch_start,
                              cfg.data.batch_warmup_steps, cfg.model.block_size),
        "elapsed_s": round(state.elapsed, 3), "tokens_per_s": round(state.tokens_per_s, 1),
    }
    if run.scaler.is_enabled():
        record.update(skipped_steps=state.skipped_steps, loss_scale=run.scaler.get_scale())
    improved = state.val_loss < state.best_val
    if improved:
        state.best_val, state.best_step, state.best_train = (state.val_loss, state.step,
                                                             state.train_loss)
    noticed = state.overfitting_step is None and is_overfitting(state, cfg.run.eval_interval)
    if noticed:
        state.overfitting_step = state.step
    # The checkpoint first, then the log line: a resumed run restores the line from the
    # checkpoint if a crash came between the two.
    save(run, state, record, improved)
    if not run.dist.is_main:
        return
    with open(run.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    _plot_losses(run.run_dir)
    if run.board is not None:
        run.board.record(record)
    skipped = f", {state.skipped_steps} skipped steps" if state.skipped_steps else ""
    bar.write(f"step {state.step:>6}: train loss {state.train_loss:.4f}, "
              f"val loss {state.val_loss:.4f} ({record['val_bpc']:.3f} bits/char){skipped}")
    if noticed:
        with tqdm.external_write_mode():
            run.log(overfitting_notice(state, cfg.run.stop_when_overfitting))


# Overfitting is noticed when the val loss has stayed above its best for this many evaluation
# intervals and has risen by this margin (nats; larger than the noise of an estimate on batches),
# while the train loss kept falling.
OVERFIT_INTERVALS = 2
OVERFIT_MARGIN = 0.02


def is_overfitting(state: LoopState, eval_interval: int) -> bool:
    """Whether the val loss has risen for a while since its best while the train loss fell."""
    if not state.best_step:  # the untrained model being the best is no sign of memorising
        return False
    waited = state.step - state.best_step >= OVERFIT_INTERVALS * eval_interval
    rose = state.val_loss > state.best_val + OVERFIT_MARGIN
    fell = math.isnan(state.best_train) or state.train_loss < state.best_train - OVERFIT_MARGIN
    return waited and rose and fell


def overfitting_notice(state: LoopState, stopping: bool) -> str:
    """The one notice a run gives when it begins to overfit: what it is and what to try."""
    train_then = "" if math.isnan(state.best_train) else f"{state.best_train:.3f} -> "
    end = ("--stop-when-overfitting: the run stops here." if stopping else
           "Training goes on; --stop-when-overfitting would stop a run here.")
    return (
        f"overfitting: since step {state.best_step} the val loss has risen from "
        f"{state.best_val:.3f} to {state.val_loss:.3f} while the train loss kept falling "
        f"({train_then}{state.train_loss:.3f}).\n"
        f"  The model is memorising its training text rather than learning what carries over "
        f"to text it has not seen.\n"
        f"  Try a smaller model (fewer --n-layer, a smaller --n-embd), more --dropout (0.1-0.3) "
        f"or more text.\n"
        f"  The best checkpoint (step {state.best_step}) is kept: the sample at the end and "
        f"tinygpt sample use it. {end}"
    )


def save(run: Run, state: LoopState, record: dict | None, improved: bool) -> None:
    """A checkpoint of everything needed to continue exactly from ``state.step`` (written by rank 0:
    the replicas are identical)."""
    if run.dist.is_main:
        _write_checkpoint(run, state, record, improved)
    state.saved_step, state.saved_at = state.step, time.monotonic()


def _write_checkpoint(run: Run, state: LoopState, record: dict | None, improved: bool) -> None:
    ckpt_state = {
        **run.base_state, "step": state.step, "train_loss": state.train_loss,
        "val_loss": state.val_loss,
        "best_val_loss": None if math.isinf(state.best_val) else state.best_val,
        "best_step": state.best_step, "elapsed_s": state.elapsed, "lr": state.lr,
        "best_train_loss": None if math.isnan(state.best_train) else state.best_train,
        "overfitting_step": state.overfitting_step,
        "tokens_per_s": state.tokens_per_s, "evaluated": record is not None, "metrics": record,
    }
    if run.scaler.is_enabled():  # float16: what resuming needs to scale exactly as before
        ckpt_state.update(skipped_steps=state.skipped_steps, grad_scaler=run.scaler.state_dict())
    save_run_checkpoint(run.run_dir, run.model, run.optimizer, ckpt_state, capture_rng(),
                        is_best=improved, keep=run.cfg.run.keep)


def _save_is_due(rc: RunConfig, state: LoopState) -> bool:
    """``--save-every``: a checkpoint when that much wall time has passed since the last one."""
    return (rc.save_every_s is not None and state.saved_step != state.step
            and time.monotonic() - state.saved_at >= rc.save_every_s)


def _stop_for_signal(run: Run, state: LoopState, signum: int) -> None:
    if state.saved_step != state.step:
        if run.dist.is_main:
            run.log(f"{signal.Signals(signum).name}: saving a checkpoint at step {state.step} (send "
                    f"it again to abort at once)")
        save(run, state, record=None, improved=False)
    raise TrainingInterrupted(signum, saved=True)


def _plot_losses(run_dir: Path) -> None:
    """Refresh ``loss.png``; a picture that cannot be drawn never stops training."""
    from tinygpt.plots import plot_run

    try:
        plot_run(run_dir)
    except (TinyGPTError, OSError, ValueError, RuntimeError) as e:
        warn_stderr(f"loss.png not drawn: {e}")


def _announce(run: Run, state: LoopState, resume: TrainingCheckpoint | None) -> None:
    cfg, corpus = run.cfg, run.corpus
    n_params = sum(p.numel() for p in run.model.parameters())
    log = run.log
    log(f"model {cfg.kind} ({cfg.preset}): {n_params / 1e6:.3f}M parameters, vocab "
        f"{corpus.tokenizer.vocab_size}, {len(corpus.tokens):,} tokens from "
        f"{corpus.describe_sources()}, device {run.device}, run {run.run_dir}")
    if run.init is not None:
        log(f"weights from {run.init.path} (step {run.init.state.get('step')}); new optimizer "
            f"and schedule")
    if run.amp_dtype is not None:
        name = str(run.amp_dtype).removeprefix("torch.")
        scaled = ", the loss scaled (steps whose gradients overflow are skipped)" if (
            run.scaler.is_enabled()) else ""
        log(f"mixed precision: {name} matrix products, float32 weights and optimizer{scaled}")
    if run.forward is not (run.ddp or run.model):
        log("compiling the model with torch.compile: the first step takes a while")
    if resume is not None:
        log(f"resuming from {resume.path} at step {state.step}")
        if cfg.run.max_steps is not None and state.step >= cfg.run.max_steps:
            log(f"the run already reached --max-steps {cfg.run.max_steps}; give a larger one to go "
                f"further")


def _open_board(cfg: TrainConfig, resume: TrainingCheckpoint | None) -> TensorBoardLog | None:
    """``--tensorboard``'s writer; a resumed run hides the events logged after its checkpoint
    and logs the checkpoint's own evaluation again (the loop does not repeat it)."""
    if not cfg.run.tensorboard:
        return None
    if resume is None:
        return TensorBoardLog(cfg.run.tensorboard)
    board = TensorBoardLog(cfg.run.tensorboard, purge_step=resume.step)
    if resume.state.get("evaluated") and resume.state.get("metrics"):
        board.record(resume.state["metrics"])
    return board


def _result(run: Run, state: LoopState) -> TrainResult:
    cfg, tokenizer = run.cfg, run.corpus.tokenizer
    result = TrainResult(
        run.run_dir, state.step, state.train_loss, state.val_loss, state.best_val, run.model,
        tokenizer, "", best_step=state.best_step, overfitting_step=state.overfitting_step,
        stopped_for_overfitting=(cfg.run.stop_when_overfitting
                                 and state.overfitting_step == state.step),
    )
    if cfg.run.sample_chars and run.dist.is_main:
        block_size = run.base_state["model_config"].get("block_size", 1)
        result.sample = sample_text(_best_model(run, state), tokenizer, cfg.run.sample_chars,
                                    seed=cfg.run.seed, device=run.device, block_size=block_size)
        result.copying, result.copying_reference = _copying(run, result.sample)
    return result


def _best_model(run: Run, state: LoopState) -> nn.Module:
    """The model of the best checkpoint (the final one when that is the best)."""
    if state.best_step is None or state.best_step == state.step:
        return run.model
    from tinygpt.checkpoint import load_checkpoint

    try:
        return load_checkpoint(run.run_dir, "best", run.device).model
    except TinyGPTError as e:
        warn_stderr(f"the sample comes from the final model: the best checkpoint failed to "
                    f"load ({e})")
        return run.model


def _copying(run: Run, sample: str):
    """The copying meter of the sample, and of as much unseen val text (None, None if the train
    split is too large to index)."""
    from tinygpt.copying import AUTO_MAX_CHARS, corpus_index, reference_report

    try:
        index = corpus_index(run.corpus, AUTO_MAX_CHARS)
    except TinyGPTError:
        return None, None
    return index.report(sample), reference_report(run.corpus, index, len(sample))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def sample_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    num_chars: int,
    seed: int,
    device: torch.device | str = "cpu",
    block_size: int = 1,
    prompt: str = "\n",
) -> str:
    """A sample started from ``prompt`` (a newline if the vocabulary has one)."""
    ids = tokenizer.encode(prompt) if not tokenizer.unknown_chars(prompt) else [0]
    if learner_config(model) is not None:  # a class of the learner's own: its own generate
        return tokenizer.decode(own_generate(model, ids, num_chars, seed, device))
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = make_generator(seed, device)
    tokens = generate_tokens(model, idx, num_chars, SamplingConfig(), gen, block_size)
    return tokenizer.decode([int(t[0]) for t in tokens])
