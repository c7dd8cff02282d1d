"""What names a learner's model: ``FILE.py[:NAME]``, and the sizes it is built with.

Pure data, importable from anywhere (``tinygpt.config`` reads ``is_learner_kind``)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

# The lecture's hyperparameter names: set as module globals before the class is built, and
# passed to its constructor by name when it takes them.
SIZE_NAMES = ("vocab_size", "block_size", "n_embd", "n_head", "n_layer", "dropout", "device")


def is_learner_kind(kind: str) -> bool:
    """Whether a ``--model`` value names a file of one's own (``FILE.py`` or ``FILE.py:NAME``)."""
    return isinstance(kind, str) and parse_spec(kind)[0].endswith(".py")


def parse_spec(text: str) -> tuple[str, str | None]:
    """``"gpt.py:GPTLanguageModel"`` -> ``("gpt.py", "GPTLanguageModel")``; no ``:NAME``: None."""
    path, sep, name = text.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        return text, None
    return path, name


def run_name(kind: str) -> str:
    """A run directory's default name for a learner's model: ``runs/gpt-GPTLanguageModel``."""
    path, name = parse_spec(kind)
    stem = Path(path).stem
    return f"{stem}-{name}" if name else stem


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class LearnerConfig:
    """A learner's model as a run records it: the sizes it was built with, and its code file
    (absolute path, class name and sha256), checked again whenever the run is loaded."""

    vocab_size: int
    block_size: int
    n_embd: int
    n_head: int
    n_layer: int
    dropout: float
    path: str
    name: str
    sha256: str

    def sizes(self, device: str = "cpu") -> dict:
        return {"vocab_size": self.vocab_size, "block_size": self.block_size,
                "n_embd": self.n_embd, "n_head": self.n_head, "n_layer": self.n_layer,
                "dropout": self.dropout, "device": device}

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def init_loss(self) -> float:
        return math.log(self.vocab_size)
