"""Lessons: the lecture's steps as small programs you run and look at.

- ``trick``: the "mathematical trick" of self-attention, four ways to average the past.
- ``ladder``: the climb from the bigram model to the GPT, one idea per rung, trained one after
  another on the same data (``tinygpt ladder``).
- ``no_mask``: what goes wrong without the causal mask, with honest numbers
  (``tinygpt lesson no-mask``).
- ``bigram``: the bigram model's learned table next to the one counted from the text
  (``tinygpt lesson bigram``).
- ``training``: the small, flat training loop the lessons share (AdamW, random batches).
"""
