"""``tinygpt export`` (a run as a Hugging Face transformers directory) and ``tinygpt import``
(a GPT-2-format directory as a run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygpt.cli.common import Command, add_checkpoint_flag


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    add_checkpoint_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT_DIR")


def add_import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def cmd_export(args: argparse.Namespace) -> int:
    from tinygpt.hf import export_run

    result = export_run(Path(args.run_dir), Path(args.out_dir), args.checkpoint, args.overwrite)
    print(f"wrote {result.architecture} to {result.out_dir} ({', '.join(result.files)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tinygpt.hf import import_hf

    folder = import_hf(Path(args.hf_dir), Path(args.out), args.overwrite)
    print(f"wrote {folder}; sample with: tinygpt sample {args.out}")
    return 0


EXPORT = Command(
    "export", "write a run as a Hugging Face transformers model directory", add_export_flags,
    cmd_export,
    description="Write a run's model and tokenizer as a directory that transformers loads "
    "(AutoModelForCausalLM / AutoTokenizer .from_pretrained): GPT-2 for learned positions, "
    "Llama, Qwen3 or Persimmon for rotary ones. Options with no exact equivalent are refused.",
)
IMPORT = Command(
    "import", "turn a GPT-2-format model directory into a tinygpt run", add_import_flags,
    cmd_import,
    description="Read a GPT-2-format directory (config.json, model.safetensors or "
    "pytorch_model.bin, tokenizer.json or vocab.json + merges.txt) and write it as a run "
    "that samples, evaluates, serves and fine-tunes with --init-from.",
)
