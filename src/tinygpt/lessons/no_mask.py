"""What the causal mask is for, with honest numbers.

The same small GPT is trained twice for the same steps on the same batches: once with the mask,
once without (``causal=False``: every position also sees the characters after it). Without the
mask, the character to predict is right there in the input, so the loss the model reports while
training collapses. But when generating there is no future to look at: the **honest loss** scores
each position from its prefix alone, ``model(x[:, :t+1])[:, -1]`` predicts ``x[t+1]``, exactly as
sampling does. For a causal model the two numbers agree; for the cheating one they are worlds
apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.data import Corpus
from tinygpt.files import write_json
from tinygpt.lessons.training import Hyper, sample_text, train_model
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.models.modes import eval_mode

MODEL = dict(block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
DEFAULT_STEPS = 600


def _windows(tokens: np.ndarray, block_size: int, n_windows: int, seed: int) -> torch.Tensor:
    """``n_windows`` random windows of ``block_size + 1`` tokens, (n, block_size + 1)."""
    if len(tokens) < block_size + 1:
        raise ValueError(f"need at least {block_size + 1} tokens, got {len(tokens)}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - block_size, (n_windows,), generator=gen).numpy()
    return torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))


@torch.no_grad()
def reported_loss(
    model: nn.Module, tokens: np.ndarray, block_size: int, n_windows: int = 256, seed: int = 0
) -> float:
    """The usual loss: one forward pass over each window, every position scored at once (what
    training reports). Uses the same windows as ``honest_loss``."""
    windows = _windows(tokens, block_size, n_windows, seed)
    with eval_mode(model):
        logits, _ = model(windows[:, :-1])  # (n, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()).item()


@torch.no_grad()
def honest_loss(
    model: nn.Module, tokens: np.ndarray, block_size: int, n_windows: int = 256, seed: int = 0
) -> float:
    """Mean loss when every position is predicted from its prefix alone (as during generation).

    Takes ``n_windows`` random windows of ``block_size + 1`` tokens; for t = 1..block_size the
    model sees only the first t tokens and its last output is scored against token t. Costs
    ``block_size`` forward passes instead of one: that is the price of not trusting the mask.
    """
    windows = _windows(tokens, block_size, n_windows, seed)
    total = 0.0
    with eval_mode(model):
        for t in range(1, block_size + 1):
            logits, _ = model(windows[:, :t])  # (n, t, V): the model sees t characters, no more
            total += F.cross_entropy(logits[:, -1].float(), windows[:, t], reduction="sum").item()
    return total / (n_windows * block_size)


@dataclass
class MaskResult:
    name: str
    causal: bool
    train_loss: float  # what the model reports on training batches (its own attention)
    val_loss: float  # validation windows, one forward pass each (the model's own attention)
    honest_loss: float  # validation, each position from its prefix alone
    sample: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_no_mask(
    corpus: Corpus, steps: int = DEFAULT_STEPS, seed: int = 1337, out_dir: Path | None = None,
    sample_chars: int = 200, prompt_chars: int = 24,
) -> list[MaskResult]:
    """Train both models; with ``out_dir``, write no_mask.json, no_mask.png and the attention
    pictures of both (attention-causal.png, attention-no-mask.png)."""
    # Estimates only at the start and the end: the lesson compares where the two models arrive.
    hp = Hyper(batch_size=32, block_size=MODEL["block_size"], lr=1e-3, max_iters=steps,
               eval_interval=steps, eval_iters=10)
    V = corpus.tokenizer.vocab_size
    results, models = [], {}
    for name, causal in (("causal", True), ("no-mask", False)):
        torch.manual_seed(seed)  # the same initial weights for both
        model = GPT(GPTConfig(vocab_size=V, causal=causal, **MODEL))
        trained = train_model(model, corpus, hp, seed)  # losses with the model's own attention
        val = corpus.split("val")
        reported = reported_loss(model, val, hp.block_size, seed=seed)
        honest = honest_loss(model, val, hp.block_size, seed=seed)  # the same windows
        # Sampling needs a causal model's guarantees only in spirit: the cheating model is simply
        # run as generation runs it, on the prefix so far.
        sample = sample_text(model, corpus, sample_chars, hp.block_size, seed)
        results.append(MaskResult(name, causal, trained.train_loss, reported, honest, sample))
        models[name] = model
    if out_dir is not None:
        _write_outputs(results, models, corpus, Path(out_dir), prompt_chars)
    return results


def _write_outputs(results, models, corpus: Corpus, out_dir: Path, prompt_chars: int) -> None:
    from tinygpt.models.attention_maps import attention_maps
    from tinygpt.plots import plot_attention, plot_bars

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "no_mask.json", {"results": [r.to_dict() for r in results]})
    plot_bars(
        ["causal (masked)", "no mask"],
        {"training loss (reported)": [r.train_loss for r in results],
         "honest loss (prefix only)": [r.honest_loss for r in results]},
        out_dir / "no_mask.png", "what each model reports vs. what it can do when generating",
        "loss (nats per character)",
    )
    prompt = np.asarray(corpus.split("val")[:prompt_chars], dtype=np.int64)
    chars = corpus.tokenizer.decode(prompt.tolist())
    for r in results:
        maps = attention_maps(models[r.name], torch.from_numpy(prompt))
        plot_attention(maps, list(chars), out_dir / f"attention-{r.name}.png",
                       title=f"{r.name} model: where each position looks")


def format_results(results: list[MaskResult]) -> str:
    lines = [f"{'model':<9} {'train loss':>10} {'val loss':>9} {'honest loss':>12}   (nats/char)"]
    for r in results:
        lines.append(f"{r.name:<9} {r.train_loss:>10.3f} {r.val_loss:>9.3f} {r.honest_loss:>12.3f}")
    return "\n".join(lines)
