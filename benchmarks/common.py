"""What the benchmark scripts share."""

from __future__ import annotations


def setting_value(text: str):
    """A ``--set KEY=VALUE`` value as the setting's type: int, float, bool or string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
