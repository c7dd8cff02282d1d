"""The ``modern`` preset sized to the corpus: ``recipe_for`` and ``fit_to_corpus``.

The preset was tuned on Tiny Shakespeare: about a million training characters, of which 600
steps of 32 windows of 64 characters see each about once. On a corpus of 40 KB the same run
sees each character thirty times and learns the text by heart (the val loss bottoms out within
the first third of the run and then climbs). So, unless told otherwise, a new ``modern`` run
chooses its model size, dropout, number of steps and evaluation interval from the number of
training tokens, by the rule below -- found by measurement on corpora of 24 KB to 2 MB in five
languages (``benchmarks/bench_recipe.py``, the table in ``docs/recipe.md``):

* at a million training tokens and above, the preset as it is (the main job keeps its recipe);
* below that, fewer steps -- about as many as keep a corpus from being seen more than a few
  dozen times -- and dropout that rises as the corpus shrinks;
* an evaluation about every sixth of the run, so the best checkpoint is found.

With ``--max-time`` the budget decides the number of steps; the model, dropout and evaluation
interval still follow the corpus. Any of these settings given by flag or TOML is kept as given,
and ``--no-fit-to-corpus`` keeps the preset's values. What was chosen, and why, is one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tinygpt.config import TrainConfig

FITTED_KEYS = ("n_layer", "n_head", "n_embd", "dropout", "max_steps", "eval_interval")
FULL_TOKENS = 1_000_000  # from here up the preset as it is: 600 steps see the text about once
FULL_STEPS = 600
MIN_STEPS = 300  # fewer do not let Muon and the schedule warm up, decay and settle
# (training tokens below which, dropout): the first that applies
DROPOUT_STEPS = ((100_000, 0.2), (FULL_TOKENS, 0.1))


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
    the number of steps."""
    if train_tokens >= FULL_TOKENS:
        steps = FULL_STEPS
        dropout = 0.0
        why = "the preset as tuned on a text this large"
    else:
        # Steps in proportion to the square root of the corpus: a corpus 16x smaller is seen 4x
        # more often, which dropout then keeps from being memorised.
        steps = max(MIN_STEPS, round(FULL_STEPS * (train_tokens / FULL_TOKENS) ** 0.5 / 50) * 50)
        dropout = next(p for limit, p in DROPOUT_STEPS if train_tokens < limit)
        why = "a smaller text is memorised sooner: fewer steps, more dropout"
    return CorpusRecipe(4, 4, 128, dropout, None if timed else steps,
                        max(25, steps // 6 // 25 * 25), why)


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
