"""tinygpt: a character-level GPT built from scratch, as real software."""

# The package's version: the one place it is written (pyproject.toml reads it from here, and
# ``tinygpt --version`` prints it).
__version__ = "0.1.0"
