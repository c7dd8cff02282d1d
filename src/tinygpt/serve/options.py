"""The limits that keep one server safe.

Every limit has a conservative default; all of them can be raised on the command line
(``tinygpt serve --max-tokens N ...``: one flag per field, made in ``tinygpt.cli``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

API_KEY_ENV = "TINYGPT_API_KEY"


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeLimits:
    """The limits of one server; ``tinygpt serve`` has a flag for each (help in ``metadata``)."""

    max_body_bytes: int = _limit(256 * 1024, "largest request body in bytes (413 beyond)")
    max_tokens: int = _limit(1024, "largest max_tokens a request may ask for")
    default_max_tokens: int = _limit(16, "max_tokens of a request that leaves it out")
    max_prompt_chars: int = _limit(4096, "longest prompt in characters")
    max_n: int = _limit(8, "most completions per request (n x number of prompts)")
    max_stop: int = _limit(4, "most stop strings per request")
    max_stop_chars: int = _limit(64, "longest stop string in characters")
    max_batch: int = _limit(32, "most sequences decoded together")
    max_queue: int = _limit(64, "most requests waiting for the batch (429 beyond)")
    timeout: float = _limit(60.0, "seconds a request may run before its output is cut")
    max_connections: int = _limit(256, "most open connections (503 beyond)")

    def __post_init__(self) -> None:
        minimum = {"max_queue": 0}
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "timeout":
                ok = (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and 0 < value <= 24 * 3600
                )
                if not ok:
                    raise ValueError(
                        f"{flag} must be a number of seconds in (0, 86400], got {value!r}"
                    )
                continue
            low = minimum.get(f.name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10**9:
                raise ValueError(f"{flag} must be an integer in [{low}, 1000000000], got {value!r}")
        if self.max_n > self.max_batch:
            raise ValueError(
                f"--max-n ({self.max_n}) cannot exceed --max-batch ({self.max_batch}): all "
                f"completions of a request are decoded in the same batch"
            )
        if self.default_max_tokens > self.max_tokens:
            object.__setattr__(self, "default_max_tokens", self.max_tokens)
