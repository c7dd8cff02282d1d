"""tinygpt: a character-level GPT built from scratch, as real software."""

__version__ = "0.1.0"
