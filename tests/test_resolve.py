"""``resolve_start``: from train's arguments to the config and the checkpoint, each opened once."""

from __future__ import annotations

import pytest

from tinygpt import checkpoint
from tinygpt.errors import TinyGPTError
from tinygpt.resolve import resolve_start, resumed_config

from .resume_helpers import main_in_process, tiny_settings, train_in_process


@pytest.fixture
def state_reads(monkeypatch):
    """The folders whose ``state.json`` is read, one entry per read."""
    reads = []
    real = checkpoint._read_json

    def counting(path):
        if path.name == checkpoint.STATE:
            reads.append(path.parent.resolve())
        return real(path)

    monkeypatch.setattr(checkpoint, "_read_json", counting)
    return reads


def test_init_from_opens_the_source_checkpoint_once(small_text, tmp_path, state_reads):
    source = tmp_path / "source"
    train_in_process(small_text, source, max_steps=2, eval_interval=2)
    state_reads.clear()
    code = main_in_process("train", "--init-from", source, "--data", small_text, "--out",
                           tmp_path / "ft", "--max-steps", "2", "--eval-interval", "2",
                           "--sample-chars", "0", "--device", "cpu", "--eval-iters", "1")
    assert code == 0
    from_source = [p for p in state_reads if p.is_relative_to(source.resolve())]
    assert len(from_source) == 1, state_reads


def test_resume_opens_the_checkpoint_once(small_text, tmp_path, state_reads):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=2, eval_interval=2)
    state_reads.clear()
    start = resolve_start({"max_steps": 4}, resume=run)
    assert start.resume is not None and start.resume.step == 2 and start.init is None
    assert start.cfg.run.max_steps == 4 and start.cfg.model.n_layer == 1
    assert len(state_reads) == 1, state_reads


def test_init_from_takes_the_shape_and_lets_dropout_change(small_text, tmp_path):
    source = tmp_path / "source"
    train_in_process(small_text, source, max_steps=2, eval_interval=2)
    start = resolve_start({"init_from": str(source), "data": str(small_text), "dropout": 0.3})
    assert (start.cfg.model.n_layer, start.cfg.model.n_embd) == (1, 16)  # the source's
    assert start.cfg.model.dropout == 0.3 and start.cfg.model.causal is True
    with pytest.raises(TinyGPTError, match="--n-embd 32 does not match"):
        resolve_start({"init_from": str(source), "n_embd": 32})
    with pytest.raises(TinyGPTError, match="--model bigram does not match"):
        resolve_start({"init_from": str(source), "model": "bigram"})


def test_resume_changes_only_what_the_fields_allow(small_text, tmp_path):
    saved = tiny_settings(small_text, tmp_path / "run")
    cfg = resumed_config(tmp_path / "run", saved, {"max_steps": 80, "keep": 3}, None)
    assert (cfg.run.max_steps, cfg.run.keep) == (80, 3)
    with pytest.raises(TinyGPTError, match="--lr 0.5 differs from the run's lr"):
        resumed_config(tmp_path / "run", saved, {"lr": 0.5}, None)


def test_a_saved_run_older_than_a_setting_takes_its_default(small_text, tmp_path):
    """config.json of a run written before batch_start, qk_norm, mlp, ... existed."""
    saved = {k: v for k, v in tiny_settings(small_text, tmp_path).items()
             if k not in ("preset",)}
    cfg = resumed_config(tmp_path, saved, {}, None)
    assert cfg.data.batch_start is None and cfg.model.qk_norm == "none"
    assert cfg.model.mlp == "gelu" and cfg.model.n_layer == 1


def test_a_missing_device_is_named_before_the_corpus_is_read(tmp_path, monkeypatch):
    """A new modern run reads its corpus to size the recipe; a device that is not here must be
    the first thing to hear of, before a large text is tokenised for nothing."""
    import tinygpt.resolve as resolve_module

    def no_corpus(*a, **k):
        raise AssertionError("the corpus was read before the device was checked")

    monkeypatch.setattr(resolve_module, "load_corpus", no_corpus)
    with pytest.raises(TinyGPTError, match="cuda"):
        resolve_start({"data": str(tmp_path / "text.txt"), "device": "cuda:7"})
