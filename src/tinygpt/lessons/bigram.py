"""The bigram model of the mid-term, looked at: its learned table next to the one you get by
counting pairs of characters in the text.

The bigram model's whole state is a (V, V) table of scores; softmax of row i is its guess of
P(next | current = i). Counting gives the best possible table directly: P(j | i) = N(i, j) /
N(i, ·), and its loss on the text is the lowest any bigram model can reach there (the
closed-form optimum, ``optimum_loss``). Gradient descent on the scores approaches that table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinygpt.data import Corpus
from tinygpt.evaluate import evaluate_tokens
from tinygpt.files import write_json
from tinygpt.lessons.training import Hyper, sample_text, train_model
from tinygpt.models.bigram import BigramConfig, BigramLM

# The lecture's bigram.py: batch 32, context 8 (irrelevant to a bigram), lr 1e-2, 3000 steps.
DEFAULT_STEPS = 3000


def count_pairs(tokens: np.ndarray, vocab_size: int) -> torch.Tensor:
    """N (V, V): N[i, j] = how often character j follows character i in ``tokens``."""
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    pairs = t[:-1] * vocab_size + t[1:]
    return torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)


def counted_probs(counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``counts`` normalised to probabilities; a character never seen is followed
    uniformly."""
    counts = counts.double()
    rows = counts.sum(dim=1, keepdim=True)
    uniform = torch.full_like(counts, 1.0 / counts.size(1))
    return torch.where(rows > 0, counts / rows.clamp_min(1), uniform)


def optimum_loss(counts: torch.Tensor) -> float:
    """The loss of the counted table on the pairs it was counted from: -sum N log P / sum N.
    No bigram model can do better on that text."""
    counts = counts.double()
    p = counted_probs(counts)
    seen = counts > 0
    return (-(counts[seen] * p[seen].log()).sum() / counts.sum()).item()


def learned_probs(model: BigramLM) -> torch.Tensor:
    """The model's P(next | current), (V, V): softmax of each row of its table."""
    return torch.softmax(model.token_embedding_table.weight.detach().float(), dim=-1)


def total_variation(model: BigramLM, counted: torch.Tensor, row_weight: torch.Tensor) -> float:
    """How far the model's table is from the counted one: per row, half the summed absolute
    difference of the probabilities (0: equal, 1: disjoint), averaged with ``row_weight``."""
    diff = (learned_probs(model).double() - counted.double()).abs().sum(dim=1)
    return (0.5 * diff * row_weight).sum().item()


@dataclass
class BigramLesson:
    learned: torch.Tensor  # (V, V) the model's P(next | current)
    counted: torch.Tensor  # (V, V) from the training text
    learned_loss: float  # on the training split
    optimum_loss: float  # the counted table's, on the training split
    val_loss: float
    total_variation: float  # mean over characters (weighted by frequency) of TV(learned, counted)
    sample: str
    steps: int
    convergence: list[tuple[int, float]]  # (step, total variation) while training


def run_bigram(
    corpus: Corpus, steps: int = DEFAULT_STEPS, seed: int = 1337, out_dir: Path | None = None,
    sample_chars: int = 500,
) -> BigramLesson:
    V = corpus.tokenizer.vocab_size
    train_tokens = corpus.split("train")
    counts = count_pairs(train_tokens, V)
    counted = counted_probs(counts).float()
    torch.manual_seed(seed)
    model = BigramLM(BigramConfig(V))
    hp = Hyper(batch_size=32, block_size=8, lr=1e-2, max_iters=steps, eval_interval=max(1, steps // 10))
    row_weight = counts.sum(dim=1).double() / counts.sum()  # how often each character occurs
    convergence: list[tuple[int, float]] = []
    trained = train_model(
        model, corpus, hp, seed,
        on_eval=lambda step, m: convergence.append((step, total_variation(m, counted, row_weight))),
    )
    learned = learned_probs(model)
    learned_loss = evaluate_tokens(model, train_tokens, 256, batch_size=256)["val_loss"]
    lesson = BigramLesson(
        learned, counted, learned_loss, optimum_loss(counts), trained.val_loss, convergence[-1][1],
        sample_text(model, corpus, sample_chars, 8, seed), trained.steps, convergence,
    )
    if out_dir is not None:
        from tinygpt.plots import plot_bigram

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_bigram(learned, counted, corpus.tokenizer.chars, out_dir / "bigram.png",
                    learned_loss, lesson.optimum_loss)
        write_json(out_dir / "bigram.json", {
            "steps": lesson.steps, "learned_train_loss": learned_loss,
            "optimum_train_loss": lesson.optimum_loss, "val_loss": lesson.val_loss,
            "total_variation": lesson.total_variation, "convergence": lesson.convergence,
            "sample": lesson.sample,
        })
    return lesson
