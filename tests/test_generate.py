import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SRC
from tinygpt.cli import main
from tinygpt.generate import (
    SamplingConfig,
    filter_logits,
    generate_tokens,
    make_generator,
    sample_next,
    slide_window,
    visible_controls,
)
from tinygpt.models import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def run(model, sampling, seed=0, n=20):
    idx = torch.tensor([[1, 2, 3]])
    gen = make_generator(seed)
    return [int(t[0]) for t in generate_tokens(model, idx, n, sampling, gen, block_size=8)]


def test_temperature_zero_is_greedy_and_deterministic(model):
    a = run(model, SamplingConfig(temperature=0), seed=1)
    b = run(model, SamplingConfig(temperature=0), seed=2)
    assert a == b
    # greedy == argmax of the forward pass over the window at each step (the window jumps by
    # half the block, 4 tokens, when the text outgrows it)
    idx, start, starts = torch.tensor([[1, 2, 3]]), 0, set()
    for tok in a:
        start = slide_window(start, idx.size(1), 8, 4)
        starts.add(start)
        with torch.no_grad():
            logits, _ = model(idx[:, start:])
        assert int(logits[0, -1].argmax()) == tok
        idx = torch.cat([idx, torch.tensor([[tok]])], dim=1)
    assert starts == {0, 4, 8, 12, 16}


def test_top_k_1_equals_greedy(model):
    assert run(model, SamplingConfig(temperature=1.0, top_k=1), seed=5) == run(
        model, SamplingConfig(temperature=0)
    )


def test_same_seed_same_text_other_seed_other_text(model):
    s = SamplingConfig(temperature=1.5)
    assert run(model, s, seed=3) == run(model, s, seed=3)
    assert run(model, s, seed=3, n=40) != run(model, s, seed=4, n=40)


def test_slide_window():
    assert slide_window(0, 8, 8, 1) == 0  # fits
    assert slide_window(0, 9, 8, 1) == 1  # the lecture's crop: the last 8 tokens
    assert slide_window(0, 9, 8, 4) == 4  # jumps: keeps the last 8 - 4 + 1 = 5
    assert slide_window(4, 12, 8, 4) == 4  # room left in the window
    assert slide_window(4, 13, 8, 4) == 8


def test_context_is_cropped_to_block_size(model):
    out = run(model, SamplingConfig(temperature=0), n=30)  # 3 + 30 > block_size 8
    assert len(out) == 30


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept.sum().item() == 2 and kept[0, [1, 2, 3, 5]].sum().item() == 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, None, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.76) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary does not matter
    assert torch.isfinite(filter_logits(shuffled, None, 0.6))[0].tolist() == [
        False,
        True,
        False,
        True,
    ]


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    draws = sample_next(logits, SamplingConfig(top_p=0.7), make_generator(0))
    assert set(draws.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.01}, "temperature must be between 0 and 2"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


# --- every accepted setting gives tokens -------------------------------------------------------

TINY = [1e-45, 5e-324, 1e-39, 1e-30]  # denormal in float32 or float64, and just above


@pytest.mark.parametrize("temperature", TINY)
def test_a_tiny_temperature_is_greedy(model, temperature):
    assert SamplingConfig(temperature).greedy == (temperature < 1.2e-38)
    assert run(model, SamplingConfig(temperature=temperature)) == run(
        model, SamplingConfig(temperature=0)
    )


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-30])
def test_a_top_p_below_the_largest_probability_keeps_the_most_likely_token(model, top_p):
    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0 - 1e-3]])
    kept = torch.isfinite(filter_logits(logits, None, top_p))
    assert kept.tolist() == [[False, True, False, False]]
    assert run(model, SamplingConfig(temperature=1.0, top_p=top_p)) == run(
        model, SamplingConfig(temperature=0)
    )


def test_tiny_settings_together_and_huge_logits_never_give_nan():
    logits = torch.tensor([[3e38, -3e38, 0.0, 3e38 * 0.999], [1.0, 1.0 + 1e-6, 1.0, 0.0]])
    for t in [*TINY, 1.0, 2.0]:
        for p in (None, 5e-324, 0.5):
            s = SamplingConfig(t, top_k=2, top_p=p)
            draws = sample_next(logits, s, make_generator(0))
            assert draws.tolist()[1] in (0, 1) and draws.tolist()[0] in (0, 3)
    assert sample_next(logits, SamplingConfig(1e-30), make_generator(0)).tolist() == [0, 1]


def test_top_k_ties_keep_the_lowest_token_ids():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept[0].nonzero().flatten().tolist() == [1, 2]
    kept = torch.isfinite(filter_logits(logits, top_k=5, top_p=None))
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 5]


def test_visible_controls_escapes_control_characters_but_newline_and_tab():
    text = "a\x1b[31mred\x1b[0m\tb\nc\rd\x08\x00\x7f\x9b é ☃"
    assert visible_controls(text) == "a\\x1b[31mred\\x1b[0m\tb\nc\\x0dd\\x08\\x00\\x7f\\x9b é ☃"
    assert visible_controls("plain\ttext\n") == "plain\ttext\n"


# --- the sample command: tiny settings, seeds, and a terminal that model output cannot drive ----

ESC_TEXT = "".join(f"ab\x1b[{i % 7}m\n" for i in range(400))  # after "ab" always comes ESC


@pytest.fixture(scope="module")
def esc_run(tmp_path_factory) -> Path:
    """A tiny GPT trained on text full of terminal escape sequences."""
    from tinygpt.config import TrainConfig
    from tinygpt.train import train

    root = tmp_path_factory.mktemp("esc")
    data = root / "esc.txt"
    data.write_text(ESC_TEXT, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYGPT_HOME", str(root / "home"))
        cfg = TrainConfig.resolve({
            "data": str(data), "out": str(root / "run"), "n_layer": 1, "n_head": 2, "n_embd": 32,
            "block_size": 16, "max_steps": 60, "eval_interval": 60, "eval_iters": 2,
            "sample_chars": 0, "lr": 1e-2, "warmup_steps": 5, "device": "cpu",
        })
        train(cfg, log=lambda _: None, progress_bar=False)
    return root / "run"


def sample_on_a_terminal(*args: str) -> tuple[bytes, str, int]:
    """Run ``tinygpt sample ARGS`` with stdout on a pseudo-terminal: (stdout bytes, stderr, rc)."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinygpt", "sample", *args], stdout=slave,
                            stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    err = proc.stderr.read().decode()
    return bytes(out), err, proc.wait(60)


def sample(capsys, *args) -> tuple[str, str]:
    """``tinygpt sample ARGS`` in this process (stdout captured, so not a terminal)."""
    assert main(["sample", *map(str, args)]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_sample_on_a_terminal_shows_escape_sequences_escaped(esc_run, capsys):
    args = [esc_run, "--prompt", "ab", "--num-chars", "40", "--temperature", "0", "--seed", "1"]
    out, err, rc = sample_on_a_terminal(*map(str, args))
    assert rc == 0, err
    assert b"\x1b" not in out
    assert b"\\x1b" in out  # the model did write ESC: shown as four visible characters
    # redirected, the same command writes the text exactly as generated
    raw, _ = sample(capsys, *args)
    assert "\x1b" in raw and "\\x1b" not in raw
    shown = out.decode().replace("\r\n", "\n")  # the terminal turns newlines into CR LF
    assert shown == visible_controls(raw)


def test_sample_says_which_seed_it_used_and_that_seed_gives_the_text_again(esc_run, capsys):
    first, err = sample(capsys, esc_run, "--num-chars", "30", "--prompt", "a")
    seed = re.fullmatch(r"seed (\d+) \(--seed \1 gives this text again\)\n", err)
    assert seed, err
    again, err = sample(capsys, esc_run, "--num-chars", "30", "--prompt", "a", "--seed",
                        seed.group(1))
    assert again == first
    assert err == ""  # a given seed is not repeated back


@pytest.mark.parametrize("flags", [["--temperature", "1e-45"], ["--temperature", "5e-324"],
                                   ["--top-p", "5e-324"], ["--temperature", "1e-45", "--top-p",
                                                           "5e-324", "--top-k", "1"]])
def test_sample_with_denormal_settings_is_greedy(esc_run, capsys, flags):
    common = [esc_run, "--num-chars", "30", "--prompt", "a", "--seed", "3"]
    greedy, _ = sample(capsys, *common, "--temperature", "0")
    out, _ = sample(capsys, *common, *flags)
    assert out == greedy and len(out) == 32
