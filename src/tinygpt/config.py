"""Training configuration: one dataclass whose fields are also the CLI flags and TOML keys.

Values are layered: dataclass defaults < preset < TOML file (``--config``) < command-line flags.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field, fields

from tinygpt.device import DEVICE_HELP, DEVICE_PATTERN
from tinygpt.models import MODEL_KINDS, BigramConfig, GPTConfig
from tinygpt.models.config import MLPS, NORMS, POS_EMBEDDINGS, QK_NORMS
from tinygpt.optim import OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "bfloat16", "auto")
TOKENIZER_KINDS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 1024

# Each preset overrides some defaults. `cpu` is the lecture's architecture at CPU size (its values
# are also the dataclass defaults); `bigram` is the default for the bigram model (the mid-term
# assignment); `lecture` is the final model of the lecture video; `modern` (the GPT's default)
# and `modern-large` are below.
PRESETS: dict[str, dict] = {
    "cpu": {},
    "bigram": {
        "batch_size": 32, "block_size": 8, "lr": 1e-2, "warmup_steps": 0,
        "weight_decay": 0.0, "max_steps": 3000, "eval_interval": 500, "eval_iters": 100,
    },
    "lecture": {
        "batch_size": 64, "block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384,
        "dropout": 0.2, "lr": 3e-4, "max_steps": 5000, "eval_interval": 500, "eval_iters": 200,
    },
}
_MODERN_ARCH = {
    "pos_embedding": "rope", "norm": "rmsnorm", "qk_norm": "rmsnorm", "mlp": "relu2", "bias": False,
    "zero_init": True, "dropout": 0.0, "dtype": "auto",
}
_MODERN_OPT = {
    "optimizer": "muon", "muon_lr": 0.02, "lr": 3e-3, "schedule": "wsd", "decay_fraction": 0.3,
    "min_lr_ratio": 0.0, "warmup_steps": 50, "weight_decay": 0.0,
}
# `modern`: the most val loss a couple of CPU minutes buy; `modern-large`: the same recipe, a
# wider model for runs of a quarter of an hour.
PRESETS["modern"] = {
    **_MODERN_ARCH, **_MODERN_OPT, "batch_size": 32, "block_size": 64, "n_layer": 4,
    "n_head": 4, "n_embd": 128, "warmup_steps": 20, "max_steps": 600, "eval_interval": 100,
    # In bf16 on a CPU, GELU's single fused kernel beats ReLU^2's two ops, and learned as well;
    # at a one-minute budget a longer decay (the second half of the run) ends lower. LayerNorm
    # (no bias) is one fused kernel on a CPU where RMSNorm is several: as good per step, and
    # with the complex rotary embeddings a fifth off every step. Half-size batches for the
    # first 200 steps reach a given loss on fewer tokens.
    "mlp": "gelu", "decay_fraction": 0.5, "norm": "layernorm", "qk_norm": "layernorm",
    "batch_start": 16, "batch_warmup_steps": 200,
}
PRESETS["modern-large"] = {
    **_MODERN_ARCH, **_MODERN_OPT, "batch_size": 16, "block_size": 256, "n_layer": 6,
    "n_head": 6, "n_embd": 192, "max_steps": 6000, "eval_interval": 500,
    # Long runs overfit the 1 MB corpus without dropout; keeping it off the attention weights
    # keeps the fused attention kernel. Compiling costs ~20 s once and pays off within minutes.
    "dropout": 0.2, "attn_dropout": 0.0, "compile": True,
}
# The GPT's default is the recipe that gets furthest in a few minutes on any CPU (float32 where
# bf16 is emulated); `cpu` is the lecture's architecture at the same size.
DEFAULT_PRESET = {"gpt": "modern", "bigram": "bigram"}

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


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # what to train on and what to train
    data: str = _opt(
        "shakespeare", "text file, directory (every UTF-8 text file under it; binary files are "
        "skipped), or 'shakespeare'"
    )
    glob: str | None = _opt(
        None, "with a directory as --data: read only the files matching this pattern, e.g. "
        "'**/*.md' (then a file that is not UTF-8 is an error)", metavar="PATTERN",
    )
    model: str = _opt("gpt", "model kind", choices=MODEL_KINDS)
    preset: str | None = _opt(
        None, "named set of defaults (gpt: cpu, bigram: bigram)", choices=tuple(PRESETS)
    )
    out: str | None = _opt(None, "run directory (default: runs/MODEL)")
    overwrite: bool = _opt(False, "replace an existing run in --out")
    init_from: str | None = _opt(
        None, "start from the weights of this run (fine-tuning: same vocabulary and model shape, "
        "new optimizer and schedule)", metavar="RUN_DIR",
    )
    encoding_errors: str = _opt(
        "strict", "invalid UTF-8: 'strict' stops with an error, 'replace' substitutes U+FFFD",
        choices=("strict", "replace"),
    )
    tokenizer: str = _opt(
        "char", "char: one token per character (the lecture's); bpe: byte-level BPE (Hugging Face "
        "tokenizers) trained on the train split", choices=TOKENIZER_KINDS,
    )
    vocab_size: int | None = _opt(
        None, f"with --tokenizer bpe: tokens in the vocabulary, at least 257 (default: "
        f"{DEFAULT_BPE_VOCAB})", metavar="N",
    )
    # model shape (GPT)
    batch_size: int = _opt(32, "sequences per optimizer step")
    batch_start: int | None = _opt(
        None, "batch-size warmup: sequences per step at the start, growing to --batch-size over "
        "--batch-warmup-steps in multiples of this (default, or not below --batch-size: no "
        "warmup)",
    )
    batch_warmup_steps: int = _opt(0, "steps over which the batch grows from --batch-start")
    grad_accum: int = _opt(
        1, "split each process's share of the batch into this many micro-batches (gradients "
        "accumulated; the same update, less memory)", metavar="K",
    )
    block_size: int = _opt(64, "context length in tokens (characters with --tokenizer char)")
    n_layer: int = _opt(4, "transformer blocks")
    n_head: int = _opt(4, "attention heads per block")
    n_embd: int = _opt(128, "embedding width")
    dropout: float = _opt(0.0, "dropout probability")
    attn_dropout: float | None = _opt(
        None, "dropout on the attention weights (default: --dropout); 0 keeps the fused kernel"
    )
    bias: bool = _opt(True, "biases in Linear and LayerNorm layers")
    causal: bool = _opt(True, "mask future positions (--no-causal is a lesson in why it matters)")
    pos_embedding: str = _opt(
        "learned", "positions: a learned table, or rotary embeddings (rope)",
        choices=POS_EMBEDDINGS,
    )
    norm: str = _opt("layernorm", "layernorm, or rmsnorm", choices=NORMS)
    qk_norm: str = _opt(
        "none", "normalise each head's queries and keys: rmsnorm, layernorm, or none",
        choices=QK_NORMS,
    )
    mlp: str = _opt(
        "gelu", "MLP activation: gelu, gelu_tanh (GPT-2's tanh approximation), relu2 (squared "
        "ReLU) or swiglu", choices=MLPS,
    )
    tie_embeddings: bool = _opt(False, "share the token embedding table with the output head")
    zero_init: bool = _opt(False, "initialise residual projections and the head to zero")
    logit_softcap: float | None = _opt(None, "squash logits into (-CAP, CAP) with CAP*tanh(x/CAP)")
    # optimisation
    optimizer: str = _opt(
        "adamw", "adamw, or muon (Muon for the block matrices, AdamW for the rest)",
        choices=OPTIMIZERS,
    )
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    muon_lr: float = _opt(0.02, "peak learning rate of Muon (with --optimizer muon)")
    schedule: str = _opt(
        "cosine", "cosine decay, or wsd (warmup-stable-decay: flat, then a linear decay)",
        choices=SCHEDULES,
    )
    decay_fraction: float = _opt(0.2, "wsd: the final fraction of the run spent decaying")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _opt(100, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay on weight matrices")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)")
    max_steps: int | None = _opt(2000, "optimizer steps")
    max_time: str | None = _opt(
        None, "training-time budget, e.g. 90s or 5m (evaluations and checkpoints not counted); "
        "the LR schedule is stretched over it"
    )
    # speed
    dtype: str = _opt(
        "float32", "float32; bfloat16 (mixed precision: bf16 matrix products, float32 weights); "
        "auto: bfloat16 where the hardware multiplies it natively (CPUs with AMX or AVX512-BF16, "
        "CUDA GPUs with bf16), float32 elsewhere", choices=DTYPES,
    )
    compile: bool = _opt(
        False, "compile the training step with torch.compile (on a CPU it needs a C++ compiler); "
        "the first step then takes seconds to a minute, counted in the training time",
    )
    # bookkeeping
    eval_interval: int = _opt(250, "steps between evaluations and checkpoints")
    eval_iters: int = _opt(50, "batches per split in each evaluation")
    full_val: bool = _opt(
        False, "evaluate val loss over the whole val split (as tinygpt eval does), not on batches"
    )
    save_every: str | None = _opt(
        None, "also save a checkpoint when this much time has passed since the last one (e.g. "
        "10m), so a run killed between evaluations loses little", metavar="DURATION",
    )
    keep: int = _opt(
        1, "older step checkpoints to keep besides last and best", metavar="N"
    )
    sample_chars: int = _opt(
        400, "tokens (characters with --tokenizer char) sampled at the end of training (0: none)"
    )
    seed: int = _opt(1337, "random seed")
    device: str = _opt("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            kinds = ", ".join(MODEL_KINDS)
            raise ValueError(f"unknown model {self.model!r}; choose one of {kinds}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        positive = ("batch_size", "eval_interval", "eval_iters", "grad_accum")
        for name in positive:
            if _bad_int(getattr(self, name), minimum=1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.batch_start is not None and _bad_int(self.batch_start, minimum=1):
            raise ValueError(f"batch_start must be a positive integer, got {self.batch_start!r}")
        for name in ("warmup_steps", "batch_warmup_steps", "sample_chars", "keep"):
            if _bad_int(getattr(self, name), minimum=0):
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_steps is not None and _bad_int(self.max_steps, minimum=1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        for name in ("lr", "muon_lr"):
            v = getattr(self, name)
            if not _finite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
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
        for name in ("max_time", "save_every"):
            if getattr(self, name) is not None:
                parse_duration(getattr(self, name))
        if self.max_steps is None and self.max_time is None:
            raise ValueError("give --max-steps or --max-time (or both)")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(
                f"unknown tokenizer {self.tokenizer!r}; choose one of {', '.join(TOKENIZER_KINDS)}"
            )
        if self.vocab_size is not None:
            if self.tokenizer != "bpe":
                raise ValueError("--vocab-size is for --tokenizer bpe (a character vocabulary is "
                                 "the text's own characters)")
            if _bad_int(self.vocab_size, minimum=257):
                raise ValueError(f"vocab_size must be an integer >= 257 (the 256 bytes and at "
                                 f"least one merge), got {self.vocab_size!r}")
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ValueError(f"unknown device {self.device!r}; use {DEVICE_HELP}")
        # Validate the model shape now, before any data is read.
        self.model_config(vocab_size=1)

    # Read at every training step: parsed once (a changed setting makes a new TrainConfig).
    @functools.cached_property
    def max_time_s(self) -> float | None:
        return None if self.max_time is None else parse_duration(self.max_time)

    @functools.cached_property
    def save_every_s(self) -> float | None:
        return None if self.save_every is None else parse_duration(self.save_every)

    @property
    def bpe_vocab_size(self) -> int | None:
        """The BPE vocabulary to train, or None for characters."""
        if self.tokenizer != "bpe":
            return None
        return self.vocab_size or DEFAULT_BPE_VOCAB

    @property
    def run_dir(self) -> str:
        return self.out or f"runs/{self.model}"

    def model_config(self, vocab_size: int) -> BigramConfig | GPTConfig:
        if self.model == "bigram":
            if _bad_int(self.block_size, minimum=1):
                raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
            return BigramConfig(vocab_size=vocab_size)
        # Every GPTConfig field except the vocabulary is a TrainConfig field of the same name.
        names = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]
        return GPTConfig(vocab_size=vocab_size, **{n: getattr(self, n) for n in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resolve(cls, settings: dict) -> TrainConfig:
        """Apply the preset named in ``settings`` (or the model's default) under ``settings``."""
        unknown = set(settings) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        model = settings.get("model", "gpt")
        if model not in MODEL_KINDS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_KINDS)}")
        preset = settings.get("preset") or DEFAULT_PRESET[model]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merged = {**PRESETS[preset], **settings, "preset": preset}
        # A time budget alone replaces the preset's step count instead of competing with it.
        if "max_time" in settings and "max_steps" not in settings:
            merged["max_steps"] = None
        return cls(**merged)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad_int(v, minimum: int) -> bool:
    return isinstance(v, bool) or not isinstance(v, int) or v < minimum
