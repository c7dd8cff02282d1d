"""``eval_mode(model)``: a model in evaluation mode for the length of a ``with`` block.

Evaluating, sampling or looking at a model must not leave it in another mode than it was in: a
training loop that samples now and then would otherwise go on training without dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` to eval mode (no dropout) for the block, and back to training mode when
    the block ends, by an exception too, if that is the mode it was in. Yields the model.

    A model already in eval mode is left as it is: nothing to switch, nothing to walk (the
    engine enters this at every decode step)."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()
