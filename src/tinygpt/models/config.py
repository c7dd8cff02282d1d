"""The GPT's hyperparameters: ``GPTConfig``, the values each option may take, and its checks.

A ``GPTConfig`` is what a checkpoint stores about its model (``to_dict``) and what every other
room sizes itself from: the model (``tinygpt.models.gpt``), its key/value cache
(``tinygpt.models.kv_cache``), training, export. Building one validates it (``check_config``):
an impossible combination fails at once, with a message that says what to change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

POS_EMBEDDINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
QK_NORMS = ("none", *NORMS)
MLPS = ("gelu", "gelu_tanh", "relu2", "swiglu")  # gelu_tanh: GPT-2's tanh approximation of GELU


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # longest context the model can see
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    # Dropout on the attention weights; None: the same as dropout. 0 with dropout > 0 keeps the
    # fused attention kernel (the CPU one has no dropout) while still regularising the rest.
    attn_dropout: float | None = None
    bias: bool = True  # biases in Linear layers and LayerNorms
    # Teaching switch: False lets every position attend to the future too. Training loss then
    # collapses (the answer is visible) while sampling, which has no future, produces garbage.
    causal: bool = True
    # "learned": a table of block_size position vectors added to the token embeddings (GPT-2).
    # "rope": rotary embeddings, queries and keys rotated by position inside every attention layer.
    pos_embedding: str = "learned"
    # Options from later small-transformer work; the defaults are the lecture's architecture.
    norm: str = "layernorm"  # "rmsnorm": rescale only (no mean subtraction, no bias)
    # Normalise each head's queries and keys before attention: "none", "rmsnorm" or "layernorm".
    qk_norm: str = "none"
    mlp: str = "gelu"  # "relu2": relu(x)^2; "swiglu": gated, 8/3 x wide (same parameter count)
    tie_embeddings: bool = False  # share the token embedding table with the output head
    zero_init: bool = False  # start residual projections and the head at zero
    logit_softcap: float | None = None  # squash logits into (-cap, cap) with cap * tanh(x / cap)
    # Value embeddings: the first this-many blocks each add a token embedding table of their own
    # to the attention values (0: none).
    value_embeds: int = 0
    # A learned weight per block adds the first block's input (the embeddings, x0) back into the
    # residual stream before that block.
    x0_skip: bool = False

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def check_config(c: GPTConfig) -> None:
    """Raise ``ValueError`` with an actionable message for an impossible configuration."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if c.n_embd % c.n_head:
        raise ValueError(
            f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head}); "
            f"try n_embd={c.n_head * max(1, round(c.n_embd / c.n_head))}"
        )
    for name in ("dropout", "attn_dropout"):
        p = getattr(c, name)
        if p is None and name == "attn_dropout":
            continue
        if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    for name, allowed in (("pos_embedding", POS_EMBEDDINGS), ("norm", NORMS), ("qk_norm", QK_NORMS),
                          ("mlp", MLPS)):
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}")
    cap = c.logit_softcap
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf
    ):
        raise ValueError(f"logit_softcap must be a positive number (or None), got {cap!r}")
    if c.pos_embedding == "rope" and (c.n_embd // c.n_head) % 2:
        raise ValueError(
            f"rope rotates channel pairs, so the head size n_embd / n_head must be even; "
            f"got {c.n_embd} / {c.n_head} = {c.n_embd // c.n_head}"
        )
    ve = c.value_embeds
    if isinstance(ve, bool) or not isinstance(ve, int) or not 0 <= ve <= c.n_layer:
        raise ValueError(f"value_embeds must be an integer from 0 to n_layer ({c.n_layer}), "
                         f"got {ve!r}")
    if c.zero_init and c.tie_embeddings:
        raise ValueError(
            "zero_init and tie_embeddings do not go together (the tied head is the embedding "
            "table, which cannot start at zero); drop one of them"
        )
