"""Export to and import from transformers: the same logits (within 1e-4), the same greedy text,
tokenizers that agree, exact round trips, and one-line refusals. Offline, tiny models only."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402  (the dev extra; after HF_HUB_OFFLINE)

from tinygpt.checkpoint import load_checkpoint  # noqa: E402
from tinygpt.config import TrainConfig  # noqa: E402
from tinygpt.errors import TinyGPTError  # noqa: E402
from tinygpt.generate import SamplingConfig, generate_tokens  # noqa: E402
from tinygpt.hf import export_architecture, export_model, read_hf_gpt2  # noqa: E402
from tinygpt.models.bigram import BigramConfig, BigramLM  # noqa: E402
from tinygpt.models.gpt import GPT, GPTConfig  # noqa: E402
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, iter_chunks  # noqa: E402

from .resume_helpers import main_in_process, train_in_process  # noqa: E402

TOL = 1e-4
TEXT = "\n".join(
    f"{i}: To be, or not to be — that is the question. Ça va? 你好，世界! 😀 Grüße.\n"
    f"  Whether 'tis nobler in the mind to suffer\tthe slings and arrows {i * 7}."
    for i in range(40)
)  # a few KB, with tabs, double spaces, CJK and an emoji


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter_chunks(TEXT, 1000), vocab_size=320)


@pytest.fixture(scope="module")
def chars() -> CharTokenizer:
    return CharTokenizer.from_text(TEXT)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_gpt(vocab_size: int, seed: int = 0, **options) -> GPT:
    """A tiny GPT whose every weight (norm gains and biases too) is random and far from its
    initial value, so a weight exported to the wrong place cannot go unnoticed."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16,
                       dropout=0.0, **options)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def greedy_tinygpt(model: GPT, ids: list[int], n: int) -> list[int]:
    idx = torch.tensor([ids])
    steps = generate_tokens(model, idx, n, SamplingConfig(temperature=0.0))
    return [int(t[0]) for t in steps]


EXPORTS = [
    ("GPT2LMHeadModel", {}),  # the cpu / lecture architecture
    ("GPT2LMHeadModel", {"bias": False, "tie_embeddings": True, "mlp": "gelu_tanh"}),
    ("GPT2LMHeadModel", {"mlp": "relu2"}),
    ("LlamaForCausalLM", {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu"}),
    ("LlamaForCausalLM", {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                          "bias": False, "tie_embeddings": True}),
    ("Qwen3ForCausalLM", {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                          "qk_norm": "rmsnorm", "bias": False}),
    # the modern preset's architecture
    ("PersimmonForCausalLM", {"pos_embedding": "rope", "norm": "layernorm", "qk_norm": "layernorm",
                              "mlp": "gelu", "bias": False, "zero_init": True}),
    ("PersimmonForCausalLM", {"pos_embedding": "rope", "norm": "layernorm", "mlp": "relu2"}),
]


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
@pytest.mark.parametrize("arch,options", EXPORTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(EXPORTS)])
def test_export_matches_transformers(arch, options, tokenizer, chars, bpe, tmp_path):
    tok = chars if tokenizer == "char" else bpe
    model = random_gpt(tok.vocab_size, **options)
    result = export_model(model, tok, tmp_path / "hf")
    assert result.architecture == arch
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(result.files)
    hf_model, hf_tok = load_hf(tmp_path / "hf")
    assert type(hf_model).__name__ == arch

    prompt = "To be, or not 你好 😀\n  Whe"
    ids = tok.encode(prompt)
    assert hf_tok(prompt)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf_model(x).logits
    assert (ours - theirs).abs().max().item() < TOL

    n = 32 - len(ids)  # up to the context length
    hf_greedy = hf_model.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert hf_greedy[0, len(ids):].tolist() == greedy_tinygpt(model, ids, n)


def test_activation_choice_is_visible_to_the_parity_check(chars, tmp_path):
    """Exact and tanh GELU differ by more than the tolerance on these weights, so the parity test
    above would catch an export that mixed them up."""
    model = random_gpt(chars.vocab_size, mlp="gelu")
    other = random_gpt(chars.vocab_size, mlp="gelu_tanh")
    x = torch.tensor([chars.encode("To be, or not")])
    with torch.no_grad():
        assert (model(x)[0] - other(x)[0]).abs().max().item() > 5 * TOL


def test_exported_char_tokenizer_round_trips_every_character(chars, tmp_path):
    export_model(random_gpt(chars.vocab_size), chars, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    vocab_text = "".join(chars.chars)
    for text in (vocab_text, vocab_text[::-1], "  to  be\n\nor not\n", "\t", " "):
        ids = hf_tok(text)["input_ids"]
        assert ids == chars.encode(text)
        assert hf_tok.decode(ids) == text  # no spaces inserted, nothing stripped


def test_exported_bpe_tokenizer_matches(bpe, tmp_path):
    export_model(random_gpt(bpe.vocab_size), bpe, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Grüße, 世界! 😀🎉 new words never seen\n\n\ttabs  and  spaces "
    ids = hf_tok(text)["input_ids"]
    assert ids == bpe.encode(text)
    assert hf_tok.decode(ids) == text == bpe.decode(ids)


@pytest.mark.parametrize("options,named", [
    ({"logit_softcap": 30.0}, "logit_softcap"),
    ({"pos_embedding": "rope", "value_embeds": 1}, "value_embeds=1"),
    ({"x0_skip": True}, "x0_skip"),
    ({"causal": False}, "causal"),
    ({"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "relu2"}, "mlp=relu2"),
    ({"norm": "rmsnorm"}, "norm=rmsnorm"),
    ({"qk_norm": "layernorm"}, "qk_norm=layernorm"),
    ({"mlp": "swiglu"}, "mlp=swiglu"),
    ({"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": "rmsnorm"}, "bias"),
    ({"pos_embedding": "rope", "norm": "layernorm", "mlp": "swiglu"}, "mlp=swiglu"),
    ({"pos_embedding": "rope", "norm": "layernorm", "qk_norm": "rmsnorm"}, "qk_norm=rmsnorm"),
])
def test_export_refuses_options_without_an_exact_equivalent(options, named, chars, tmp_path):
    model = random_gpt(chars.vocab_size, **options)
    with pytest.raises(TinyGPTError) as e:
        export_model(model, chars, tmp_path / "hf")
    msg = str(e.value)
    assert named in msg and "\n" not in msg
    assert not (tmp_path / "hf").exists()  # refused before writing anything


def test_bigram_is_refused(chars, tmp_path):
    with pytest.raises(TinyGPTError, match="bigram"):
        export_model(BigramLM(BigramConfig(vocab_size=chars.vocab_size)), chars, tmp_path / "hf")


@pytest.mark.parametrize("preset,arch", [
    ("cpu", "GPT2LMHeadModel"), ("lecture", "GPT2LMHeadModel"), ("modern", "PersimmonForCausalLM"),
])
def test_presets_export(preset, arch):
    config = TrainConfig.resolve({"preset": preset}).model_config(65)
    assert export_architecture(config) == arch


def test_modern_large_is_refused_and_says_what_would_work():
    config = TrainConfig.resolve({"preset": "modern-large"}).model_config(65)
    with pytest.raises(TinyGPTError) as e:
        export_architecture(config)
    assert "mlp=relu2" in str(e.value) and "swiglu" in str(e.value)


# --------------------------------------------------------------------------------------- import


def save_gpt2(path, tokenizer: BPETokenizer, seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    """A random tiny GPT-2 saved with save_pretrained, with the tokenizer beside it."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size + 5, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=None, eos_token_id=None, **config,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    return model


@pytest.mark.parametrize("config", [
    {}, {"tie_word_embeddings": False}, {"activation_function": "gelu"},
], ids=["tied-gelu_new", "untied", "exact-gelu"])
def test_import_matches_transformers(config, bpe, tmp_path):
    hf_model = save_gpt2(tmp_path / "gpt2", bpe, **config)
    model, tok = read_hf_gpt2(tmp_path / "gpt2")
    assert tok == bpe
    assert model.config.mlp == ("gelu" if config.get("activation_function") == "gelu" else "gelu_tanh")
    x = torch.tensor([bpe.encode("Whether 'tis nobler 😀 世界\n")])
    with torch.no_grad():
        assert (model(x)[0] - hf_model(x).logits).abs().max().item() < TOL


def test_import_reads_the_gpt2_vocab_and_merges_files(bpe, tmp_path):
    """Old GPT-2 directories have vocab.json + merges.txt instead of tokenizer.json."""
    save_gpt2(tmp_path / "gpt2", bpe)
    (tmp_path / "gpt2" / "tokenizer.json").unlink()
    bpe.tokenizer.model.save(str(tmp_path / "gpt2"))  # writes vocab.json and merges.txt
    _, tok = read_hf_gpt2(tmp_path / "gpt2")
    text = "To be, or not 世界 😀\n\tx"
    assert tok.encode(text) == bpe.encode(text) and tok.decode(tok.encode(text)) == text


def _weights(model: GPT) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("options", [
    {"mlp": "gelu_tanh"}, {"bias": False, "tie_embeddings": True}, {"mlp": "relu2"},
])
def test_round_trip_gives_identical_weights(options, bpe, tmp_path):
    model = random_gpt(bpe.vocab_size, **options)
    export_model(model, bpe, tmp_path / "hf")
    again, tok = read_hf_gpt2(tmp_path / "hf")
    assert tok == bpe
    ours, theirs = _weights(model), _weights(again)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert again.config == model.config


def test_cli_export_and_import_of_a_trained_char_run(small_text, tmp_path):
    """A trained run exports through the CLI, loads in transformers with the same logits, and
    imports back as a run that samples with the same weights."""
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=4, eval_interval=2)
    assert main_in_process("export", run, tmp_path / "hf") == 0
    ckpt = load_checkpoint(run, "best")
    hf_model, hf_tok = load_hf(tmp_path / "hf")
    prompt = "Ça va? Naïve"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == ckpt.tokenizer.encode(prompt)
    with torch.no_grad():
        ours = ckpt.model(torch.tensor([ids]))[0]
        assert (ours - hf_model(torch.tensor([ids])).logits).abs().max().item() < TOL

    assert main_in_process("import", tmp_path / "hf", "--out", tmp_path / "back") == 0
    back = load_checkpoint(tmp_path / "back", "best")
    assert back.tokenizer == ckpt.tokenizer
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    assert main_in_process("sample", tmp_path / "back", "--num-chars", "5", "--seed", "1",
                           "--prompt", "Ça") == 0


def _bad_dirs(tmp_path, bpe):
    good = tmp_path / "good"
    save_gpt2(good, bpe)
    cases = {"no such directory": tmp_path / "absent"}

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def set_config(**kv):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(kv)
            (d / "config.json").write_text(json.dumps(cfg))
        return edit

    cases["config.json is missing"] = variant("noconfig", lambda d: (d / "config.json").unlink())
    cases["has no weights"] = variant("noweights", lambda d: (d / "model.safetensors").unlink())
    cases["has no tokenizer"] = variant("notok", lambda d: (d / "tokenizer.json").unlink())
    cases["'llama' model"] = variant("llama", set_config(model_type="llama"))
    cases["has shape"] = variant("shape", set_config(n_embd=48))
    cases["lack"] = variant("layers", set_config(n_layer=3))
    cases["activation_function"] = variant("act", set_config(activation_function="silu"))
    cases["not a readable"] = variant("garbled", lambda d: (d / "model.safetensors").write_bytes(b"x"))
    return cases


def test_bad_directories_get_one_line_and_status_2(bpe, tmp_path, capsys):
    for fragment, hf_dir in _bad_dirs(tmp_path, bpe).items():
        capsys.readouterr()
        assert main_in_process("import", hf_dir, "--out", tmp_path / f"run-{hf_dir.name}") == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("tinygpt import: error:"), err
        assert fragment in err or (fragment == "not a readable" and "cannot read" in err), err
        assert not (tmp_path / f"run-{hf_dir.name}").exists()


def test_export_refusal_via_cli_is_one_line(small_text, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(small_text, run, max_steps=2, eval_interval=2, logit_softcap=15.0)
    assert main_in_process("export", run, tmp_path / "hf") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "logit_softcap" in err


def test_imported_gpt2_samples_evaluates_and_fine_tunes(bpe, tmp_path, capsys):
    """A GPT-2 directory with a byte-level BPE tokenizer (and a vocabulary padded beyond it)
    becomes a run that the other commands use as they use any run."""
    hf_model = save_gpt2(tmp_path / "gpt2", bpe)
    run = tmp_path / "imported"
    assert main_in_process("import", tmp_path / "gpt2", "--out", run) == 0
    ckpt = load_checkpoint(run)
    assert ckpt.tokenizer == bpe and ckpt.model.config.vocab_size == bpe.vocab_size + 5
    x = torch.tensor([bpe.encode("Whether 'tis nobler")])
    with torch.no_grad():
        assert (ckpt.model(x)[0] - hf_model(x).logits).abs().max().item() < TOL

    text = tmp_path / "own.txt"
    text.write_text(TEXT, encoding="utf-8")
    capsys.readouterr()
    assert main_in_process("sample", run, "--prompt", "To be 😀", "--num-chars", "6",
                           "--seed", "0") == 0
    assert capsys.readouterr().out.startswith("To be 😀")
    assert main_in_process("eval", run, "--data", text, "--json") == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["tokens"] > 0 and ev["bits_per_char"] > 0
    assert main_in_process("train", "--init-from", run, "--data", text, "--out", tmp_path / "ft",
                           "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1",
                           "--batch-size", "2", "--sample-chars", "0", "--device", "cpu") == 0
    ft = load_checkpoint(tmp_path / "ft")
    assert ft.tokenizer == bpe and ft.model.config == ckpt.model.config


# ------------------------------------------------------------------ --overwrite is crash-safe

# Exports a second model over OUT_DIR and is killed (no cleanup, as by SIGKILL or a power cut)
# at a fault point: once the new weights and config are written, before the tokenizer config.
_KILLED_EXPORT = """
import os, sys, torch
import tinygpt.hf as hf
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.tokenizer import CharTokenizer

text, out = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
tok = CharTokenizer.from_text(text)
torch.manual_seed(99)
model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16))
write_json = hf.write_json

def faulty(path, obj):
    if path.name == "tokenizer_config.json":
        os._exit(9)
    write_json(path, obj)

hf.write_json = faulty
hf.export_model(model, tok, out, overwrite=True)
"""


def _same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_overwrite_killed_midway_leaves_the_previous_export_loadable(chars, tmp_path):
    import subprocess
    import sys

    from .resume_helpers import env

    out = tmp_path / "hf"
    before = random_gpt(chars.vocab_size, seed=1)
    export_model(before, chars, out)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(tmp_path / "text.txt"),
                           str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()  # it did get that far
    model, tok = read_hf_gpt2(out)
    assert tok == chars and _same_weights(model, before)
    hf_model, _ = load_hf(out)  # transformers loads it too
    ids = torch.tensor([chars.encode("To be, or")])
    with torch.no_grad():
        assert (before(ids)[0] - hf_model(ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_the_export_and_keeps_other_files(chars, tmp_path, monkeypatch,
                                                             exchange):
    import tinygpt.hf as hf

    if not exchange:
        monkeypatch.setattr(hf, "_exchange", lambda a, b: False)
    out = tmp_path / "hf"
    first, second = random_gpt(chars.vocab_size, seed=1), random_gpt(chars.vocab_size, seed=2)
    export_model(first, chars, out)
    (out / "README.md").write_text("my notes", encoding="utf-8")
    with pytest.raises(TinyGPTError, match="pass --overwrite"):
        export_model(second, chars, out)
    result = export_model(second, chars, out, overwrite=True)
    assert "README.md" in result.files and (out / "README.md").read_text() == "my notes"
    assert _same_weights(read_hf_gpt2(out)[0], second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left beside it


def test_a_failed_overwrite_leaves_the_previous_export_and_no_litter(chars, tmp_path,
                                                                   monkeypatch):
    import tinygpt.hf as hf

    out = tmp_path / "hf"
    first = random_gpt(chars.vocab_size, seed=1)
    export_model(first, chars, out)

    def full_disk(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_json", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_model(random_gpt(chars.vocab_size, seed=2), chars, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert _same_weights(read_hf_gpt2(out)[0], first)
