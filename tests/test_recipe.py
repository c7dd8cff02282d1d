"""The modern preset sized to the corpus (``tinygpt.recipe``): what it chooses, and when."""

from __future__ import annotations

import json

import pytest

from tinygpt.config import PRESETS
from tinygpt.recipe import FITTED_KEYS, SMALL_TOKENS, recipe_for
from tinygpt.resolve import resolve_start

from .resume_helpers import main_in_process

MODERN = PRESETS["modern"].settings


def test_large_corpora_get_the_preset_as_it_is():
    """The main job (Tiny Shakespeare: 1,003,854 training characters) keeps its recipe."""
    for tokens in (SMALL_TOKENS, 360_000, 1_003_854, 50_000_000):
        r = recipe_for(tokens)
        assert (r.n_layer, r.n_head, r.n_embd, r.dropout, r.max_steps, r.eval_interval) == tuple(
            MODERN[k] for k in FITTED_KEYS)


def test_smaller_corpora_get_more_dropout_a_narrower_model_and_more_evaluations():
    sizes = [5_000, 30_000, SMALL_TOKENS - 1, SMALL_TOKENS, 1_003_854]
    recipes = [recipe_for(n) for n in sizes]
    dropouts = [r.dropout for r in recipes]
    widths = [r.n_embd for r in recipes]
    every = [r.eval_interval for r in recipes]
    assert dropouts == sorted(dropouts, reverse=True) and dropouts[0] > dropouts[-1] == 0
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert every == sorted(every) and every[0] < every[-1]
    for r in recipes:  # at least six evaluations a run, and heads that divide the width
        assert r.max_steps // r.eval_interval >= 6 and r.n_embd % r.n_head == 0


def test_a_time_budget_decides_the_steps():
    assert recipe_for(30_000, timed=True).max_steps is None
    assert recipe_for(30_000, timed=True).dropout == recipe_for(30_000).dropout


def test_a_new_run_is_sized_and_says_so(small_text):
    """``small_text`` is a few KB: far below a million tokens."""
    start = resolve_start({"data": str(small_text)})
    r = recipe_for(10)  # the smallest corpora's row
    assert (start.cfg.model.dropout, start.cfg.run.max_steps) == (r.dropout, r.max_steps)
    assert start.cfg.run.eval_interval == r.eval_interval
    assert start.recipe.startswith("recipe for ") and "training tokens" in start.recipe
    assert start.cfg.model.n_embd == r.n_embd
    assert f"dropout {r.dropout:g}" in start.recipe and f"{r.max_steps} steps" in start.recipe


def test_what_is_given_is_kept(small_text):
    start = resolve_start({"data": str(small_text), "dropout": 0.05, "max_steps": 77})
    assert (start.cfg.model.dropout, start.cfg.run.max_steps) == (0.05, 77)
    assert start.cfg.run.eval_interval == recipe_for(10).eval_interval  # the rest is sized
    every = {k: MODERN[k] for k in FITTED_KEYS}
    assert resolve_start({"data": str(small_text), **every}).recipe is None


@pytest.mark.parametrize("settings", [
    {"fit_to_corpus": False}, {"preset": "cpu"}, {"preset": "lecture"}, {"model": "bigram"},
])
def test_other_presets_and_no_fit_keep_their_values(small_text, settings):
    start = resolve_start({"data": str(small_text), **settings})
    assert start.recipe is None
    preset = PRESETS[start.cfg.preset].settings
    assert start.cfg.run.max_steps == preset.get("max_steps", 2000)


def test_the_choice_is_saved_and_a_resumed_run_keeps_it(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    code = main_in_process("train", "--data", small_text, "--out", run, "--max-steps", "2",
                           "--n-layer", "1", "--n-embd", "16", "--sample-chars", "0",
                           "--eval-iters", "1", "--device", "cpu")
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("recipe for ")
    saved = json.loads((run / "config.json").read_text())
    assert saved["dropout"] == recipe_for(10).dropout and saved["max_steps"] == 2
    assert saved["eval_interval"] == recipe_for(10).eval_interval
    # --resume takes the run's own settings: nothing is chosen again, nothing printed
    start = resolve_start({"max_steps": 3}, resume=run)
    assert start.recipe is None and start.cfg.model.dropout == saved["dropout"]
