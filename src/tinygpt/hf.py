"""Export to and import from Hugging Face ``transformers`` model directories.

``export_run`` writes a trained GPT as a directory that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``). The architecture is
the one that computes *exactly* what tinygpt computes:

====================================================  ==============================
tinygpt options                                       transformers architecture
====================================================  ==============================
learned positions, LayerNorm, no QK-norm,             ``GPT2LMHeadModel``
MLP gelu / gelu_tanh / relu2
rope, RMSNorm, no QK-norm, MLP swiglu                 ``LlamaForCausalLM``
rope, RMSNorm, RMSNorm QK-norm, MLP swiglu, no bias   ``Qwen3ForCausalLM``
rope, LayerNorm, no or LayerNorm QK-norm,             ``PersimmonForCausalLM``
MLP gelu / gelu_tanh / relu2
====================================================  ==============================

Any bias setting and a tied or untied head work everywhere (an architecture that always has
biases gets zeros). Anything else (e.g. ``logit_softcap``, a non-causal model, RMSNorm with an
ungated MLP) has no exact equivalent and is refused with a line naming the option.

Two layout details matter. ``transformers``' GPT-2 keeps its linear layers as ``Conv1D``, whose
weight is the transpose of ``nn.Linear``'s. And ``transformers`` rotates the channel pairs
(i, i + D/2) of each head where tinygpt rotates adjacent pairs (2i, 2i + 1): exporting moves
query and key channel 2i to i and 2i + 1 to i + D/2 (and their QK-norm gains with them). Since
q.k sums over channels, reordering the channels of both changes no attention score.

``import_hf`` does the reverse for GPT-2-format directories (weights and tokenizer): the result is
a tinygpt run (one checkpoint, step 0) that samples, evaluates, serves and fine-tunes with
``--init-from``. ``transformers`` itself is needed by neither direction.

An export is written into a new folder beside ``OUT_DIR`` and then swapped into its place, so
``--overwrite`` killed midway leaves the previous export as it was.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tinygpt.errors import TinyGPTError
from tinygpt.files import atomic_write, fsync_dir, read_json_object, usual_mode, write_json
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.models.gpt_options import ROPE_BASE
from tinygpt.tokenizer import BPETokenizer, CharTokenizer

# GPT-2's names for the activations tinygpt has; "gelu" is the exact erf form in transformers,
# "gelu_new" the tanh approximation GPT-2 was trained with.
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}
IMPORT_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu2": "relu2",
}
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which tinygpt uses
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # torch's RMSNorm default (eps=None) in float32
HF_WEIGHTS = "model.safetensors"


@dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    files: list[str]


# ------------------------------------------------------------------------ choosing an architecture


def _refuse(option: str, why: str) -> TinyGPTError:
    return TinyGPTError(f"cannot export {option}: {why}")


def export_architecture(config: GPTConfig) -> str:
    """The ``transformers`` architecture that represents ``config`` exactly, or a
    ``TinyGPTError`` naming the first option that has no equivalent."""
    c = config
    if not c.causal:
        raise _refuse("causal=false", "transformers' causal language models always mask the future")
    if c.logit_softcap is not None:
        raise _refuse(f"logit_softcap={c.logit_softcap}",
                      "none of GPT-2, Llama, Qwen3 or Persimmon caps its logits")
    if c.value_embeds:
        raise _refuse(f"value_embeds={c.value_embeds}",
                      "none of GPT-2, Llama, Qwen3 or Persimmon adds embeddings to its values")
    if c.x0_skip:
        raise _refuse("x0_skip=true", "none of GPT-2, Llama, Qwen3 or Persimmon has x0 skips")
    if c.pos_embedding == "learned":
        if c.norm != "layernorm":
            raise _refuse(f"norm={c.norm} with learned positions",
                          "GPT-2 (the architecture with learned positions) uses LayerNorm")
        if c.qk_norm != "none":
            raise _refuse(f"qk_norm={c.qk_norm} with learned positions", "GPT-2 has no QK-norm")
        if c.mlp not in EXPORT_ACTIVATIONS:
            raise _refuse(f"mlp={c.mlp} with learned positions", "GPT-2's MLP is not gated")
        return "GPT2LMHeadModel"
    if c.norm == "rmsnorm":
        if c.mlp != "swiglu":
            raise _refuse(
                f"mlp={c.mlp} with norm=rmsnorm and rope",
                "Llama and Qwen3 (rope + RMSNorm) have gated SiLU MLPs only; use --mlp swiglu, "
                "or --norm layernorm for Persimmon",
            )
        if c.qk_norm == "none":
            return "LlamaForCausalLM"
        if c.qk_norm == "rmsnorm":
            if c.bias:
                raise _refuse("bias=true with qk_norm=rmsnorm",
                              "Qwen3 (rope + RMSNorm QK-norm) has no MLP biases; use --no-bias")
            return "Qwen3ForCausalLM"
        raise _refuse("qk_norm=layernorm with norm=rmsnorm",
                      "no architecture mixes RMSNorm blocks with a LayerNorm QK-norm")
    if c.qk_norm == "rmsnorm":
        raise _refuse("qk_norm=rmsnorm with norm=layernorm and rope",
                      "Persimmon (rope + LayerNorm) normalises queries and keys with LayerNorm")
    if c.mlp not in EXPORT_ACTIVATIONS:
        raise _refuse(f"mlp={c.mlp} with norm=layernorm and rope",
                      "Persimmon's MLP is not gated; Llama (--norm rmsnorm) takes swiglu")
    return "PersimmonForCausalLM"


# ------------------------------------------------------------------------------ weight layouts


def _rope_to_halves(rows: torch.Tensor, head_size: int) -> torch.Tensor:
    """Rows (n * D, ...) of query or key heads, from tinygpt's adjacent rotary pairs
    (2i, 2i + 1) to transformers' halves (i, i + D/2): channel 2i -> i, 2i + 1 -> i + D/2."""
    n = rows.shape[0] // head_size
    return rows.reshape(n, head_size // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _linear(sd: dict, name: str, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = sd[f"{name}.weight"]
    b = sd.get(f"{name}.bias") if bias else None
    return w, b


def _bias_or_zeros(sd: dict, name: str, width: int) -> torch.Tensor:
    """A layer's bias, or zeros where tinygpt has none (``--no-bias``): the same function."""
    b = sd.get(f"{name}.bias")
    return b if b is not None else torch.zeros(width)


def _gpt2_weights(sd: dict, c: GPTConfig) -> dict[str, torch.Tensor]:
    C = c.n_embd
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = _bias_or_zeros(sd, src, C)

    def conv1d(src: str, dst: str) -> None:  # Conv1D computes x @ W + b with W (in, out)
        w = sd[f"{src}.weight"]
        out[f"{dst}.weight"] = w.t()
        out[f"{dst}.bias"] = _bias_or_zeros(sd, src, w.shape[0])

    for i in range(c.n_layer):
        s, d = f"blocks.{i}", f"transformer.h.{i}"
        norm(f"{s}.ln_1", f"{d}.ln_1")
        conv1d(f"{s}.attn.c_attn", f"{d}.attn.c_attn")
        conv1d(f"{s}.attn.c_proj", f"{d}.attn.c_proj")
        norm(f"{s}.ln_2", f"{d}.ln_2")
        conv1d(f"{s}.mlp.c_fc", f"{d}.mlp.c_fc")
        conv1d(f"{s}.mlp.c_proj", f"{d}.mlp.c_proj")
    norm("ln_f", "transformer.ln_f")
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _split_qkv(sd: dict, prefix: str, c: GPTConfig) -> list[torch.Tensor | None]:
    """q, k, v weights (C, C) and biases (C,) of one tinygpt attention layer, q and k rows in
    transformers' rotary order."""
    C, D = c.n_embd, c.n_embd // c.n_head
    w = sd[f"{prefix}.c_attn.weight"]  # (3C, C): q, k, v rows, each head after head
    b = sd.get(f"{prefix}.c_attn.bias")
    parts = []
    for j in range(3):
        wj = w[j * C:(j + 1) * C]
        bj = None if b is None else b[j * C:(j + 1) * C]
        if j < 2:
            wj = _rope_to_halves(wj, D)
            bj = None if bj is None else _rope_to_halves(bj, D)
        parts += [wj, bj]
    return parts


def _llama_weights(sd: dict, c: GPTConfig, qwen: bool) -> dict[str, torch.Tensor]:
    D = c.n_embd // c.n_head
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(c.n_layer):
        s, d = f"blocks.{i}", f"model.layers.{i}"
        out[f"{d}.input_layernorm.weight"] = sd[f"{s}.ln_1.weight"]
        out[f"{d}.post_attention_layernorm.weight"] = sd[f"{s}.ln_2.weight"]
        wq, bq, wk, bk, wv, bv = _split_qkv(sd, f"{s}.attn", c)
        for name, w, b in (("q_proj", wq, bq), ("k_proj", wk, bk), ("v_proj", wv, bv)):
            out[f"{d}.self_attn.{name}.weight"] = w
            if b is not None:
                out[f"{d}.self_attn.{name}.bias"] = b
        pairs = [("attn.c_proj", "self_attn.o_proj"), ("mlp.c_gate", "mlp.gate_proj"),
                 ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")]
        for src, dst in pairs:
            w, b = _linear(sd, f"{s}.{src}", c.bias)
            out[f"{d}.{dst}.weight"] = w
            if b is not None:
                out[f"{d}.{dst}.bias"] = b
        if qwen:
            out[f"{d}.self_attn.q_norm.weight"] = _rope_to_halves(sd[f"{s}.attn.q_norm.weight"], D)
            out[f"{d}.self_attn.k_norm.weight"] = _rope_to_halves(sd[f"{s}.attn.k_norm.weight"], D)
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _persimmon_weights(sd: dict, c: GPTConfig) -> dict[str, torch.Tensor]:
    C, H, D = c.n_embd, c.n_head, c.n_embd // c.n_head
    out = {"model.embed_tokens.weight": sd["wte.weight"]}

    def norm(src: str, dst: str, width: int, reorder: bool = False) -> None:
        w, b = sd[f"{src}.weight"], _bias_or_zeros(sd, src, width)
        if reorder:
            w, b = _rope_to_halves(w, D), _rope_to_halves(b, D)
        out[f"{dst}.weight"], out[f"{dst}.bias"] = w, b

    for i in range(c.n_layer):
        s, d = f"blocks.{i}", f"model.layers.{i}"
        norm(f"{s}.ln_1", f"{d}.input_layernorm", C)
        norm(f"{s}.ln_2", f"{d}.post_attention_layernorm", C)
        wq, bq, wk, bk, wv, bv = _split_qkv(sd, f"{s}.attn", c)
        zeros = torch.zeros(C)
        bq, bk, bv = (zeros if b is None else b for b in (bq, bk, bv))
        # Persimmon's fused projection holds q, k, v of head 0, then of head 1, ...: (H, 3, D)
        out[f"{d}.self_attn.query_key_value.weight"] = torch.stack(
            [wq.view(H, D, C), wk.view(H, D, C), wv.view(H, D, C)], dim=1).reshape(3 * C, C)
        out[f"{d}.self_attn.query_key_value.bias"] = torch.stack(
            [bq.view(H, D), bk.view(H, D), bv.view(H, D)], dim=1).reshape(3 * C)
        if c.qk_norm == "layernorm":
            norm(f"{s}.attn.q_norm", f"{d}.self_attn.q_layernorm", D, reorder=True)
            norm(f"{s}.attn.k_norm", f"{d}.self_attn.k_layernorm", D, reorder=True)
        for src, dst in (("attn.c_proj", "self_attn.dense"), ("mlp.c_fc", "mlp.dense_h_to_4h"),
                         ("mlp.c_proj", "mlp.dense_4h_to_h")):
            w = sd[f"{s}.{src}.weight"]
            out[f"{d}.{dst}.weight"] = w
            out[f"{d}.{dst}.bias"] = _bias_or_zeros(sd, f"{s}.{src}", w.shape[0])
    norm("ln_f", "model.final_layernorm", C)
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ------------------------------------------------------------------------------------ configs


def _hf_config(arch: str, c: GPTConfig, special: dict[str, int | None]) -> dict:
    """``config.json`` for ``arch``: only what differs from the defaults matters, but everything
    that defines the function is written out."""
    # "dtype" and "rope_parameters" are transformers 5's names, "torch_dtype" and "rope_theta"
    # transformers 4's; each version ignores the other's.
    common = {
        "architectures": [arch], "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings,
        "dtype": "float32", "torch_dtype": "float32", "use_cache": True, **special,
    }
    attn_p = c.dropout if c.attn_dropout is None else c.attn_dropout
    if arch == "GPT2LMHeadModel":
        return {
            "model_type": "gpt2", **common, "n_positions": c.block_size, "n_embd": c.n_embd,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": 4 * c.n_embd,
            "activation_function": EXPORT_ACTIVATIONS[c.mlp], "layer_norm_epsilon": LAYER_NORM_EPS,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": attn_p,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    rope = {"rope_theta": ROPE_BASE, "rope_type": "default"}
    shape = {
        "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "max_position_embeddings": c.block_size, "attention_dropout": attn_p,
    }
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        out = {
            "model_type": "llama" if arch == "LlamaForCausalLM" else "qwen3", **common, **shape,
            "num_key_value_heads": c.n_head, "head_dim": c.n_embd // c.n_head,
            "intermediate_size": int(8 * c.n_embd / 3), "hidden_act": "silu",
            "rms_norm_eps": RMS_NORM_EPS, "rope_parameters": rope, "rope_theta": ROPE_BASE,
            "attention_bias": c.bias,
        }
        if arch == "LlamaForCausalLM":
            out["mlp_bias"] = c.bias
        else:
            out["use_sliding_window"] = False
        return out
    return {
        "model_type": "persimmon", **common, **shape, "intermediate_size": 4 * c.n_embd,
        "hidden_act": EXPORT_ACTIVATIONS[c.mlp] if c.mlp != "gelu_tanh" else "gelu_pytorch_tanh",
        "layer_norm_eps": LAYER_NORM_EPS, "qk_layernorm": c.qk_norm == "layernorm",
        "rope_parameters": {**rope, "partial_rotary_factor": 1.0}, "hidden_dropout": c.dropout,
        "rope_theta": ROPE_BASE, "partial_rotary_factor": 1.0,  # the same, as transformers 4 reads it
    }


# --------------------------------------------------------------------------------- tokenizers


def char_tokenizer_json(tok: CharTokenizer) -> str:
    """A ``tokenizers`` tokenizer equivalent to ``tok``: every character one token (a regex split
    into single code points, then a word-level lookup), decoded by plain concatenation (the
    ``Fuse`` decoder: no spaces between tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.WordLevel(vocab=dict(tok.stoi), unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t.to_str()


def _char_tokenizer_from_json(spec: dict) -> CharTokenizer | None:
    """The ``CharTokenizer`` a ``tokenizer.json`` written by ``char_tokenizer_json`` describes,
    or None if it is another kind of tokenizer."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "WordLevel" or decoder.get("type") != "Fuse":
        return None
    vocab = model.get("vocab") or {}
    chars = sorted(vocab, key=vocab.get)
    if any(len(ch) != 1 for ch in chars) or [vocab[ch] for ch in chars] != list(range(len(chars))):
        raise TinyGPTError("tokenizer.json is a word-level tokenizer but not one character per id")
    tok = CharTokenizer(chars)
    if tok.chars != chars:
        raise TinyGPTError(
            "tokenizer.json's characters are not in code-point order, as tinygpt's character "
            "tokenizer needs"
        )
    return tok


def _special_tokens(tok) -> dict[str, str]:
    """GPT-2's end-of-text token, if the vocabulary has it (character models have none)."""
    if isinstance(tok, BPETokenizer) and tok.tokenizer.token_to_id("<|endoftext|>") is not None:
        return {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    return {}


# ------------------------------------------------------------------------------------- export


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyGPTError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise TinyGPTError(f"{out_dir} is not empty; pass --overwrite to replace its files")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or its file system cannot."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry_over(old: Path, new: Path) -> None:
    """Put the entries of ``old`` that the export does not write into ``new`` (hard links where
    possible): ``--overwrite`` replaces the export's files and keeps the others."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
            continue
        try:
            os.link(entry, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(entry, target, follow_symlinks=False)


def _write_beside(out_dir: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """``write(folder)`` into a new folder beside ``out_dir``, then put that folder in its place.

    Killed at any point, ``out_dir`` holds the previous export or the new one, each whole (a kill
    while writing leaves the unfinished folder, ``.OUT_DIR.*.tmp``, beside it). The swap is one
    step on Linux; elsewhere the previous folder is moved aside just before.
    """
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, usual_mode(0o777))
        write(tmp)
        if not out_dir.is_dir():
            os.rename(tmp, out_dir)
        else:
            _carry_over(out_dir, tmp)
            if not _exchange(tmp, out_dir):
                aside = tmp.with_suffix(".old")
                os.rename(out_dir, aside)
                os.rename(tmp, out_dir)
                tmp = aside
            shutil.rmtree(tmp)  # the previous export
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(model: GPT, tokenizer, out_dir: Path, overwrite: bool = False) -> ExportResult:
    """Write ``model`` and ``tokenizer`` as a ``transformers`` model directory."""
    from safetensors.torch import save_file

    if not isinstance(model, GPT):
        raise TinyGPTError("cannot export the bigram model: only GPT models have a transformers "
                           "equivalent")
    c = model.config
    arch = export_architecture(c)
    if tokenizer.vocab_size > c.vocab_size:
        raise TinyGPTError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model "
                           f"{c.vocab_size}")
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if any(k.endswith(".weight_packed") for k in sd):
        raise TinyGPTError("cannot export a model with int8 weights (--quantize int8): the "
                           "exported model is the float32 one; export the run itself")
    if arch == "GPT2LMHeadModel":
        weights = _gpt2_weights(sd, c)
    elif arch == "PersimmonForCausalLM":
        weights = _persimmon_weights(sd, c)
    else:
        weights = _llama_weights(sd, c, qwen=arch == "Qwen3ForCausalLM")
    if c.tie_embeddings:  # transformers ties the head to the embedding table itself
        weights.pop("lm_head.weight")
    weights = {k: v.contiguous().clone() for k, v in weights.items()}

    special = _special_tokens(tokenizer)
    eos = tokenizer.tokenizer.token_to_id(special["eos_token"]) if special else None
    ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None}
    if isinstance(tokenizer, CharTokenizer):
        tok_json = char_tokenizer_json(tokenizer)
    else:
        tok_json = tokenizer.to_json()
    out_dir = Path(out_dir)

    def write(folder: Path) -> None:
        atomic_write(folder / HF_WEIGHTS,
                     lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        write_json(folder / "config.json", _hf_config(arch, c, ids))
        write_json(folder / "generation_config.json", {
            "_from_model_config": False, **{k: v for k, v in ids.items() if v is not None},
        })
        atomic_write(folder / "tokenizer.json",
                     lambda tmp: Path(tmp).write_text(tok_json, encoding="utf-8"))
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
            **special,
        })

    _write_beside(out_dir, overwrite, write)
    files = sorted(p.name for p in out_dir.iterdir())
    return ExportResult(out_dir, arch, files)


def export_run(run_dir: Path, out_dir: Path, which: str = "best",
               overwrite: bool = False) -> ExportResult:
    """Export the ``which`` checkpoint of a run (see ``export_model``)."""
    from tinygpt.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(run_dir), which, "cpu")
    return export_model(ckpt.model, ckpt.tokenizer, Path(out_dir), overwrite)


# ------------------------------------------------------------------------------------- import


def _read_json_file(path: Path) -> dict:
    try:
        return read_json_object(path, str(path))
    except ValueError as e:
        raise TinyGPTError(str(e)) from None


def _gpt2_config(hf: dict, where: Path) -> GPTConfig:
    """tinygpt's config for a GPT-2 ``config.json``; refuses what tinygpt cannot compute."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise TinyGPTError(
            f"{where} holds a {model_type!r} model; tinygpt imports GPT-2-format models "
            f"(model_type 'gpt2')"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in IMPORT_ACTIVATIONS:
        raise TinyGPTError(f"{where}: activation_function {act!r} has no tinygpt equivalent "
                           f"(known: {', '.join(IMPORT_ACTIVATIONS)})")
    n_embd = hf.get("n_embd", 768)
    checks = [
        ("n_inner", hf.get("n_inner") in (None, 4 * n_embd) if isinstance(n_embd, int) else False,
         "an MLP 4x as wide as n_embd"),
        ("layer_norm_epsilon", math.isclose(hf.get("layer_norm_epsilon", 1e-5), LAYER_NORM_EPS),
         f"{LAYER_NORM_EPS}"),
        ("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true"),
        ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False),
         "false"),
        ("add_cross_attention", not hf.get("add_cross_attention", False), "false"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise TinyGPTError(f"{where}: {key} = {hf.get(key)!r} is not supported (tinygpt needs "
                               f"{need})")
    dropout, attn_p = hf.get("resid_pdrop", 0.1), hf.get("attn_pdrop", 0.1)
    attn_p = None if attn_p == dropout else attn_p  # None: the same as dropout
    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
            dropout=dropout, attn_dropout=attn_p, bias=True,
            pos_embedding="learned", norm="layernorm", qk_norm="none",
            mlp=IMPORT_ACTIVATIONS[act], tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    except (TypeError, ValueError) as e:
        raise TinyGPTError(f"{where}: {e}") from None


def _load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory: ``model.safetensors``, a sharded safetensors index, or
    a ``pytorch_model.bin`` (read with ``weights_only``: tensors only, no code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = hf_dir / HF_WEIGHTS, hf_dir / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(_read_json_file(index).get("weight_map", {}).values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                if "/" in shard or "\\" in shard:
                    raise TinyGPTError(f"{index} names a shard outside the directory: {shard!r}")
                out.update(load_file(str(hf_dir / shard)))
            return out
        legacy = hf_dir / "pytorch_model.bin"
        if legacy.is_file():
            obj = torch.load(legacy, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise TinyGPTError(f"{legacy} does not hold a dictionary of tensors")
            return obj
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise TinyGPTError(f"cannot read the weights in {hf_dir}: {str(e).splitlines()[0]}") from None
    raise TinyGPTError(f"{hf_dir} has no weights ({HF_WEIGHTS} or pytorch_model.bin)")


def _gpt2_to_tinygpt(hf: dict[str, torch.Tensor], c: GPTConfig, where: Path) -> dict[str, torch.Tensor]:
    """tinygpt's state dict from GPT-2 tensors (names with or without ``transformer.``)."""
    hf = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model = GPT(c)  # the shapes to fill
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(src: str, dst: str, transpose: bool = False) -> None:
        if src not in hf:
            raise TinyGPTError(f"{where}: the weights lack {src}")
        t = hf[src].to(torch.float32)
        t = t.t() if transpose else t
        if tuple(t.shape) != tuple(expected[dst].shape):
            raise TinyGPTError(f"{where}: {src} has shape {tuple(hf[src].shape)}, config.json "
                               f"implies {tuple(expected[dst].shape)}")
        out[dst] = t.contiguous()
        used.add(src)

    take("wte.weight", "wte.weight")
    take("wpe.weight", "wpe.weight")
    for i in range(c.n_layer):
        s, d = f"h.{i}", f"blocks.{i}"
        for name in ("ln_1", "ln_2"):
            take(f"{s}.{name}.weight", f"{d}.{name}.weight")
            take(f"{s}.{name}.bias", f"{d}.{name}.bias")
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            take(f"{s}.{name}.weight", f"{d}.{name}.weight", transpose=True)
            take(f"{s}.{name}.bias", f"{d}.{name}.bias")
    take("ln_f.weight", "ln_f.weight")
    take("ln_f.bias", "ln_f.bias")
    if c.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
        used.add("lm_head.weight")
    else:
        take("lm_head.weight", "lm_head.weight")
    extra = sorted(set(hf) - used)
    if extra:
        raise TinyGPTError(f"{where}: unexpected tensor {extra[0]} (and {len(extra) - 1} more) for "
                           f"a {c.n_layer}-layer GPT-2" if len(extra) > 1 else
                           f"{where}: unexpected tensor {extra[0]} for a {c.n_layer}-layer GPT-2")
    return out


def read_hf_tokenizer(hf_dir: Path) -> CharTokenizer | BPETokenizer:
    """The tokenizer of a model directory: ``tokenizer.json`` (byte-level BPE, or a character
    tokenizer as tinygpt exports), else GPT-2's ``vocab.json`` + ``merges.txt``."""
    path = hf_dir / "tokenizer.json"
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
        except (OSError, ValueError) as e:
            raise TinyGPTError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(spec, dict):
            raise TinyGPTError(f"{path} is not a JSON object")
        char = _char_tokenizer_from_json(spec)
        return char if char is not None else BPETokenizer.from_json(text)
    vocab, merges = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            t = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise TinyGPTError(f"cannot read {vocab} and {merges}: {str(e).splitlines()[0]}") from None
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        if t.token_to_id("<|endoftext|>") is not None:
            t.add_special_tokens(["<|endoftext|>"])
        return BPETokenizer(t)
    raise TinyGPTError(f"{hf_dir} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")


def read_hf_gpt2(hf_dir: Path) -> tuple[GPT, CharTokenizer | BPETokenizer]:
    """A tinygpt GPT and tokenizer from a GPT-2-format model directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise TinyGPTError(f"no such directory: {hf_dir}")
    config = _gpt2_config(_read_json_file(hf_dir / "config.json"), hf_dir / "config.json")
    weights = _gpt2_to_tinygpt(_load_hf_weights(hf_dir), config, hf_dir)
    tokenizer = read_hf_tokenizer(hf_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise TinyGPTError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                           f"model only {config.vocab_size}")
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise TinyGPTError(f"{hf_dir}: tensor {bad[0]} holds NaN or Inf")
    biases = [k for k in weights if k.endswith(".bias")]
    if all(not weights[k].any() for k in biases):
        # Every bias exactly zero: a model tinygpt exported with --no-bias. Without biases it
        # computes the same, and exporting it again gives the same files.
        config = replace(config, bias=False)
        weights = {k: v for k, v in weights.items() if k not in biases}
    model = GPT(config)
    model.load_state_dict(weights)
    model.eval()
    return model, tokenizer


def import_hf(hf_dir: Path, run_dir: Path, overwrite: bool = False) -> Path:
    """Write a GPT-2-format directory as a tinygpt run (one checkpoint, step 0; ``best`` and
    ``last`` point at it). Returns the checkpoint folder."""
    from tinygpt.checkpoint import point_link, save_checkpoint, step_dir_name

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    model, tokenizer = read_hf_gpt2(hf_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise TinyGPTError(f"{run_dir} already exists; pass --overwrite to replace it")
    if overwrite and run_dir.is_dir():
        shutil.rmtree(run_dir)
    state = {
        "model": "gpt", "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
        "step": 0, "imported_from": {"path": os.path.abspath(hf_dir), "architecture": "gpt2"},
        "train_config": {"model": "gpt", "block_size": model.config.block_size},
    }
    folder = save_checkpoint(run_dir / step_dir_name(0), model, None, state)
    point_link(run_dir, "last", folder.name)
    point_link(run_dir, "best", folder.name)
    return folder
