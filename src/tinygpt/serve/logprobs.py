"""Log-probabilities of characters, as the OpenAI Completions API reports them (``logprobs``).

At every position the model gives a distribution over the next character. A request with
``logprobs: k`` gets, for every character of its text, the log-probability the model gave it and
the ``k`` most likely characters at that point with theirs (plus the chosen one, so a dict holds
up to ``k + 1`` entries). These are the model's own log-probabilities, ``log_softmax(logits)``:
before temperature, top-k and top-p reshape the distribution for sampling, so they say how sure
the model was, whatever the sampling settings.

With a character model one token is one character, so token ``i`` of a text is its character
``i``. With byte-level BPE a token may stand for several characters, or for bytes of one that the
next tokens complete; such a token is shown as ``\\xNN`` escapes, as OpenAI shows partial bytes,
and ``text_offset`` counts the characters before each token.

The entries themselves are computed in ``tinygpt.logprobs``; this module gives them the API's
shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from tinygpt.logprobs import TokenLogprob

__all__ = ["as_openai", "entries_within"]


def entries_within(entries: Sequence[TokenLogprob], n_chars: int) -> list[TokenLogprob]:
    """The leading entries whose characters lie within the first ``n_chars`` of the text."""
    out, end = [], 0
    for e in entries:
        end += e.chars
        if end > n_chars:
            break
        out.append(e)
    return out


def as_openai(entries: Sequence[TokenLogprob], offset: int) -> dict:
    """The ``logprobs`` object of a choice (or of a streamed chunk of it).

    ``offset`` is the position of the first entry's character counted from the start of the
    prompt (OpenAI's ``text_offset``): 0 for an echoed prompt, the prompt's length for the
    first generated character.
    """
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += e.chars
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [e.top for e in entries],
        "text_offset": offsets,
    }
