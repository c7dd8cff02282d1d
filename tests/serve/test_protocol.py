"""The API checks sampling settings by their one definition: a request means what the same
settings mean to ``tinygpt sample`` and the library."""

from __future__ import annotations

import argparse

import pytest

from tinygpt.sampling import GenerationConfig, SamplingConfig, add_sampling_flags, sampling_from_args
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.protocol import ApiError, check_completion
from tinygpt.tokenizer import CharTokenizer

TOK = CharTokenizer("abcdefghijk")
BODY = {"model": "tiny", "prompt": "abc"}


def check(**fields):
    return check_completion({**BODY, **fields}, "tiny", TOK, ServeLimits())


def cli(*argv: str) -> GenerationConfig:
    p = argparse.ArgumentParser()
    add_sampling_flags(p)
    return sampling_from_args(p.parse_args(list(argv)))


@pytest.mark.parametrize("fields, argv", [
    ({"temperature": 0, "top_k": 0, "top_p": 1}, ["--temperature", "0", "--top-k", "0",
                                                  "--top-p", "1"]),
    ({"temperature": 2, "top_k": 11, "seed": -5, "stop": ["a", "a"]},
     ["--temperature", "2", "--top-k", "11", "--seed", "-5", "--stop", "a", "--stop", "a"]),
    ({"top_p": 0.25, "max_tokens": 7}, ["--top-p", "0.25", "--num-chars", "7"]),
])
def test_the_same_settings_mean_the_same_in_the_api_and_the_cli(fields, argv):
    api = check(max_tokens=fields.pop("max_tokens", 500), **fields).params.config
    assert api == cli(*argv)


@pytest.mark.parametrize("fields, param, words", [
    ({"temperature": 2.5}, "temperature", "'temperature' must be between 0 and 2, got 2.5"),
    ({"top_k": -1}, "top_k", "'top_k' must be an integer >= 0 (0 turns it off), got -1"),
    ({"top_k": 12}, "top_k", "'top_k' must be an integer between 0 and 11"),
    ({"top_p": 0}, "top_p", "'top_p' must be in (0, 1]"),
    ({"seed": 2**64}, "seed", "'seed' must be an integer between"),
    ({"logprobs": 6}, "logprobs", "'logprobs' must be an integer between 0 and 5"),
    ({"stop": [""]}, "stop", "'stop' must be non-empty strings"),
    ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be an integer between 1 and 1024"),
])
def test_a_setting_out_of_range_is_a_400_naming_it(fields, param, words):
    with pytest.raises(ApiError) as e:
        check(**fields)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.message.startswith(words)


def test_a_checked_request_carries_its_settings():
    spec = check(n=2, prompt=["ab", "c"], seed=3, logprobs=1, echo=True, max_tokens=4)
    assert spec.n == 2 and spec.prompt_ids == [TOK.encode("ab"), TOK.encode("c")]
    assert spec.params.score_prompt
    assert spec.params.config == GenerationConfig(4, SamplingConfig(), 3, (), 1)
