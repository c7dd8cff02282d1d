"""The ladder: every rung differs from the previous one by the stated idea (seen in the code
and in the parameter counts), and a tiny run writes the table, samples, JSON and picture."""

from __future__ import annotations

import json

import pytest
import torch

from tinygpt.data import load_corpus
from tinygpt.lessons import ladder
from tinygpt.lessons.ladder import (
    RUNGS,
    BlocksLM,
    FeedForwardLM,
    LadderConfig,
    LayerNormLM,
    MultiHeadLM,
    OneHeadLM,
    run_ladder,
)
from tinygpt.models.bigram import BigramLM
from tinygpt.models.gpt import GPT

V = 65
C, T, L = 32, 8, 3


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_rungs_in_the_lecture_order():
    names = [r.name for r in RUNGS]
    assert names == [
        "bigram", "one-head", "multi-head", "feed-forward", "blocks-residual", "layernorm", "gpt",
    ]
    models = [r.build(V) for r in RUNGS]
    assert isinstance(models[0], BigramLM) and isinstance(models[-1], GPT)
    losses = [r.lecture_val_loss for r in RUNGS]
    assert losses == sorted(losses, reverse=True)


def test_each_rung_overrides_one_idea():
    """Each class changes only the methods that carry its idea."""
    chain = [OneHeadLM, MultiHeadLM, FeedForwardLM, BlocksLM, LayerNormLM]
    for prev, cls in zip(chain, chain[1:]):
        assert cls.__bases__ == (prev,)
        own = {k for k, v in vars(cls).items() if callable(v)}
        assert own == ({"make_body", "make_final_norm"} if cls is LayerNormLM else {"make_body"})


def test_parameter_counts_differ_by_exactly_the_new_idea():
    cfg = LadderConfig(V)
    bigram, one, multi, ff, blocks, ln = (r.build(V) for r in RUNGS[:6])
    assert params(bigram) == V * V  # one table
    embeddings_and_head = V * C + T * C + (C * V + V)
    assert params(one) == embeddings_and_head + 3 * C * C  # key, query, value of one 32-wide head
    assert params(multi) == params(one)  # 4 heads of 8: the same weights, split differently
    assert params(ff) == params(multi) + (C * C + C)  # + one Linear(C, C)
    block = 3 * C * C + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)  # heads, proj, wide MLP
    assert params(blocks) == embeddings_and_head + L * block
    assert params(ln) == params(blocks) + L * 2 * (2 * C) + 2 * C  # two LayerNorms per block + final
    assert cfg.n_embd // cfg.n_head == 8


def test_rungs_are_causal():
    idx = torch.randint(0, V, (2, T))
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    for rung in RUNGS[1:6]:
        torch.manual_seed(0)
        model = rung.build(V).eval()
        with torch.no_grad():
            a, b = model(idx)[0], model(changed)[0]
        torch.testing.assert_close(a[:, :5], b[:, :5])
        assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_tiny_ladder_is_deterministic(small_text):
    corpus = load_corpus(small_text)
    rungs = RUNGS[:2]
    a = run_ladder(corpus, steps=4, seed=3, sample_chars=20, rungs=rungs)
    b = run_ladder(corpus, steps=4, seed=3, sample_chars=20, rungs=rungs)
    assert [r.val_loss for r in a] == [r.val_loss for r in b]
    assert [r.sample for r in a] == [r.sample for r in b]
    c = run_ladder(corpus, steps=4, seed=4, sample_chars=20, rungs=rungs)
    assert [r.sample for r in a] != [r.sample for r in c]


@pytest.mark.slow  # 15-20 s on a 2-core AVX2 machine
def test_ladder_command(small_text, tmp_path, cli):
    out = tmp_path / "ladder"
    proc = cli("ladder", "--data", small_text, "--steps", "2", "--out", out, "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.split()[:1] in ([r.name] for r in RUNGS)]
    assert len(table) >= len(RUNGS)
    data = json.loads((out / "ladder.json").read_text())
    rungs = data["rungs"]
    assert [r["name"] for r in rungs] == [r.name for r in RUNGS]
    for r in rungs:
        assert r["steps"] == 2 and r["val_loss"] > 0
        assert r["bits_per_char"] == pytest.approx(r["val_loss"] / 0.6931, rel=1e-3)
        assert isinstance(r["sample"], str) and len(r["sample"]) == 100
        assert r["params"] > 0
    md = (out / "ladder.md").read_text()
    assert md.count("\n| ") == len(RUNGS) + 1 and "## Samples" in md
    assert (out / "ladder.png").read_bytes()[:4] == b"\x89PNG"


def test_ladder_bad_input(tmp_path, capsys):
    from tinygpt.cli import main

    def refused(*args) -> str:
        with pytest.raises(SystemExit) as e:  # argparse's own refusals exit
            code = main(["ladder", *map(str, args)])
            raise SystemExit(code)
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "not allowed with" in refused("--steps", "5", "--budget", "1m")
    err = refused("--budget", "soon", "--data", tmp_path / "missing.txt")
    assert err.count("\n") == 1 and "duration" in err
    assert "no such file" in refused("--data", tmp_path / "missing.txt")


def test_gpt_rung_is_the_stated_cpu_size():
    model = RUNGS[-1].build(V)
    assert model.config.n_layer == 4 and model.config.n_embd == 128 and model.config.dropout > 0
    assert ladder.GPT_HYPER["block_size"] == model.config.block_size
