"""The sampling settings, defined once: their rules, their messages, their command-line flags."""

import argparse
from dataclasses import fields

import pytest
import torch

from tinygpt.generate import make_generator, sample_next
from tinygpt.sampling import (
    MAX_LOGPROBS,
    GenerationConfig,
    SamplingConfig,
    SettingError,
    add_sampling_flags,
    sampling_from_args,
)


def test_off_is_off_however_it_is_said():
    assert SamplingConfig(top_k=0) == SamplingConfig() == SamplingConfig(top_p=1)
    assert SamplingConfig(top_k=0).top_k is None and SamplingConfig(top_p=1.0).top_p is None
    logits = torch.randn(3, 7)
    draws = [sample_next(logits, SamplingConfig(top_k=k), make_generator(4)) for k in (0, None)]
    assert draws[0].tolist() == draws[1].tolist()


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -0.1}, "temperature must be between 0 and 2, got -0.1"),
    ({"temperature": 2.01}, "temperature must be between 0 and 2, got 2.01"),
    ({"temperature": float("inf")}, "temperature must be between 0 and 2, got inf"),
    ({"temperature": True}, "temperature must be between 0 and 2, got True"),
    ({"temperature": "hot"}, "temperature must be between 0 and 2, got 'hot'"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0 turns it off), got -1"),
    ({"top_k": 2.0}, "top_k must be an integer >= 0 (0 turns it off), got 2"),
    ({"top_p": 0}, "top_p must be in (0, 1] (1 turns it off), got 0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1] (1 turns it off), got 1.5"),
])
def test_sampling_rules_say_what_is_allowed(kw, message):
    with pytest.raises(SettingError) as e:
        SamplingConfig(**kw)
    assert str(e.value) == message and e.value.name == next(iter(kw))


def test_the_edges_of_every_range_are_allowed():
    SamplingConfig(temperature=0, top_k=0, top_p=5e-324)
    SamplingConfig(temperature=2, top_k=10**6, top_p=1)
    GenerationConfig(0, seed=-(2**63), logprobs=0)
    GenerationConfig(10**6, seed=2**63 - 1, logprobs=MAX_LOGPROBS)


@pytest.mark.parametrize("kw, name, words", [
    ({"max_tokens": -1}, "max_tokens", "an integer >= 0"),
    ({"seed": 2**63}, "seed", "an integer between -9223372036854775808 and 9223372036854775807"),
    ({"seed": 1.0}, "seed", "an integer between"),
    ({"logprobs": 6}, "logprobs", "an integer between 0 and 5"),
    ({"stop": ("ok", "")}, "stop", "non-empty strings"),
])
def test_generation_rules(kw, name, words):
    with pytest.raises(SettingError) as e:
        GenerationConfig(**kw)
    assert e.value.name == name and words in str(e.value)


def test_stop_strings_are_a_tuple_without_repeats_and_seeds_count_up():
    config = GenerationConfig(stop=["\n", "END", "\n"], seed=2**63 - 1)
    assert config.stop == ("\n", "END")
    assert GenerationConfig(stop="END").stop == ("END",)
    assert [config.seed_of(i) for i in range(2)] == [2**63 - 1, 2**63]  # reduced mod 2**64 later
    assert GenerationConfig().seed_of(3) is None


def test_top_k_is_checked_against_the_vocabulary():
    SamplingConfig(top_k=65).check_vocab(65)
    with pytest.raises(SettingError, match=r"top_k must be an integer between 0 and 65"):
        SamplingConfig(top_k=66).check_vocab(65)


def test_every_setting_says_what_it_means():
    for cls in (SamplingConfig, GenerationConfig):
        for f in fields(cls):
            if f.name != "sampling":
                assert f.metadata["help"], f.name


def test_a_setting_error_names_a_flag_or_a_parameter():
    with pytest.raises(SettingError) as e:
        SamplingConfig(top_p=0)
    assert str(e.value.named("--top-p")) == "--top-p must be in (0, 1] (1 turns it off), got 0"
    assert str(e.value.named("'top_p'")).startswith("'top_p' must be in (0, 1]")


# --- the command line ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_sampling_flags(p)
    return p


def test_the_flags_and_defaults_are_tinygpt_samples():
    args = parser().parse_args([])
    assert vars(args) == {"num_chars": 500, "temperature": 1.0, "top_k": None, "top_p": None,
                          "seed": None, "stop": []}
    assert sampling_from_args(args) == GenerationConfig(500, SamplingConfig(1.0))
    args = parser().parse_args(["--num-chars", "7", "--temperature", "0.5", "--top-k", "3",
                                "--top-p", "0.9", "--seed", "-4", "--stop", "a", "--stop", "bc"])
    assert sampling_from_args(args) == GenerationConfig(7, SamplingConfig(0.5, 3, 0.9), -4,
                                                        ("a", "bc"))
    assert sampling_from_args(parser().parse_args(["--top-k", "0"])).sampling.top_k is None


def test_the_help_gives_each_range():
    text = parser().format_help()
    for words in ("between 0 and 2", "0 turns it off", "in (0, 1]", "(default: 500)",
                  "(default: random)", "(repeatable)"):
        assert words in " ".join(text.split()), words


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "2.5"], "--temperature must be between 0 and 2, got 2.5"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0 (0 turns it off), got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 turns it off), got 0"),
    (["--num-chars", "-5"], "--num-chars must be an integer >= 0, got -5"),
    (["--seed", str(2**64)], "--seed must be an integer between"),
    (["--stop", ""], "--stop must be non-empty strings, got ''"),
])
def test_a_bad_flag_is_named_in_one_line(argv, message):
    with pytest.raises(SettingError) as e:
        sampling_from_args(parser().parse_args(argv))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
