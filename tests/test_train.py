import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.config import TrainConfig, parse_duration
from tinygpt.device import autocast_dtype, native_bf16
from tinygpt.train import train

MODERN_ARCH = dict(pos_embedding="rope", norm="rmsnorm", qk_norm="rmsnorm", mlp="relu2", bias=False)


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("2.5m", 150)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "-3m", "0s", "m5"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="cannot read duration"):
        parse_duration(text)


def test_presets_and_overrides():
    cfg = TrainConfig.resolve({"preset": "lecture", "lr": 1e-3})
    m = cfg.model  # a GPTConfig
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (
        6,
        6,
        384,
        256,
        0.2,
    )
    assert cfg.optim.lr == 1e-3
    assert TrainConfig.resolve({"model": "bigram"}).preset == "bigram"
    assert TrainConfig.resolve({}).preset == "modern"  # the GPT's default recipe
    only_time = TrainConfig.resolve({"max_time": "30s"})
    assert only_time.run.max_steps is None and only_time.run.max_time_s == 30
    both = TrainConfig.resolve({"max_time": "30s", "max_steps": 7})
    assert both.run.max_steps == 7


def tiny_cfg(data, out, **kw) -> TrainConfig:
    base = dict(
        preset="cpu",
        data=str(data),
        out=str(out),
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        batch_size=8,
        max_steps=30,
        eval_interval=10,
        eval_iters=2,
        sample_chars=20,
        warmup_steps=5,
    )
    return TrainConfig.resolve({**base, **kw})


def test_training_writes_metrics_checkpoints_and_lowers_the_loss(small_text, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_cfg(small_text, run, lr=3e-3), log=lambda s: None, progress_bar=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 10, 20, 30]
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] - 0.3
    assert {"train_loss", "val_loss", "lr", "tokens", "elapsed_s", "tokens_per_s"} <= lines[
        1
    ].keys()
    for name in ("last", "best"):
        assert (run / name / "model.safetensors").is_file()
        state = json.loads((run / name / "state.json").read_text())
        assert state["model"] == "gpt" and state["tokenizer"]["kind"] == "char"
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 30
    assert (run / "last" / "optimizer.pt").is_file()
    assert result.step == 30 and len(result.sample) == 20


def test_an_existing_run_is_not_overwritten_by_accident(small_text, tmp_path):
    from tinygpt.errors import TinyGPTError

    run = tmp_path / "run"
    train(tiny_cfg(small_text, run, max_steps=2), log=lambda s: None, progress_bar=False)
    before = (run / "last" / "model.safetensors").read_bytes()
    with pytest.raises(TinyGPTError, match="--overwrite"):
        train(tiny_cfg(small_text, run, max_steps=2), log=lambda s: None, progress_bar=False)
    assert (run / "last" / "model.safetensors").read_bytes() == before
    train(
        tiny_cfg(small_text, run, max_steps=2, overwrite=True),
        log=lambda s: None,
        progress_bar=False,
    )


def test_max_time_stops_on_time_and_decays_the_schedule(small_text, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(
        small_text, run, max_steps=None, max_time="3s", eval_interval=10_000, warmup_steps=0
    )
    result = train(cfg, log=lambda s: None, progress_bar=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # It stops at the first step that ends past the budget (a generous bound: a busy machine
    # makes single steps slow, never the count of steps wrong).
    assert 3.0 <= lines[-1]["elapsed_s"] < 3.0 + 10
    assert result.step > 10
    assert lines[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio, rel=0.05)


def test_same_seed_same_run(small_text, tmp_path):
    a = train(tiny_cfg(small_text, tmp_path / "a"), log=lambda s: None, progress_bar=False)
    b = train(tiny_cfg(small_text, tmp_path / "b"), log=lambda s: None, progress_bar=False)
    assert a.val_loss == b.val_loss and a.sample == b.sample
    assert (tmp_path / "a/last/model.safetensors").read_bytes() == (
        tmp_path / "b/last/model.safetensors"
    ).read_bytes()


@pytest.mark.slow  # 25-60 s on a 2-core AVX2 machine
def test_gpt_beats_the_bigram_after_a_short_cpu_run(shakespeare, cli, tmp_path):
    """200 steps of the default recipe (a third of the main job) already beat the best any bigram
    can do (whole-split val ~2.49) clearly. Counted in steps, not seconds, so a busy machine is
    slower but gets the same result."""
    run = tmp_path / "gpt"
    proc = cli(
        "train", "--data", "shakespeare", "--out", run, "--max-steps", "200",
        "--eval-interval", "200", "--eval-iters", "5", "--sample-chars", "100",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(cli("eval", run, "--json", check=True).stdout)
    assert result["val_loss"] < 2.25, result
    assert result["bits_per_char"] == pytest.approx(result["val_loss"] / math.log(2))


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if native_bf16(cpu) else None)
    assert autocast_dtype("float16", cpu) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        TrainConfig.resolve({"dtype": "float8"})


def test_bfloat16_training_learns_and_keeps_float32_weights(small_text, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(small_text, run, lr=3e-3, dtype="bfloat16", **MODERN_ARCH)
    train(cfg, log=lambda s: None, progress_bar=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] - 0.3
    weights = load_file(str(run / "last" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_compiled_training_matches_eager(small_text, tmp_path):
    """torch.compile fuses and reorders float32 arithmetic, so the two runs agree closely but not
    bit for bit; the checkpoint of a compiled run has the plain model's parameter names."""
    kw = dict(max_steps=4, eval_interval=4, sample_chars=0, **MODERN_ARCH)
    eager = train(tiny_cfg(small_text, tmp_path / "e", **kw), log=lambda s: None,
                  progress_bar=False)
    logs = []
    compiled = train(tiny_cfg(small_text, tmp_path / "c", compile=True, **kw), log=logs.append,
                     progress_bar=False)
    assert any("torch.compile" in line for line in logs)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-3)
    a = load_file(str(tmp_path / "e" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "c" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_a_failing_compile_is_one_actionable_error(small_text, tmp_path, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    from tinygpt.errors import TinyGPTError

    def broken(model):
        def forward(*args, **kwargs):
            raise TorchDynamoException("no working C++ compiler found\ndetails...")
        return forward

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(TinyGPTError, match=r"torch.compile failed \(no working C\+\+ compiler "
                                           r"found\); train without --compile"):
        train(tiny_cfg(small_text, tmp_path / "r", compile=True), log=lambda s: None,
              progress_bar=False)


def test_batch_warmup_draws_the_scheduled_batches_and_counts_their_tokens(
        small_text, tmp_path, monkeypatch):
    from tinygpt.data import Corpus
    from tinygpt.optim import batch_size_at

    drawn = []
    get_batch = Corpus.get_batch

    def recording(self, split, batch_size, block_size, gen, rows=None, starts=None):
        if split == "train" and rows is not None:  # the training batches (evaluation draws all)
            drawn.append(batch_size)
        return get_batch(self, split, batch_size, block_size, gen, rows, starts)

    monkeypatch.setattr(Corpus, "get_batch", recording)
    cfg = tiny_cfg(small_text, tmp_path / "run", batch_size=8, batch_start=2,
                   batch_warmup_steps=12, max_steps=20, eval_interval=5, sample_chars=0)
    train(cfg, log=lambda s: None, progress_bar=False)
    assert drawn == [batch_size_at(s, 8, 2, 12) for s in range(20)]
    assert drawn[:3] == [2, 2, 2] and drawn[-1] == 8
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in rows] == [
        (s, sum(drawn[:s]) * 16) for s in (0, 5, 10, 15, 20)]


@pytest.mark.parametrize("kw", [dict(batch_start=0), dict(batch_start=2.5),
                                dict(batch_start=2, batch_warmup_steps=-1)])
def test_bad_batch_warmup(kw):
    with pytest.raises(ValueError, match="batch_start|batch_warmup_steps"):
        TrainConfig.resolve({"batch_size": 8, **kw})


def test_a_smaller_batch_on_the_modern_preset_just_drops_the_warmup():
    """modern starts at 16 sequences; --batch-size 8 with it is plain batch 8, not an error."""
    from tinygpt.optim import batch_size_at

    cfg = TrainConfig.resolve({"preset": "modern", "batch_size": 8})
    d = cfg.data
    assert d.batch_start == 16
    assert {batch_size_at(s, 8, d.batch_start, d.batch_warmup_steps) for s in range(300)} == {8}


def test_inductors_complex_warning_is_not_shown(small_text, tmp_path, monkeypatch, recwarn):
    """Inductor warns that it leaves complex multiplies (the rotary embeddings) to eager code;
    measured, that costs nothing, so a compiled run does not show the warning. torch.compile is
    replaced here by a wrapper that raises the same warning on every call."""
    import warnings

    def warning_compile(model):
        def forward(*args, **kwargs):
            warnings.warn("Torchinductor does not support code generation for complex "
                          "operators. Performance may be worse than eager.", UserWarning,
                          stacklevel=2)
            return model(*args, **kwargs)
        return forward

    monkeypatch.setattr(torch, "compile", warning_compile)
    train(tiny_cfg(small_text, tmp_path / "r", compile=True, max_steps=3, sample_chars=0),
          log=lambda s: None, progress_bar=False)
    assert not [w for w in recwarn if "complex operators" in str(w.message)]


def test_every_run_draws_its_loss_curve(small_text, tmp_path):
    """loss.png appears beside metrics.jsonl and is redrawn at every evaluation."""
    run = tmp_path / "run"
    train(tiny_cfg(small_text, run, max_steps=4, eval_interval=2), log=lambda s: None,
          progress_bar=False)
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_mtime_ns >= (run / "metrics.jsonl").stat().st_mtime_ns - 10**9


# ------------------------------------------------------------------ overfitting is shown, never hidden


def cyclic_text(path):
    """A train split that repeats "abc" (with a little noise) and a val split in random order:
    a small model learns the letters (val improves), then the cycle (val rises) within 15 steps."""
    import random

    rng = random.Random(0)
    train_part = "".join("abc"[i % 3] if rng.random() > 0.02 else rng.choice("xyz")
                         for i in range(2700))
    path.write_text(train_part + "".join(rng.choice("abc") for _ in range(300)), encoding="utf-8")
    return path


def overfit_cfg(tmp_path, **kw) -> TrainConfig:
    return tiny_cfg(cyclic_text(tmp_path / "cyc.txt"), tmp_path / "run", n_embd=16, block_size=8,
                    max_steps=40, eval_interval=5, lr=1e-2, warmup_steps=0, sample_chars=30, **kw)


def test_the_overfitting_rule():
    from tinygpt.train import LoopState, is_overfitting

    def state(step, val, train, best_step=100, best_val=1.0, best_train=1.0):
        return LoopState(step=step, val_loss=val, train_loss=train, best_step=best_step,
                         best_val=best_val, best_train=best_train)

    assert is_overfitting(state(300, 1.05, 0.9), eval_interval=100)
    assert not is_overfitting(state(200, 1.05, 0.9), 100)  # one interval is not "a while"
    assert not is_overfitting(state(300, 1.01, 0.9), 100)  # within the noise of an estimate
    assert not is_overfitting(state(300, 1.05, 0.99), 100)  # train loss did not fall: no memorising
    assert not is_overfitting(state(300, 1.05, 0.9, best_step=0), 100)  # nothing learnt at all
    assert is_overfitting(state(300, 1.05, 0.9, best_train=math.nan), 100)  # a run from before


def test_a_run_that_overfits_says_so_once_and_samples_the_best_checkpoint(tmp_path, monkeypatch):
    import tinygpt.train as train_module
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.train import sample_text

    monkeypatch.setattr(train_module, "_plot_losses", lambda run_dir: None)  # faster
    logs = []
    result = train(overfit_cfg(tmp_path), log=logs.append, progress_bar=False)
    notices = [line for line in logs if line.startswith("overfitting")]
    assert len(notices) == 1, logs
    notice = notices[0]
    for words in ("val loss has risen", "memorising", "smaller model", "--dropout", "more text",
                  f"step {result.best_step}", "--stop-when-overfitting would stop"):
        assert words in notice
    assert result.step == 40 and 0 < result.best_step < result.overfitting_step < 40
    assert not result.stopped_for_overfitting
    best = load_checkpoint(tmp_path / "run", "best")
    assert best.state["step"] == result.best_step
    assert result.sample == sample_text(best.model, best.tokenizer, 30, seed=1337, block_size=8)
    last = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert last["overfitting_step"] == result.overfitting_step  # said once, also after --resume
    assert result.copying is not None and result.copying.chars == 30
    assert result.copying_reference is not None and result.copying_reference.chars == 30


def test_stop_when_overfitting_ends_the_run_there(tmp_path, monkeypatch):
    import tinygpt.train as train_module

    monkeypatch.setattr(train_module, "_plot_losses", lambda run_dir: None)
    logs = []
    result = train(overfit_cfg(tmp_path, stop_when_overfitting=True), log=logs.append,
                   progress_bar=False)
    assert result.stopped_for_overfitting and result.step == result.overfitting_step < 40
    assert any("the run stops here" in line for line in logs)
    last = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert last["step"] == result.step  # saved as usual
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == result.step


def test_stop_when_overfitting_is_a_flag_and_a_toml_key(tmp_path):
    from tinygpt.cli import build_parser
    from tinygpt.cli.train import read_toml_settings

    args = build_parser().parse_args(["train", "--stop-when-overfitting"])
    assert args.stop_when_overfitting is True
    toml = tmp_path / "c.toml"
    toml.write_text("stop_when_overfitting = true\n")
    assert TrainConfig.resolve(read_toml_settings(str(toml))).run.stop_when_overfitting
    assert not TrainConfig.resolve({}).run.stop_when_overfitting
