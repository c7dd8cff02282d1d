"""Exceptions that reach a user as a message instead of a traceback."""

from __future__ import annotations

import os
import shlex
import signal


class TinyGPTError(Exception):
    """A problem with the user's input (a path, a file, a setting).

    The CLI prints ``str(err)`` as one line and exits with status 2. Library callers can catch it
    like any other exception. Configuration dataclasses raise ``ValueError`` instead, which the
    CLI treats the same way.
    """


class TrainingInterrupted(BaseException):  # noqa: N818 -- like KeyboardInterrupt, not an error
    """Training stopped by SIGINT or SIGTERM.

    After the first signal the current step is finished and a checkpoint is saved (``saved`` is
    True); a second signal aborts at once (``saved`` is False; the previous checkpoint stands).
    Like ``KeyboardInterrupt`` it derives from ``BaseException`` so that no ``except Exception``
    swallows it. The CLI exits with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, saved: bool) -> None:
        super().__init__(signum, saved)
        self.signum = signum
        self.saved = saved
        self.step: int | None = None  # the step training stopped at
        self.checkpoint_step: int | None = None  # the newest checkpoint on disk
        self.run_dir: str | None = None

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        what = "stopped" if self.saved else "aborted"
        where = f" at step {self.step}" if self.step is not None else ""
        if self.checkpoint_step is None:
            return f"{what} by {self.signal_name}{where}; no checkpoint was saved yet"
        if self.saved:
            saved = f"checkpoint saved (step {self.checkpoint_step})"
        else:
            saved = f"newest checkpoint is step {self.checkpoint_step}"
        resume = f"tinygpt train --resume {shlex.quote(str(self.run_dir))}"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun job: the same launch again
            resume = f"the same launch command with {resume.removeprefix('tinygpt ')}"
        return f"{what} by {self.signal_name}{where}, {saved}; resume with: {resume}"
