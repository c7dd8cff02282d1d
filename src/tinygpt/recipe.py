"""The ``modern`` preset sized to the corpus: ``recipe_for`` and ``fit_to_corpus``.

The preset was tuned on Tiny Shakespeare: about a million training characters, of which 600
steps of 32 windows of 64 characters see each about once. On a corpus of 40 KB the same run
sees each character thirty times and learns the text by heart (the val loss bottoms out within
the first third of the run and then climbs). So, unless told otherwise, a new ``modern`` run
chooses its model size, dropout, number of steps and evaluation interval from the number of
training tokens, by the rule below -- found by measurement on corpora of 24 KB to 2 MB in five
languages (``benchmarks/bench_recipe.py``, the table in ``docs/recipe.md``):

* at 100,000 training tokens and above, the preset as it is (the main job keeps its recipe);
* below that, a model half as wide (64), dropout 0.1 and an evaluation every 50 steps instead
  of 100, so that the best checkpoint is found;
* the same 600 steps at every size: fewer steps on a small text lost more than they saved.

With ``--max-time`` the budget decides the number of steps; the model, dropout and evaluation
interval still follow the corpus. Any of these settings given by flag or TOML is kept as given,
and ``--no-fit-to-corpus`` keeps the preset's values. What was chosen, and why, is one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tinygpt.config import TrainConfig

FITTED_KEYS = ("n_layer", "n_head", "n_embd", "dropout", "max_steps", "eval_interval")
SMALL_TOKENS = 100_000  # from here up the preset as it is; below, a narrower model and dropout
STEPS = 600


@dataclass(frozen=True)
class CorpusRecipe:
    """What the corpus size chose (``max_steps`` None: the time budget decides)."""

    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    max_steps: int | None
    eval_interval: int
    why: str


def recipe_for(train_tokens: int, timed: bool = False) -> CorpusRecipe:
    """The modern recipe for ``train_tokens`` training tokens; ``timed``: --max-time decides
    the number of steps.

    Measured (docs/recipe.md): from 100,000 tokens up the preset's 600 steps do not memorise the
    text (on 360,000 and 670,000 tokens the val loss still falls at step 600, and dropout 0.1
    costs 0.13-0.14 nats). Below that they do; cutting the steps loses more than it saves, while
    a model half as wide (four times fewer weights in its blocks, about three times faster) with
    dropout 0.1 was the best or within 0.02 nats of the best of the grid. An evaluation every 50
    steps finds the best checkpoint, which on these texts came anywhere from step 100 to 600.
    """
    if train_tokens >= SMALL_TOKENS:
        width, dropout, every = 128, 0.0, 100
        why = "the preset as tuned: a text this large is not memorised in 600 steps"
    else:
        width, dropout, every = 64, 0.1, 50
        why = ("a text this small is memorised within a few hundred steps: a narrower model, "
               "dropout, and evaluations often enough to keep the best")
    return CorpusRecipe(4, 4, width, dropout, None if timed else STEPS, every, why)


def fit_to_corpus(cfg: TrainConfig, given: set[str], train_tokens: int
                  ) -> tuple[TrainConfig, str | None]:
    """``cfg`` with the settings not in ``given`` sized to ``train_tokens``, and the line that
    says so (None, and ``cfg`` unchanged, when nothing was left to choose)."""
    free = [k for k in FITTED_KEYS if k not in given]
    if not free:
        return cfg, None
    r = recipe_for(train_tokens, timed=cfg.run.max_time is not None and "max_steps" not in given)
    model = {k: getattr(r, k) for k in ("n_layer", "n_head", "n_embd", "dropout") if k in free}
    run = {k: getattr(r, k) for k in ("max_steps", "eval_interval") if k in free}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                              run=dataclasses.replace(cfg.run, **run))
    m, rc = cfg.model, cfg.run
    steps = f"{rc.max_steps} steps" if rc.max_steps is not None else f"steps for {rc.max_time}"
    line = (f"recipe for {train_tokens:,} training tokens: {m.n_layer} layers x {m.n_embd} wide, "
            f"dropout {m.dropout:g}, {steps}, eval every {rc.eval_interval} ({r.why}; "
            f"flags set any of these, --no-fit-to-corpus keeps the preset's)")
    return cfg, line


def fits(cfg: TrainConfig, resumed: bool) -> bool:
    """Whether a run sizes itself to its corpus: a new GPT run of the modern preset."""
    return (not resumed and cfg.fit_to_corpus and cfg.kind == "gpt" and cfg.preset == "modern"
            and not cfg.run.init_from)
