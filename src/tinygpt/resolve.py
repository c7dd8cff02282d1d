"""From ``tinygpt train``'s arguments to what a run starts from: ``resolve_start``.

The settings given (flags over a TOML file) meet the run's history here, in one place:

- a new run: the preset, then the settings (``TrainConfig.resolve``);
- ``--init-from RUN``: the source checkpoint is opened once; the settings its fields' ``init``
  metadata names are taken from it (a given value must match), and the loaded model travels on
  to ``train`` to be copied;
- ``--resume RUN`` (or a torchrun restart of a run that has a checkpoint): the run's own saved
  settings; the given ones may change only the fields whose ``resume`` metadata allows it. The
  newest complete checkpoint is opened once and travels on to ``train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tinygpt import distributed
from tinygpt.checkpoint import (
    Checkpoint,
    TrainingCheckpoint,
    Warn,
    list_step_dirs,
    load_checkpoint,
    load_training_checkpoint,
    warn_stderr,
)
from tinygpt.config import (
    INIT_SOURCE,
    INIT_SOURCE_DEFAULT,
    RESUME_CHANGE,
    RESUME_SAME_TEXT,
    SETTINGS,
    TrainConfig,
    resume_flags,
)
from tinygpt.data import load_corpus
from tinygpt.device import pick_device
from tinygpt.errors import TinyGPTError
from tinygpt.recipe import fit_to_corpus, fits
from tinygpt.runs import read_run_config, saved_model_config
from tinygpt.tokenizer import tokenizer_from_dict


@dataclass
class Start:
    """What a training run starts from: its configuration, and the checkpoint it continues
    (``resume``) or copies its weights from (``init``); at most one of the two."""

    cfg: TrainConfig
    resume: TrainingCheckpoint | None = None
    init: Checkpoint | None = None
    recipe: str | None = None  # what the corpus size chose (tinygpt.recipe), to print


def resolve_start(settings: dict, resume: str | Path | None = None,
                  warn: Warn | None = None) -> Start:
    """The configuration and checkpoint that ``settings`` (flat, by flag name) and ``--resume``
    ask for. Raises ``TinyGPTError`` / ``ValueError`` with a one-line message."""
    warn = warn or warn_stderr
    if resume is not None:
        return _resume(Path(resume), settings, warn)
    init = None
    if settings.get("init_from"):
        init = load_checkpoint(Path(settings["init_from"]), "best", "cpu", warn)
        settings = settings_for_init_from(settings, init)
    cfg = TrainConfig.resolve(settings)
    if distributed.restart_count() > 0 and has_checkpoint(Path(cfg.run_dir)):
        # torchrun --max-restarts runs the same command again after a failure: continue the run
        # from its newest checkpoint instead of refusing to overwrite it.
        same = {k: v for k, v in settings.items() if k not in ("overwrite", "init_from")}
        return _resume(Path(cfg.run_dir), same, warn)
    if fits(cfg, resumed=False):
        pick_device(cfg.run.device)  # a device that is not here is the first thing to hear of
        corpus = load_corpus(cfg.data.source, cfg.data.encoding_errors, glob=cfg.data.glob,
                             bpe_vocab_size=cfg.data.bpe_vocab_size)
        cfg, line = fit_to_corpus(cfg, set(settings), corpus.n_train)
        return Start(cfg, recipe=line)
    return Start(cfg, init=init)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any checkpoint (usable or not) to resume from."""
    return bool(list_step_dirs(run_dir)) or (run_dir / "last").exists()


# ----------------------------------------------------------------------------------- --resume


def _resume(run_dir: Path, given: dict, warn: Warn) -> Start:
    """Continue the run in ``run_dir`` with its own settings (``given`` may change only what the
    fields allow). A run stopped before its first checkpoint starts again from step 0 with its
    settings from ``config.json`` (or, if it never got that far, the ones given)."""
    given = dict(given)
    if given.pop("overwrite", False):
        raise TinyGPTError("--overwrite and --resume contradict each other; pass one of them")
    if given.pop("init_from", None):
        raise TinyGPTError(
            "--init-from starts a new run and --resume continues one; pass one of them"
        )
    out = given.pop("out", None)
    if out is not None and Path(out).expanduser().resolve() != run_dir.resolve():
        raise TinyGPTError(f"--out {out} is not the run being resumed ({run_dir}); leave --out out")
    if not run_dir.is_dir():
        raise TinyGPTError(
            f"--resume {run_dir}: no such run directory; start the run with --out {run_dir}"
        )
    if not has_checkpoint(run_dir):
        if distributed.env_from_torchrun().is_main:
            warn(f"{run_dir} holds no checkpoint yet: starting the run from step 0")
        saved = read_run_config(run_dir)
        if saved is None:
            return Start(TrainConfig.resolve({**given, "out": str(run_dir), "overwrite": True}))
        cfg = resumed_config(run_dir, saved, given, saved.get("data"))
        return Start(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, overwrite=True)))
    ckpt = load_training_checkpoint(run_dir, warn)
    cfg = resumed_config(run_dir, ckpt.state["train_config"], given, ckpt.state["data"]["spec"])
    if cfg.run.max_steps is not None and cfg.run.max_steps < ckpt.step:
        raise TinyGPTError(
            f"--max-steps {cfg.run.max_steps} is below the step of the checkpoint ({ckpt.step}); "
            f"give a larger --max-steps to train further"
        )
    return Start(cfg, resume=ckpt)


def resumed_config(run_dir: Path, saved: dict, given: dict, data_spec: str | None) -> TrainConfig:
    """``saved`` settings, with the changes ``given`` may make on resume (and no others)."""
    # A setting added since the run was saved had its default value in that run.
    saved = {**{k: s.default for k, s in SETTINGS.items()}, **saved}
    given = dict(given)
    data = given.pop("data", None)
    allowed = resume_flags()
    for key, value in given.items():
        if key not in SETTINGS:
            raise TinyGPTError(f"unknown setting {key!r}")
        if SETTINGS[key].resume == RESUME_CHANGE:
            continue
        if value != saved[key]:
            raise TinyGPTError(
                f"{SETTINGS[key].flag} {value} differs from the run's {key} = {saved[key]!r}; "
                f"--resume continues a run as it was configured (only {allowed} and --data for "
                f"the same text may be given); to start a new run from its weights use "
                f"--init-from {run_dir}"
            )
    merged = {**saved, **{k: v for k, v in given.items() if SETTINGS[k].resume == RESUME_CHANGE}}
    merged.update(out=str(run_dir), overwrite=False, init_from=saved.get("init_from"))
    # The text may have moved (its fingerprint is checked when it is read).
    same_text = [k for k, s in SETTINGS.items() if s.resume == RESUME_SAME_TEXT]
    for key in same_text:
        merged[key] = data if data is not None else (data_spec or saved[key])
    try:
        return TrainConfig.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise TinyGPTError(
            f"the settings saved in {run_dir} are not understood by this tinygpt: {e}"
        ) from None


# -------------------------------------------------------------------------------- --init-from


def source_settings(init: Checkpoint) -> dict:
    """The settings a checkpoint's model fixes: its kind, shape, tokenizer (and BPE vocabulary)."""
    try:
        tokenizer = tokenizer_from_dict(init.state.get("tokenizer"))
    except TinyGPTError as e:
        raise TinyGPTError(f"cannot read the tokenizer of {init.path}: {e}") from None
    found = {"model": init.model_kind, "tokenizer": tokenizer.kind,
             "vocab_size": tokenizer.vocab_size if tokenizer.kind == "bpe" else None}
    if init.model_kind == "gpt":
        mc = saved_model_config(init.state)
        found.update({s.key: mc.get(s.name, s.default) for s in SETTINGS.values()
                      if s.part == "model" and s.init})
    return found


def settings_for_init_from(settings: dict, init: Checkpoint) -> dict:
    """``settings`` with what the ``init_from`` checkpoint fixes taken from it: a setting marked
    ``INIT_SOURCE`` that is given must match; one marked ``INIT_SOURCE_DEFAULT`` may differ."""
    source, found = settings["init_from"], source_settings(init)
    out = dict(settings)
    for key, value in found.items():
        s = SETTINGS[key]
        if s.init == INIT_SOURCE_DEFAULT:
            out.setdefault(key, value)
            continue
        if s.init != INIT_SOURCE:
            continue
        given = settings.get(key)
        unset = key not in settings or (key == "vocab_size" and given is None)
        if not unset and given != value:
            raise TinyGPTError(_mismatch(s, settings[key], value, source, init))
        out[key] = value
    return out


def _mismatch(s, given, value, source, init: Checkpoint) -> str:
    if s.key == "model":
        return f"--model {given} does not match {source}, a {value} model"
    if s.key == "tokenizer":
        return (f"--tokenizer {given} does not match {source}, whose tokenizer is {value}; "
                f"--init-from keeps the model's tokenizer")
    if s.key == "vocab_size":
        return (f"--vocab-size {given} does not match {source}, whose tokenizer has "
                f"{init.tokenizer.vocab_size} tokens; --init-from keeps the model's tokenizer")
    return (f"{s.flag} {given} does not match {source}, whose {s.key} is {value!r}; "
            f"--init-from keeps the model's architecture")
