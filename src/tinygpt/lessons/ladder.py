"""The ladder: from the bigram model to the GPT, one idea per rung, as in the lecture.

Every rung is a small model class that differs from the one before it by exactly one idea; each
class overrides one method of the previous one (``make_body`` or ``make_final_norm``), so the
difference is the code you read. They are trained one after the other on the same batches with
the lecture's small hyperparameters, then the last rung is ``tinygpt.models.gpt.GPT`` itself.

    rung                  the one new idea                                       lecture (val)
    bigram                a table of next-character scores                       ~2.49
    one-head              tokens look back at earlier tokens (+ position)        ~2.4
    multi-head            several smaller heads side by side                     ~2.28
    feed-forward          each position thinks on its own after communicating    ~2.24
    blocks-residual       depth that still trains                                ~2.08
    layernorm             normalised inputs to each sub-layer                    ~2.06
    gpt                   scaled up + dropout (the project's GPT)                ~1.48 (GPU)

Shapes: B batch, T time (block_size), C n_embd, V vocabulary, hs head size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.data import Corpus
from tinygpt.files import atomic_write, write_json
from tinygpt.lessons.training import Hyper, Trained, one_line, sample_text, train_model
from tinygpt.models.bigram import BigramConfig, BigramLM
from tinygpt.models.gpt import GPT, GPTConfig


@dataclass
class LadderConfig:
    """The small rungs' sizes (the lecture's)."""

    vocab_size: int
    block_size: int = 8
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 3


# ---------------------------------------------------------------------------- building blocks


class Head(nn.Module):
    """One head of self-attention (the lecture's version 4 of the trick)."""

    def __init__(self, cfg: LadderConfig, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.query = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.value = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k, q = self.key(x), self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5  # (B, T, T) affinities, variance ~1
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # no looking ahead
        wei = F.softmax(wei, dim=-1)
        return wei @ self.value(x)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Several heads side by side, their outputs concatenated; ``proj`` adds the linear layer that
    leads back into the residual path (from the blocks rung on)."""

    def __init__(self, cfg: LadderConfig, num_heads: int, head_size: int, proj: bool = False) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head(cfg, head_size) for _ in range(num_heads))
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd) if proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))  # (B, T, C)


class FeedForward(nn.Module):
    """A small MLP applied to every position on its own; ``wide`` is the blocks rung's version
    (4x wider inside, with a projection back into the residual path)."""

    def __init__(self, cfg: LadderConfig, wide: bool = False) -> None:
        super().__init__()
        C = cfg.n_embd
        if wide:
            self.net = nn.Sequential(nn.Linear(C, 4 * C), nn.ReLU(), nn.Linear(4 * C, C))
        else:
            self.net = nn.Sequential(nn.Linear(C, C), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Communication then computation, each added to a residual path ``x = x + f(x)``; with
    ``layer_norm`` each sub-layer reads a normalised copy of x (pre-norm)."""

    def __init__(self, cfg: LadderConfig, layer_norm: bool) -> None:
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.sa = MultiHeadAttention(cfg, cfg.n_head, head_size, proj=True)
        self.ffwd = FeedForward(cfg, wide=True)
        self.ln1 = nn.LayerNorm(cfg.n_embd) if layer_norm else nn.Identity()
        self.ln2 = nn.LayerNorm(cfg.n_embd) if layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


# -------------------------------------------------------------------------------------- rungs


class OneHeadLM(nn.Module):
    """Rung 2: characters become vectors (token + position embedding), one self-attention head
    lets each position gather from the earlier ones, a linear head reads off the logits."""

    def __init__(self, cfg: LadderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.body = self.make_body(cfg)
        self.ln_f = self.make_final_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def make_body(self, cfg: LadderConfig) -> nn.Module:
        return Head(cfg, head_size=cfg.n_embd)

    def make_final_norm(self, cfg: LadderConfig) -> nn.Module:
        return nn.Identity()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = self.body(tok_emb + pos_emb)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss


class MultiHeadLM(OneHeadLM):
    """Rung 3: four heads of size 8 instead of one of size 32 (the same number of weights)."""

    def make_body(self, cfg: LadderConfig) -> nn.Module:
        return MultiHeadAttention(cfg, cfg.n_head, cfg.n_embd // cfg.n_head)


class FeedForwardLM(MultiHeadLM):
    """Rung 4: after attention (communication), a feed-forward layer per position (computation)."""

    def make_body(self, cfg: LadderConfig) -> nn.Module:
        return nn.Sequential(super().make_body(cfg), FeedForward(cfg))


class BlocksLM(FeedForwardLM):
    """Rung 5: three blocks of attention + feed-forward, each on a residual path (with projections
    and a 4x wider feed-forward): without the residual path this depth does not train well."""

    def make_body(self, cfg: LadderConfig) -> nn.Module:
        return nn.Sequential(*(Block(cfg, layer_norm=False) for _ in range(cfg.n_layer)))


class LayerNormLM(BlocksLM):
    """Rung 6: LayerNorm before each sub-layer and before the head (pre-norm)."""

    def make_body(self, cfg: LadderConfig) -> nn.Module:
        return nn.Sequential(*(Block(cfg, layer_norm=True) for _ in range(cfg.n_layer)))

    def make_final_norm(self, cfg: LadderConfig) -> nn.Module:
        return nn.LayerNorm(cfg.n_embd)


# ------------------------------------------------------------------------------- the ladder

# The final rung on a CPU: the default `cpu` GPT (4 layers x 4 heads x 128, context 64, 0.8M
# parameters) with dropout 0.1, for 1000 steps (a few CPU minutes), instead of the lecture's
# 10.8M parameters (6 x 6 x 384, context 256, dropout 0.2, batch 64, lr 3e-4) trained for 5000
# steps on a GPU. A step count rather than a time budget keeps the rung deterministic.
GPT_RUNG = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
GPT_HYPER = dict(batch_size=32, block_size=64, lr=1e-3, max_iters=1000, eval_interval=100)


@dataclass
class Rung:
    name: str
    idea: str
    lecture_val_loss: float | None
    build: Callable[[int], nn.Module]  # vocab size -> model
    hyper: dict = field(default_factory=dict)  # overrides of the small rungs' Hyper
    lecture_note: str = ""


def _small(cls: type[OneHeadLM]) -> Callable[[int], nn.Module]:
    return lambda vocab: cls(LadderConfig(vocab))


RUNGS = [
    # The lecture's bigram.py trains the table at lr 1e-2 for 3000 steps.
    Rung("bigram", "a table of next-character scores", 2.49,
         lambda vocab: BigramLM(BigramConfig(vocab)), dict(lr=1e-2, max_iters=3000, eval_interval=300)),
    Rung("one-head", "tokens look back at earlier tokens (+ position embedding)", 2.4, _small(OneHeadLM)),
    Rung("multi-head", "several smaller heads side by side", 2.28, _small(MultiHeadLM)),
    Rung("feed-forward", "each position thinks on its own after communicating", 2.24, _small(FeedForwardLM)),
    Rung("blocks-residual", "depth that still trains", 2.08, _small(BlocksLM)),
    Rung("layernorm", "normalised inputs to each sub-layer", 2.06, _small(LayerNormLM)),
    Rung("gpt", "scaled up + dropout: tinygpt.models.gpt.GPT", 1.48,
         lambda vocab: GPT(GPTConfig(vocab_size=vocab, **GPT_RUNG)), GPT_HYPER,
         "the lecture: 6x6x384, context 256, dropout 0.2, 5000 steps on a GPU"),
]


@dataclass
class RungResult:
    name: str
    idea: str
    params: int
    steps: int
    seconds: float
    train_loss: float
    val_loss: float
    bits_per_char: float
    lecture_val_loss: float | None
    sample: str
    curve: list

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_ladder(
    corpus: Corpus, steps: int | None = None, time_limit_s: float | None = None, seed: int = 1337,
    sample_chars: int = 100, rungs: list[Rung] | None = None,
    on_rung: Callable[[RungResult], None] | None = None,
) -> list[RungResult]:
    """Train every rung in turn. ``steps`` replaces every rung's step count; ``time_limit_s``
    caps each rung's training time."""
    results = []
    V = corpus.tokenizer.vocab_size
    for rung in rungs or RUNGS:
        hyper = {**rung.hyper}
        if steps is not None:
            hyper["max_iters"] = steps
            hyper["eval_interval"] = max(1, min(hyper.get("eval_interval", 500), steps // 5 or 1))
            hyper["eval_iters"] = min(20, steps)  # a short run gets short estimates
        if time_limit_s is not None:
            hyper["time_limit_s"] = time_limit_s
        hp = Hyper(**hyper)
        torch.manual_seed(seed)  # the same initial weights for the same rung
        model = rung.build(V)
        # The small rungs' matrices are 32 wide: a second thread costs more than it saves.
        threads = torch.get_num_threads()
        torch.set_num_threads(threads if rung.name == "gpt" else 1)
        try:
            trained: Trained = train_model(model, corpus, hp, seed)
            sample = sample_text(trained.model, corpus, sample_chars, hp.block_size, seed)
        finally:
            torch.set_num_threads(threads)
        result = RungResult(
            rung.name, rung.idea, sum(p.numel() for p in model.parameters()), trained.steps,
            trained.seconds, trained.train_loss, trained.val_loss, trained.bits_per_char,
            rung.lecture_val_loss, sample, [[s, round(v, 4)] for s, _, v in trained.curve],
        )
        results.append(result)
        if on_rung:
            on_rung(result)
    return results


def table_rows(results: list[RungResult]) -> list[list[str]]:
    header = ["rung", "params", "steps", "val loss", "bits/char", "lecture", "time"]
    rows = [header]
    for r in results:
        lecture = "" if r.lecture_val_loss is None else f"~{r.lecture_val_loss:g}"
        rows.append([
            r.name, f"{r.params:,}", str(r.steps), f"{r.val_loss:.3f}", f"{r.bits_per_char:.3f}",
            lecture, f"{r.seconds:.0f} s" if r.seconds >= 10 else f"{r.seconds:.1f} s",
        ])
    return rows


def format_table(results: list[RungResult]) -> str:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: list[RungResult], note: str = "") -> str:
    rows = table_rows(results)
    out = ["# The ladder", ""]
    if note:
        out += [note, ""]
    out.append("| " + " | ".join(rows[0]) + " |")
    out.append("|" + "|".join("---" for _ in rows[0]) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    out += ["", "## Samples (⏎ is a newline)", ""]
    for r in results:
        out.append(f"- **{r.name}** ({r.idea}): `{one_line(r.sample)}`")
    return "\n".join(out) + "\n"


def write_outputs(results: list[RungResult], out_dir: Path, note: str = "") -> dict[str, Path]:
    """``ladder.json``, ``ladder.md`` and ``ladder.png`` in ``out_dir``."""
    from tinygpt.plots import plot_ladder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "ladder.json", "md": out_dir / "ladder.md", "png": out_dir / "ladder.png"}
    write_json(paths["json"], {"note": note, "rungs": [r.to_dict() for r in results]})
    text = markdown(results, note)
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot_ladder([r.to_dict() for r in results], paths["png"])
    return paths


def load_results(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["rungs"]
