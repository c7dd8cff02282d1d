import json
import os
import subprocess
import sys

import pytest
import torch

from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.errors import TinyGPTError
from tinygpt.generate import SamplingConfig, generate_tokens
from tinygpt.models import GPT, GPTConfig
from tinygpt.tokenizer import CharTokenizer

from .conftest import SRC, one_thread

PROBE = """
import json, sys, torch
torch.set_num_threads(1)
from tinygpt.checkpoint import load_checkpoint
from tinygpt.generate import SamplingConfig, generate_tokens
ck = load_checkpoint(sys.argv[1])
idx = torch.tensor([ck.tokenizer.encode("hello")])
with torch.no_grad():
    logits = ck.model(idx)[0]
greedy = [int(t[0]) for t in generate_tokens(ck.model, idx, 40, SamplingConfig(0), None, 16)]
print(json.dumps({"logits": logits.flatten().tolist(), "text": ck.tokenizer.decode(greedy)}))
"""


def save_tiny(run_dir, **state_extra):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("hello world, hi there!")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    state = {
        "model": "gpt",
        "model_config": cfg.to_dict(),
        "tokenizer": tok.to_dict(),
        "step": 0,
        **state_extra,
    }
    save_checkpoint(run_dir / "last", model, torch.optim.AdamW(model.parameters()), state)
    return model, tok


def set_format_version(folder, version):
    for name in ("manifest.json", "state.json"):
        path = folder / name
        if path.exists():
            obj = json.loads(path.read_text())
            obj["format_version"] = version
            path.write_text(json.dumps(obj))


def test_round_trip_in_a_new_process_gives_identical_logits_and_greedy_text(tmp_path):
    """Bit for bit: both processes run the same kernels with one thread each."""
    model, tok = save_tiny(tmp_path)
    idx = torch.tensor([tok.encode("hello")])
    with one_thread(), torch.no_grad():
        logits = model(idx)[0]
        greedy = [int(t[0]) for t in generate_tokens(model, idx, 40, SamplingConfig(0), None, 16)]
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    other = json.loads(out.stdout)
    assert other["logits"] == logits.flatten().tolist()  # bit for bit
    assert other["text"] == tok.decode(greedy)


def test_unknown_format_version_is_refused(tmp_path):
    save_tiny(tmp_path)
    set_format_version(tmp_path / "last", 999)  # as a future tinygpt would write it
    with pytest.raises(TinyGPTError, match="format version 999"):
        load_checkpoint(tmp_path)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(TinyGPTError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(TinyGPTError, match="no such run directory"):
        load_checkpoint(tmp_path / "nope")
