"""``--quantize``: how a loaded model's weights are stored for sampling, evaluating and serving.

The one definition of the modes and of the flag (``sample``, ``eval`` and ``serve`` declare it
through ``tinygpt.cli.common.add_load_flags``); the work is ``tinygpt.engine.quantize``. This
module imports no torch, so that the command line parses fast.
"""

from __future__ import annotations

import argparse

from tinygpt.errors import TinyGPTError

# "none": the weights as trained (float32); "int8": int8 weight-only linear layers.
QUANTIZE_MODES = ("none", "int8")
QUANTIZE_HELP = ("none (the weights as trained) or int8 (linear layers' weights as 8-bit values "
                 "with a float32 scale and offset per input channel and block of outputs, "
                 "float32 activations: about a quarter of the weight memory; see "
                 "docs/generation.md) (default: none)")


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help=QUANTIZE_HELP)


def check_quantize(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise TinyGPTError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    return mode


def quantize_model(model, mode: str):
    """``model`` (a loaded, eval-mode ``nn.Module``) with its weights stored as ``mode`` says:
    changed in place for "int8", as it is for "none"."""
    if check_quantize(mode) == "int8":
        from tinygpt.engine.quantize import quantize_int8

        quantize_int8(model)
    return model
