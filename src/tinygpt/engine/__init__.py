"""Fast generation: batched decoding with a key/value cache, and streamed text.

- ``core``: ``Engine`` and ``SeqState``: next-token logits for many sequences at once, prefill
  and decode over a key/value cache (the cache itself is the model's,
  ``tinygpt.models.kv_cache``), the window sliding past the block size;
- ``decode``: how a step of one new token per sequence runs fast -- the model's own forward on
  lean stand-ins of its layers, each weight in the layout measured fastest on this CPU;
- ``text``: ``stream`` / ``generate_text`` sample texts through the engine, ``TextStream`` cuts
  them at stop strings.
"""

from tinygpt.engine.core import Engine, SeqState
from tinygpt.engine.decode import DECODE_LAYOUT_ENV, DECODE_LAYOUTS, measure_decode_layouts
from tinygpt.engine.text import Piece, TextStream, generate_text, stream
from tinygpt.models.kv_cache import KVCache, LayerCache

__all__ = [
    "DECODE_LAYOUTS", "DECODE_LAYOUT_ENV", "Engine", "KVCache", "LayerCache", "Piece", "SeqState",
    "TextStream", "generate_text", "measure_decode_layouts", "stream",
]
