"""``TrainConfig``: typed parts, one flat dict of settings on disk, presets, field metadata."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from tinygpt.config import (
    DEFAULT_PRESET,
    INIT_SOURCE,
    INIT_SOURCE_DEFAULT,
    MODEL_SETTINGS,
    PRESETS,
    SETTINGS,
    TrainConfig,
    help_text,
    resume_flags,
)
from tinygpt.models import BigramConfig, GPTConfig

# Every flag and TOML key, and every key of config.json, as they have always been spelled.
FLAT_KEYS = {
    "data", "glob", "model", "preset", "out", "overwrite", "init_from", "encoding_errors",
    "tokenizer", "vocab_size", "batch_size", "batch_start", "batch_warmup_steps", "grad_accum",
    "block_size", "n_layer", "n_head", "n_embd", "dropout", "attn_dropout", "bias", "causal",
    "pos_embedding", "norm", "qk_norm", "mlp", "tie_embeddings", "zero_init", "logit_softcap",
    "optimizer", "lr", "muon_lr", "schedule", "decay_fraction", "min_lr_ratio", "warmup_steps",
    "weight_decay", "beta1", "beta2", "grad_clip", "max_steps", "max_time", "dtype", "compile",
    "eval_interval", "eval_iters", "full_val", "save_every", "keep", "sample_chars", "seed",
    "device", "dist_timeout", "tensorboard", "check", "stop_when_overfitting", "fit_to_corpus",
    "sampling", "value_embeds", "x0_skip",
}


def test_the_settings_keep_their_names():
    assert set(SETTINGS) == FLAT_KEYS
    assert set(TrainConfig.resolve({}).to_dict()) == FLAT_KEYS


def test_every_gpt_field_is_a_setting():
    assert set(MODEL_SETTINGS) == {f.name for f in fields(GPTConfig)} - {"vocab_size"}
    assert all(SETTINGS[k].part == "model" and SETTINGS[k].help for k in MODEL_SETTINGS)


def test_the_model_part_is_a_gpt_config_with_its_defaults():
    cfg = TrainConfig()
    assert isinstance(cfg.model, GPTConfig)
    for f in fields(GPTConfig):
        if f.name != "vocab_size":
            assert getattr(cfg.model, f.name) == f.default, f.name
    gpt = TrainConfig.resolve({"n_layer": 2}).model_config(65)
    assert isinstance(gpt, GPTConfig) and (gpt.vocab_size, gpt.n_layer) == (65, 2)
    assert isinstance(TrainConfig.resolve({"model": "bigram"}).model_config(65), BigramConfig)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_config_survives_its_flat_dict(preset):
    cfg = TrainConfig.resolve({"preset": preset, "max_time": "2m"})
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.run.max_time_s == 120


def test_presets_are_named_configs():
    for name, preset in PRESETS.items():
        assert preset.description and set(preset.settings) <= set(SETTINGS), name
        assert name in help_text("preset") and preset.description in help_text("preset")
    assert DEFAULT_PRESET == {"gpt": "modern", "bigram": "bigram"}
    assert TrainConfig.resolve({"preset": "lecture"}).model.n_embd == 384


def test_what_resume_and_init_from_may_change_is_on_the_fields():
    assert resume_flags().split(", ") == [
        "--grad-accum", "--max-steps", "--max-time", "--eval-interval", "--save-every", "--keep",
        "--sample-chars", "--stop-when-overfitting", "--device", "--dist-timeout", "--check",
        "--compile", "--tensorboard"]
    free = {k for k, s in SETTINGS.items() if s.init == INIT_SOURCE_DEFAULT}
    assert free == {"dropout", "attn_dropout", "causal"}
    fixed = {k for k, s in SETTINGS.items() if s.init == INIT_SOURCE}
    assert {"model", "tokenizer", "vocab_size", "n_layer", "pos_embedding"} <= fixed


@pytest.mark.parametrize("settings, message", [
    ({"lr": 0}, "lr must be a positive number"),
    ({"max_steps": None}, "give --max-steps or --max-time"),
    ({"grad_accum": 0}, "grad_accum must be a positive integer"),
    ({"keep": -1}, "keep must be an integer >= 0"),
    ({"n_embd": 30, "n_head": 4}, "divisible"),
    ({"layers": 2}, "unknown setting(s): layers"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
])
def test_bad_settings_say_what_is_wrong(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.resolve(settings)
