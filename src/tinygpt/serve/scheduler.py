"""Continuous batching: one worker thread decodes every running sequence together, step by step.

Requests wait in a bounded queue; between two decode steps the worker admits waiting requests
while the batch has room and drops the sequences that finished, were cancelled or ran out of
time. Each sequence samples with its own ``torch.Generator``, so a seeded request produces the
same text whichever other requests share its batch.

The worker talks to the web server through a ``sink`` per request, called from the worker thread
with either a list of events ``(choice_index, text, finish_reason)`` or an exception.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tinygpt.engine import Engine, SeqState
from tinygpt.generate import SamplingConfig, sample_next
from tinygpt.tokenizer import CharTokenizer

log = logging.getLogger("tinygpt.serve")

Event = tuple[int, str, "str | None"]  # (choice index, new text, finish reason or None)
Sink = Callable[["list[Event] | BaseException"], None]


class QueueFull(Exception):
    """Too many requests are waiting; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class SchedulerClosed(RuntimeError):
    pass


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Choice:
    """One sequence of a request: its sampler state and the text generated so far."""

    def __init__(self, job: Job, index: int, prompt_ids: list[int], generator: torch.Generator):
        self.job = job
        self.index = index
        self.prompt_ids = prompt_ids
        self.generator = generator
        self.state: SeqState | None = None
        self.text = ""  # generated text, cut before a stop string once one appears
        self.emitted = 0  # characters of ``text`` already sent
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def add(self, char: str) -> None:
        """Record one generated character and decide whether the sequence is done."""
        params = self.job.params
        self.num_tokens += 1
        self.text += char
        if params.stop:
            cut = stop_position(self.text, params.stop)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                return
        if self.num_tokens >= params.max_tokens:
            self.finish_reason = "length"

    def take_text(self) -> str:
        """Text that is safe to send now: all of it once finished, else all but a possible
        beginning of a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= held_back(self.text, self.job.params.stop)
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta


def stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string ending at the end of ``text`` starts, if one does.

    Called after every new character, so a stop string can only newly appear at the end.
    """
    best = None
    for s in stops:
        if text.endswith(s):
            start = len(text) - len(s)
            best = start if best is None else min(best, start)
    return best


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could grow into a stop string."""
    if not stops:
        return 0
    longest = min(len(text), max(len(s) for s in stops) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class Job:
    """One request: ``n`` choices for each prompt, decoded together."""

    def __init__(self, params: GenerationParams, deadline: float, sink: Sink) -> None:
        self.params = params
        self.deadline = deadline
        self.sink = sink
        self.choices: list[Choice] = []
        self.cancelled = False
        self.admitted_at: float | None = None

    def cancel(self) -> None:
        """Stop generating (the client went away); safe to call from any thread."""
        self.cancelled = True


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % 2**64)
    return g


class Scheduler:
    """Owns the engine and the worker thread that drives it."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: CharTokenizer,
        max_batch: int = 32,
        max_queue: int = 64,
    ) -> None:
        self.engine = engine
        self.chars = tokenizer.chars
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._pending_choices = 0
        self._active_count = 0
        self._closed = False
        self._job_seconds = 1.0  # moving average of how long an admitted request runs
        self.steps = 0
        self.tokens = 0
        self._thread = threading.Thread(target=self._run, name="tinygpt-decode", daemon=True)
        self._thread.start()

    # -- called from the web server's threads -----------------------------------------------

    def submit(
        self, prompts: list[list[int]], n: int, params: GenerationParams, timeout: float, sink: Sink
    ) -> Job:
        """Queue a request: ``n`` choices per prompt, choice ``i * n + j`` is prompt ``i``'s
        ``j``-th. Raises ``QueueFull`` when the queue is at its limit."""
        job = Job(params, time.monotonic() + timeout, sink)
        for i, ids in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                seed = None if params.seed is None else params.seed + index
                job.choices.append(Choice(job, index, list(ids), make_generator(seed)))
        if len(job.choices) > self.max_batch:
            raise ValueError(f"a request may have at most {self.max_batch} choices")
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            reserved = self._active_count + self._pending_choices
            fits_now = reserved + len(job.choices) <= self.max_batch
            if not fits_now and len(self._pending) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._pending.append(job)
            self._pending_choices += len(job.choices)
            self._cv.notify()
        return job

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._job_seconds)))

    def stats(self) -> dict:
        with self._cv:
            return {
                "active_sequences": self._active_count,
                "queued_requests": len(self._pending),
                "steps": self.steps,
                "tokens": self.tokens,
            }

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        active: list[Choice] = []
        while True:
            admitted: list[Job] = []
            dropped: list[Job] = []
            with self._cv:
                self._active_count = len(active)
                while not self._closed and not self._pending and not active:
                    self._cv.wait()
                if self._closed:
                    leftover = list(self._pending) + list({c.job: None for c in active})
                    self._pending.clear()
                    break
                now = time.monotonic()
                while self._pending:
                    job = self._pending[0]
                    gone = job.cancelled or now >= job.deadline
                    if not gone and len(active) + len(job.choices) > self.max_batch:
                        break
                    self._pending.popleft()
                    self._pending_choices -= len(job.choices)
                    if gone:
                        dropped.append(job)
                        continue
                    admitted.append(job)
                    active.extend(job.choices)
                self._active_count = len(active)
            for job in dropped:  # waited in the queue until the time ran out (or the client left)
                if not job.cancelled:
                    job.sink([(c.index, "", "length") for c in job.choices])
            for job in admitted:
                job.admitted_at = now
                try:
                    for c in job.choices:
                        c.state = self.engine.new_sequence(c.prompt_ids)
                except Exception as e:  # noqa: BLE001 - reported to the client
                    self._fail(job, e)
                    job.cancelled = True
            active = self._step(active)
        for job in leftover:
            if not job.cancelled:
                job.sink(SchedulerClosed("the server is shutting down"))

    def _step(self, active: list[Choice]) -> list[Choice]:
        """Drop finished sequences, decode one token for the rest; returns those still running."""
        now = time.monotonic()
        events: dict[Job, list[Event]] = {}
        running = []
        for c in active:
            job = c.job
            if job.cancelled:
                continue
            if now >= job.deadline:  # out of time: the text ends here, like max_tokens
                c.finish_reason = "length"
                events.setdefault(job, []).append((c.index, c.take_text(), "length"))
                continue
            running.append(c)
        if running:
            try:
                logits = self.engine.step([c.state for c in running]).float().cpu()
                for i, c in enumerate(running):
                    row = logits[i : i + 1]
                    token = int(sample_next(row, c.job.params.sampling, c.generator)[0])
                    self.engine.append(c.state, token)
                    c.add(self.chars[token])
                    text = c.take_text()
                    if text or c.finish_reason:
                        events.setdefault(c.job, []).append((c.index, text, c.finish_reason))
            except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                log.exception("decode step failed")
                for job in {c.job: None for c in running}:
                    self._fail(job, e)
                    events.pop(job, None)
                running = []
            self.steps += 1
            self.tokens += len(running)
        for job, evs in events.items():
            job.sink(evs)
        still = [c for c in running if c.finish_reason is None]
        for c in active:
            if (c.finish_reason is not None or c.job.cancelled) and c.state is not None:
                self.engine.release(c.state)  # out of the batch: free its cache now
                c.state = None
        finished_jobs = {c.job for c in running if c.finish_reason} - {c.job for c in still}
        for job in finished_jobs:
            if job.admitted_at is not None:
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (now - job.admitted_at)
        return still

    @staticmethod
    def _fail(job: Job, error: BaseException) -> None:
        if not job.cancelled:
            job.sink(error)
        job.cancelled = True
