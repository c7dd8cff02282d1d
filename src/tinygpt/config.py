"""Training configuration: a ``TrainConfig`` of four typed parts, whose fields are the settings.

    cfg.kind, cfg.preset          the model kind (``--model``) and the preset it started from
    cfg.model   GPTConfig         the model's shape (``--n-layer``, ``--block-size``, ...)
    cfg.data    DataConfig        the text, its tokenizer, the batches (``--data``, ``--batch-size``)
    cfg.optim   OptimConfig       optimizer and learning-rate schedule (``--lr``, ``--schedule``)
    cfg.run     RunConfig         length, evaluation, checkpoints, device (``--max-steps``, ``--out``)

Every field is one *setting*, spelled the same way as a CLI flag (``--n-layer``), a TOML key
(``n_layer``) and a key of the flat dict saved in ``config.json`` and in every checkpoint
(``TrainConfig.to_dict`` / ``from_dict``). A field's metadata holds its help text and choices, and
what ``--resume`` and ``--init-from`` may do with it. ``GPTConfig`` lives with the model and
carries no CLI text: its fields' metadata is ``MODEL_SETTINGS`` below (a test keeps the two in step).

Values are layered: field defaults < preset < TOML file (``--config``) < command-line flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields

from tinygpt.device import DEVICE_HELP, DEVICE_PATTERN
from tinygpt.learner.spec import LearnerConfig, file_sha256, is_learner_kind, parse_spec, run_name
from tinygpt.models import MODEL_KINDS, BigramConfig, GPTConfig
from tinygpt.models.config import MLPS, NORMS, POS_EMBEDDINGS, QK_NORMS
from tinygpt.optim import OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "bfloat16", "float16", "auto")
TOKENIZER_KINDS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 1024

# What --resume and --init-from may do with a setting (field metadata "resume" and "init"):
RESUME_CHANGE = "change"  # --resume may give another value (nothing a step computes changes)
RESUME_SAME_TEXT = "same text"  # --resume may name the same text at a new place
SAMPLINGS = ("random", "epoch")  # how training windows are drawn (tinygpt.data)
INIT_SOURCE = "source"  # --init-from takes the source model's value; a given one must match it
INIT_SOURCE_DEFAULT = "source default"  # --init-from: the source's value unless one is given


# ------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A named config: some settings over the field defaults, and one line saying what it is."""

    description: str
    settings: dict


_MODERN_ARCH = {
    "pos_embedding": "rope", "norm": "rmsnorm", "qk_norm": "rmsnorm", "mlp": "relu2", "bias": False,
    "zero_init": True, "dropout": 0.0, "dtype": "auto",
}
_MODERN_OPT = {
    "optimizer": "muon", "muon_lr": 0.02, "lr": 3e-3, "schedule": "wsd", "decay_fraction": 0.3,
    "min_lr_ratio": 0.0, "warmup_steps": 50, "weight_decay": 0.0,
    # Windows without replacement, every token once per epoch: 0.02 lower after 600 steps.
    "sampling": "epoch",
}
PRESETS: dict[str, Preset] = {
    "modern": Preset(
        "the GPT's default: rotary positions, QK-norm, zero-init, Muon with a WSD schedule; "
        "the most val loss a couple of CPU minutes buy",
        {**_MODERN_ARCH, **_MODERN_OPT, "batch_size": 32, "block_size": 64, "n_layer": 4,
         "n_head": 4, "n_embd": 128, "warmup_steps": 20, "max_steps": 600, "eval_interval": 100,
         # In bf16 on a CPU, GELU's single fused kernel beats ReLU^2's two ops, and learned as
         # well; at a one-minute budget a longer decay (the second half of the run) ends lower.
         # LayerNorm (no bias) is one fused kernel on a CPU where RMSNorm is several: as good
         # per step, and with the complex rotary embeddings a fifth off every step. Half-size
         # batches for the first 200 steps reach a given loss on fewer tokens.
         "mlp": "gelu", "decay_fraction": 0.5, "norm": "layernorm", "qk_norm": "layernorm",
         "batch_start": 16, "batch_warmup_steps": 200},
    ),
    "modern-large": Preset(
        "the modern recipe with RMSNorm, ReLU^2, a wider model, dropout and --compile, for runs "
        "of a quarter of an hour",
        {**_MODERN_ARCH, **_MODERN_OPT, "batch_size": 16, "block_size": 256, "n_layer": 6,
         "n_head": 6, "n_embd": 192, "max_steps": 6000, "eval_interval": 500,
         # Long runs overfit the 1 MB corpus without dropout; keeping it off the attention
         # weights keeps the fused attention kernel. Compiling costs ~20 s once and pays off
         # within minutes.
         "dropout": 0.2, "attn_dropout": 0.0, "compile": True},
    ),
    "cpu": Preset(
        "the lecture's architecture (learned positions, LayerNorm, GELU) at CPU size, AdamW with "
        "a cosine schedule",
        {"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0},
    ),
    "lecture": Preset(
        "the final model of the lecture video (6 layers, 384 wide, 256 characters of context)",
        {"batch_size": 64, "block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384,
         "dropout": 0.2, "lr": 3e-4, "max_steps": 5000, "eval_interval": 500, "eval_iters": 200},
    ),
    "bigram": Preset(
        "the bigram model's default (the lecture's mid-term assignment)",
        {"batch_size": 32, "block_size": 8, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0,
         "max_steps": 3000, "eval_interval": 500, "eval_iters": 100,
         # read only by a GPT trained with this preset: the CPU size
         "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0},
    ),
}
DEFAULT_PRESET = {"gpt": "modern", "bigram": "bigram"}
LEARNER_PRESET = "cpu"  # a class of one's own (FILE.py:NAME): the lecture's recipe at CPU size
MODEL_HELP = ("model kind: bigram, gpt, or FILE.py:NAME, a model class of your own written as in "
              "the lecture (built with --block-size, --n-embd, --n-head, --n-layer, --dropout; "
              "checked first, see tinygpt check)")


def model_kind(text: str) -> str:
    """A ``--model`` value: one of ``MODEL_KINDS``, or ``FILE.py[:NAME]``; ``ValueError`` if not."""
    if text in MODEL_KINDS or is_learner_kind(text):
        return text
    raise ValueError(f"invalid choice: {text!r} (choose from {', '.join(MODEL_KINDS)}, or "
                     f"FILE.py:NAME for a model class of your own)")


def preset_for(kind: str) -> str:
    return LEARNER_PRESET if is_learner_kind(kind) else DEFAULT_PRESET[kind]


def setting(default=None, help: str = "", *, factory=None, key: str | None = None,
            choices: tuple | None = None, metavar: str | None = None, resume: str | None = None,
            init: str | None = None):
    """A dataclass field that is a setting; ``key`` is its flag/TOML name if not the field's."""
    meta = {"help": help, "key": key, "choices": choices, "metavar": metavar, "resume": resume,
            "init": init}
    meta = {k: v for k, v in meta.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ``GPTConfig``'s fields as settings: help text and what --init-from does with each. The shape is
# the source model's; dropout and the mask may change for fine-tuning.
MODEL_SETTINGS: dict[str, dict] = {
    "block_size": {"help": "context length in tokens (characters with --tokenizer char)"},
    "n_layer": {"help": "transformer blocks"},
    "n_head": {"help": "attention heads per block"},
    "n_embd": {"help": "embedding width"},
    "dropout": {"help": "dropout probability", "init": INIT_SOURCE_DEFAULT},
    "attn_dropout": {"help": "dropout on the attention weights (default: --dropout); 0 keeps the "
                     "fused kernel", "init": INIT_SOURCE_DEFAULT},
    "bias": {"help": "biases in Linear and LayerNorm layers"},
    "causal": {"help": "mask future positions (--no-causal is a lesson in why it matters)",
               "init": INIT_SOURCE_DEFAULT},
    "pos_embedding": {"help": "positions: a learned table, or rotary embeddings (rope)",
                      "choices": POS_EMBEDDINGS},
    "norm": {"help": "layernorm, or rmsnorm", "choices": NORMS},
    "qk_norm": {"help": "normalise each head's queries and keys: rmsnorm, layernorm, or none",
                "choices": QK_NORMS},
    "mlp": {"help": "MLP activation: gelu, gelu_tanh (GPT-2's tanh approximation), relu2 (squared "
            "ReLU) or swiglu", "choices": MLPS},
    "tie_embeddings": {"help": "share the token embedding table with the output head"},
    "zero_init": {"help": "initialise residual projections and the head to zero"},
    "logit_softcap": {"help": "squash logits into (-CAP, CAP) with CAP*tanh(x/CAP)",
                      "metavar": "CAP"},
    "value_embeds": {"help": "the first N blocks add a token embedding table of their own to "
                     "the attention values", "metavar": "N"},
    "x0_skip": {"help": "a learned weight per block adds the embeddings (x0) back into the "
                "residual stream before it"},
}
for _meta in MODEL_SETTINGS.values():
    _meta.setdefault("init", INIT_SOURCE)


def _placeholder_model() -> GPTConfig:
    return GPTConfig(vocab_size=1)  # the vocabulary is filled in once the tokenizer is known


@dataclass
class DataConfig:
    """What the model reads: the text, how it becomes tokens, and the batches drawn from it."""

    source: str = setting(
        "shakespeare", "text file, directory (every UTF-8 text file under it; binary files are "
        "skipped), or 'shakespeare'", key="data", resume=RESUME_SAME_TEXT,
    )
    glob: str | None = setting(
        None, "with a directory as --data: read only the files matching this pattern, e.g. "
        "'**/*.md' (then a file that is not UTF-8 is an error)", metavar="PATTERN",
    )
    encoding_errors: str = setting(
        "strict", "invalid UTF-8: 'strict' stops with an error, 'replace' substitutes U+FFFD",
        choices=("strict", "replace"),
    )
    tokenizer: str = setting(
        "char", "char: one token per character (the lecture's); bpe: byte-level BPE (Hugging Face "
        "tokenizers) trained on the train split", choices=TOKENIZER_KINDS, init=INIT_SOURCE,
    )
    vocab_size: int | None = setting(
        None, f"with --tokenizer bpe: tokens in the vocabulary, at least 257 (default: "
        f"{DEFAULT_BPE_VOCAB})", metavar="N", init=INIT_SOURCE,
    )
    batch_size: int = setting(32, "sequences per optimizer step")
    batch_start: int | None = setting(
        None, "batch-size warmup: sequences per step at the start, growing to --batch-size over "
        "--batch-warmup-steps in multiples of this (default, or not below --batch-size: no "
        "warmup)",
    )
    batch_warmup_steps: int = setting(0, "steps over which the batch grows from --batch-start")
    sampling: str = setting(
        "random", "random: each window drawn anywhere, with replacement (the lecture's); epoch: "
        "without replacement, every token once per epoch", choices=SAMPLINGS,
    )
    grad_accum: int = setting(
        1, "split each process's share of the batch into this many micro-batches (gradients "
        "accumulated; the same update, less memory)", metavar="K", resume=RESUME_CHANGE,
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            _check_int(name, getattr(self, name), 1)
        if self.batch_start is not None:
            _check_int("batch_start", self.batch_start, 1)
        _check_int("batch_warmup_steps", self.batch_warmup_steps, 0)
        _check_choice("tokenizer", self.tokenizer, TOKENIZER_KINDS)
        _check_choice("sampling", self.sampling, SAMPLINGS)
        if self.vocab_size is not None:
            if self.tokenizer != "bpe":
                raise ValueError("--vocab-size is for --tokenizer bpe (a character vocabulary is "
                                 "the text's own characters)")
            if _bad_int(self.vocab_size, minimum=257):
                raise ValueError(f"vocab_size must be an integer >= 257 (the 256 bytes and at "
                                 f"least one merge), got {self.vocab_size!r}")

    @property
    def bpe_vocab_size(self) -> int | None:
        """The BPE vocabulary to train, or None for characters."""
        if self.tokenizer != "bpe":
            return None
        return self.vocab_size or DEFAULT_BPE_VOCAB


@dataclass
class OptimConfig:
    """The optimizer and the learning-rate schedule (see ``tinygpt.optim``)."""

    optimizer: str = setting(
        "adamw", "adamw, or muon (Muon for the block matrices, AdamW for the rest)",
        choices=OPTIMIZERS,
    )
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    muon_lr: float = setting(0.02, "peak learning rate of Muon (with --optimizer muon)")
    schedule: str = setting(
        "cosine", "cosine decay, or wsd (warmup-stable-decay: flat, then a linear decay)",
        choices=SCHEDULES,
    )
    decay_fraction: float = setting(0.2, "wsd: the final fraction of the run spent decaying")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = setting(100, "linear warmup steps")
    weight_decay: float = setting(0.1, "AdamW weight decay on weight matrices")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.99, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)")

    def __post_init__(self) -> None:
        for name in ("lr", "muon_lr"):
            v = getattr(self, name)
            if not _finite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        _check_int("warmup_steps", self.warmup_steps, 0)
        if not _finite(self.decay_fraction) or not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if not _finite(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not _finite(v) or not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")


@dataclass
class RunConfig:
    """The run around the loop: where it lives, how long it trains, how often it evaluates and
    saves, and the hardware it runs on."""

    out: str | None = setting(None, "run directory (default: runs/MODEL)")
    overwrite: bool = setting(False, "replace an existing run in --out")
    init_from: str | None = setting(
        None, "start from the weights of this run (fine-tuning: same vocabulary and model shape, "
        "new optimizer and schedule)", metavar="RUN_DIR",
    )
    max_steps: int | None = setting(2000, "optimizer steps", resume=RESUME_CHANGE)
    max_time: str | None = setting(
        None, "training-time budget, e.g. 90s or 5m (evaluations and checkpoints not counted); "
        "the LR schedule is stretched over it", resume=RESUME_CHANGE,
    )
    eval_interval: int = setting(250, "steps between evaluations and checkpoints",
                                 resume=RESUME_CHANGE)
    eval_iters: int = setting(50, "batches per split in each evaluation")
    full_val: bool = setting(
        False, "evaluate val loss over the whole val split (as tinygpt eval does), not on batches"
    )
    save_every: str | None = setting(
        None, "also save a checkpoint when this much time has passed since the last one (e.g. "
        "10m), so a run killed between evaluations loses little", metavar="DURATION",
        resume=RESUME_CHANGE,
    )
    keep: int = setting(1, "older step checkpoints to keep besides last and best", metavar="N",
                        resume=RESUME_CHANGE)
    sample_chars: int = setting(
        400, "tokens (characters with --tokenizer char) sampled at the end of training (0: none)",
        resume=RESUME_CHANGE,
    )
    stop_when_overfitting: bool = setting(
        False, "end the run (saving as usual) once the val loss has risen for a while since its "
        "best while the train loss still falls: the model has begun to memorise its text",
        resume=RESUME_CHANGE,
    )
    seed: int = setting(1337, "random seed")
    device: str = setting("auto", DEVICE_HELP, resume=RESUME_CHANGE)
    dtype: str = setting(
        "float32", "float32; bfloat16 (mixed precision: bf16 matrix products, float32 weights); "
        "float16 (the same in fp16, with a gradient scaler; a step whose gradients overflow is "
        "skipped and counted); auto: bfloat16 where the hardware multiplies it natively (CPUs "
        "with AMX or AVX512-BF16, CUDA GPUs from Ampere on), float16 on older CUDA GPUs with "
        "tensor cores (V100, T4, RTX 20 series), float32 elsewhere (never float16 on a CPU, "
        "where it is emulated)", choices=DTYPES,
    )
    dist_timeout: str = setting(
        "10m", "under torchrun: how long a rank waits for the others (rendezvous, gradient "
        "averaging) before the run fails, e.g. 90s or 5m; a stalled rank stops the job in that "
        "time", metavar="DURATION", resume=RESUME_CHANGE,
    )
    check: bool = setting(
        True, "with --model FILE.py:NAME: run tinygpt check on the class first and stop if a "
        "check fails (--no-check trains it anyway)", resume=RESUME_CHANGE,
    )
    compile: bool = setting(
        False, "compile the training step with torch.compile (on a CPU it needs a C++ compiler); "
        "the first step then takes seconds to a minute, counted in the training time",
        resume=RESUME_CHANGE,
    )
    tensorboard: str | None = setting(
        None, "also write TensorBoard event files into this folder (losses, bits/char, learning "
        "rate, tokens/s, the end sample, the loss figure); needs the tensorboard package (pip "
        "install 'tinygpt[tensorboard]')", metavar="DIR", resume=RESUME_CHANGE,
    )

    def __post_init__(self) -> None:
        for name in ("eval_interval", "eval_iters"):
            _check_int(name, getattr(self, name), 1)
        for name in ("sample_chars", "keep"):
            _check_int(name, getattr(self, name), 0)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        for name in ("max_time", "save_every", "dist_timeout"):
            if getattr(self, name) is not None:
                parse_duration(getattr(self, name))
        if self.max_steps is None and self.max_time is None:
            raise ValueError("give --max-steps or --max-time (or both)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ValueError(f"unknown device {self.device!r}; use {DEVICE_HELP}")

    # Read at every training step: parsed once (a changed setting makes a new RunConfig).
    @functools.cached_property
    def max_time_s(self) -> float | None:
        return None if self.max_time is None else parse_duration(self.max_time)

    @functools.cached_property
    def dist_timeout_s(self) -> float:
        return parse_duration(self.dist_timeout)

    @functools.cached_property
    def save_every_s(self) -> float | None:
        return None if self.save_every is None else parse_duration(self.save_every)


@dataclass
class TrainConfig:
    """Everything a training run is configured by; build it with ``resolve`` (presets applied)
    or ``from_dict`` (a saved run's flat settings)."""

    kind: str = setting("gpt", MODEL_HELP, key="model", init=INIT_SOURCE)
    preset: str | None = setting(None, "named set of defaults", choices=tuple(PRESETS))
    fit_to_corpus: bool = setting(
        True, "with the modern preset, a new run chooses the model size, dropout, steps and "
        "eval interval that are not given from the size of its corpus (see docs/recipe.md); "
        "--no-fit-to-corpus keeps the preset's values",
    )
    # The model's shape; with --model bigram only block_size is read (the bigram sees one token).
    model: GPTConfig = field(default_factory=_placeholder_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        model_kind(self.kind)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")

    @property
    def run_dir(self) -> str:
        if is_learner_kind(self.kind):
            return self.run.out or f"runs/{run_name(self.kind)}"
        return self.run.out or f"runs/{self.kind}"

    def model_config(self, vocab_size: int) -> BigramConfig | GPTConfig | LearnerConfig:
        """The model to build once the tokenizer says how many tokens there are."""
        if is_learner_kind(self.kind):
            return self.learner_config(vocab_size)
        if self.kind == "bigram":
            return BigramConfig(vocab_size=vocab_size)
        return dataclasses.replace(self.model, vocab_size=vocab_size)

    def learner_config(self, vocab_size: int) -> LearnerConfig:
        """A class of one's own (``--model FILE.py:NAME``), sized by ``cfg.model``; its file's
        path and sha256 as they are now."""
        from pathlib import Path

        path, name = parse_spec(self.kind)
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise ValueError(f"--model {self.kind}: no such file: {path}")
        m = self.model
        return LearnerConfig(vocab_size, m.block_size, m.n_embd, m.n_head, m.n_layer, m.dropout,
                             str(p), name or "", file_sha256(p))

    def to_dict(self) -> dict:
        """The flat settings (``config.json``, a checkpoint's ``train_config``)."""
        return {s.key: getattr(self._part(s), s.name) for s in SETTINGS.values()}

    def _part(self, s: Setting):
        return self if s.part is None else getattr(self, s.part)

    @classmethod
    def from_dict(cls, settings: dict) -> TrainConfig:
        """A config from flat settings (missing ones take their defaults; no preset applied)."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        parts: dict[str, dict] = {p: {} for p in PARTS}
        top = {}
        for key, value in settings.items():
            s = SETTINGS[key]
            (top if s.part is None else parts[s.part])[s.name] = value
        model = GPTConfig(vocab_size=1, **parts["model"])
        return cls(**top, model=model, **{p: PARTS[p](**kw) for p, kw in parts.items()
                                          if p != "model"})

    @classmethod
    def resolve(cls, settings: dict) -> TrainConfig:
        """Apply the preset named in ``settings`` (or the model's default) under ``settings``."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        kind = model_kind(settings.get("model", "gpt"))
        preset = settings.get("preset") or preset_for(kind)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merged = {**PRESETS[preset].settings, **settings, "preset": preset}
        # A time budget alone replaces the preset's step count instead of competing with it.
        if "max_time" in settings and "max_steps" not in settings:
            merged["max_steps"] = None
        return cls.from_dict(merged)


# ------------------------------------------------------------------- the settings, flat by name

PARTS = {"model": GPTConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass(frozen=True)
class Setting:
    """One setting: its flag/TOML key, where it lives (``cfg.<part>.<name>``), type and text."""

    key: str
    part: str | None  # None: a field of TrainConfig itself
    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None
    metavar: str | None = None
    resume: str | None = None
    init: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def _plain_type(t) -> type:
    """``int | None`` -> ``int``."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _settings_of(cls: type, part: str | None, meta_of) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = meta_of(f)
        if meta is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Setting(
            key=meta.get("key", f.name), part=part, name=f.name, type=_plain_type(hints[f.name]),
            default=default, help=meta.get("help", ""), choices=meta.get("choices"),
            metavar=meta.get("metavar"), resume=meta.get("resume"), init=meta.get("init"),
        ))
    return out


def _all_settings() -> dict[str, Setting]:
    found = _settings_of(TrainConfig, None, lambda f: None if f.name in PARTS else f.metadata)
    found += _settings_of(GPTConfig, "model", lambda f: MODEL_SETTINGS.get(f.name))
    for part in ("data", "optim", "run"):
        found += _settings_of(PARTS[part], part, lambda f: f.metadata)
    return {s.key: s for s in found}


SETTINGS: dict[str, Setting] = _all_settings()  # every setting by its flag/TOML key


def resume_flags() -> str:
    """The flags ``--resume`` may change (their fields' ``resume`` metadata), for help and errors."""
    return ", ".join(s.flag for s in SETTINGS.values() if s.resume == RESUME_CHANGE)


def default_value(key: str, preset: str | None = None) -> object:
    """What ``key`` is under ``preset`` (default: the GPT's default preset) when not given."""
    p = PRESETS[preset or DEFAULT_PRESET["gpt"]]
    return p.settings.get(key, SETTINGS[key].default)


def help_text(key: str) -> str:
    """The help of a setting, with its true default and the presets that set it otherwise."""
    s = SETTINGS[key]
    if key == "preset":
        names = "; ".join(f"{n}: {p.description}" for n, p in PRESETS.items())
        return (f"named set of defaults (default: {DEFAULT_PRESET['gpt']} for --model gpt, "
                f"{DEFAULT_PRESET['bigram']} for --model bigram, {LEARNER_PRESET} for --model "
                f"FILE.py:NAME) -- {names}")
    default = default_value(key)
    others = [f"{n}={default_value(key, n)}" for n in PRESETS
              if default_value(key, n) != default]
    notes = [] if default is None else [f"default: {default}"]
    if others:
        notes.append(f"presets: {', '.join(others)}")
    return s.help + (f" ({'; '.join(notes)})" if notes else "")


# ---------------------------------------------------------------------------------- durations

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)?", re.IGNORECASE)
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``5m``, ``1h30m``, ``2.5m``. Raises ``ValueError``."""
    s = str(text).strip().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if not m or m.end() == pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2).lower() if m.group(2) else None]
        pos = m.end()
    if not s or pos != len(s) or not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"cannot read duration {text!r}; use e.g. 90s, 5m, 1h30m (a positive amount)"
        )
    return total


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad_int(v, minimum: int) -> bool:
    return isinstance(v, bool) or not isinstance(v, int) or v < minimum


def _check_int(name: str, value, minimum: int) -> None:
    if _bad_int(value, minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_choice(name: str, value, allowed: tuple, what: str | None = None) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what or name} {value!r}; choose one of {', '.join(allowed)}")
