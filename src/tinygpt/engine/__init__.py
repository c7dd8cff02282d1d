"""Fast generation: next-token logits for many sequences at once, over a key/value cache.

- ``core``: ``Engine`` and ``SeqState``: next-token logits for many sequences at once, prefill
  and decode over a key/value cache (the cache itself is the model's,
  ``tinygpt.models.kv_cache``), the window sliding past the block size;
- ``decode``: how a step of one new token per sequence runs fast -- the model's own forward on
  lean stand-ins of its layers, each weight in the layout measured fastest on this CPU;
- ``quantize``: int8 weight-only linear layers, put in at load time (``--quantize int8``).

Sampling text through the engine -- a sequence's generator, text decoder, stop strings,
log-probabilities and finish reason, for the CLI, the library and the server alike -- is one room
up, in ``tinygpt.sequence``.
"""

from tinygpt.engine.core import Engine, SeqState
from tinygpt.engine.decode import DECODE_LAYOUT_ENV, DECODE_LAYOUTS, measure_decode_layouts
from tinygpt.models.kv_cache import KVCache, LayerCache

__all__ = [
    "DECODE_LAYOUTS", "DECODE_LAYOUT_ENV", "Engine", "KVCache", "LayerCache", "SeqState",
    "measure_decode_layouts",
]
