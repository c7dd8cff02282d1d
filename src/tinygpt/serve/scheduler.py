"""Continuous batching: one worker thread decodes every running sequence together, step by step.

Requests wait in a bounded queue; between two decode steps the worker admits waiting requests
while the batch has room and drops the sequences that finished, were cancelled or ran out of
time. Each sequence samples with its own ``torch.Generator``, so a seeded request produces the
same text whichever other requests share its batch.

The worker talks to the web server through a ``sink`` per request, called from the worker thread
with either a list of ``Event``s (a choice's new text, finish reason, log-probabilities) or an
exception.

Failures stay where they happen: a sequence whose step or sampling raises fails its own request
(the others in the batch go on), and should the worker thread itself die, every waiting request
is told (``WorkerFailed``), new ones are refused and ``alive`` turns False for ``/health``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tinygpt.engine import Engine, SeqState, TextStream
from tinygpt.generate import SamplingConfig, sample_next
from tinygpt.serve.logprobs import TokenLogprob, score, score_prompt
from tinygpt.tokenizer import Tokenizer

log = logging.getLogger("tinygpt.serve")

class Event(NamedTuple):
    """New text of one choice: ``logprobs`` has one entry per token of ``text`` (if asked)."""

    index: int
    text: str
    finish: str | None = None  # "stop", "length", or None while the choice runs
    logprobs: list[TokenLogprob] | None = None


Sink = Callable[["list[Event] | BaseException"], None]


class QueueFull(Exception):
    """Too many requests are waiting; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class SchedulerClosed(RuntimeError):
    """The scheduler takes no more requests: the server is stopping."""


class WorkerFailed(SchedulerClosed):
    """The worker thread stopped on an unexpected error; the server cannot generate any more."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the decoding worker stopped ({type(error).__name__}); the server "
                         f"must be restarted")
        self.error = error


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # report log-probabilities with this many alternatives
    score_prompt: bool = False  # also the prompt's (echo with logprobs)


class Choice:
    """One sequence of a request: its sampler state and the text generated so far."""

    def __init__(self, job: Job, index: int, prompt_ids: list[int], generator: torch.Generator):
        self.job = job
        self.index = index
        self.prompt_ids = prompt_ids
        self.generator = generator
        self.state: SeqState | None = None
        self.stream = TextStream(job.params.stop)  # the text, cut before a stop string
        self.unsent = ""  # text released by ``stream`` and not yet sent
        self.entries: list[TokenLogprob] = []  # one per generated token, with logprobs
        self.sent = 0  # characters sent so far
        self.sent_entries = 0  # entries sent so far
        self.entry_end = 0  # characters up to the end of the last entry
        self._entry_ends: list[int] = []
        self.decoder = None  # turns the tokens into whole characters (see ``Scheduler._sample``)
        self.prompt_entries: list[TokenLogprob] | None = None  # echo with logprobs
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The text released so far: all of it once finished."""
        return self.stream.text

    def add(self, text: str) -> None:
        """Record one generated token (the characters it completes) and decide whether the
        sequence is done."""
        self.num_tokens += 1
        self.unsent += self.stream.feed(text)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif self.num_tokens >= self.job.params.max_tokens:
            self.end("length")

    def add_entry(self, entry: TokenLogprob) -> None:
        self.entries.append(entry)
        self.entry_end += entry.chars
        self._entry_ends.append(self.entry_end)

    def end(self, reason: str) -> None:
        """No more characters will come: release what the stop strings held back (and the
        bytes of an unfinished character, as U+FFFD)."""
        if self.decoder is not None:
            self.unsent += self.stream.feed(self.decoder.flush())
        self.unsent += self.stream.finish()
        self.finish_reason = reason

    def take(self) -> Event:
        """An event with the text that is safe to send now (all but a possible stop string
        start), and its characters' log-probabilities if the request asked for them."""
        text, self.unsent = self.unsent, ""
        entries = None
        if self.job.params.logprobs is not None:  # the tokens whose characters are sent
            first = self.sent_entries
            # (an event with no text is not sent: the pieces of a character wait for it)
            while (text or self.finish_reason) and (self.sent_entries < len(self.entries)
                   and self._entry_ends[self.sent_entries] <= self.sent + len(text)):
                self.sent_entries += 1
            entries = self.entries[first : self.sent_entries]
        self.sent += len(text)
        return Event(self.index, text, self.finish_reason, entries)


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
        tokenizer: Tokenizer,
        max_batch: int = 32,
        max_queue: int = 64,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        # The text of every token id the model can produce, for logprobs (ids beyond the
        # tokenizer's, in a padded vocabulary, spell nothing).
        self.chars = [tokenizer.token_text(i) if i < tokenizer.vocab_size else ""
                      for i in range(engine.vocab_size)]
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._pending_choices = 0
        self._active: list[Choice] = []  # the worker's batch (only the worker changes it)
        self._calls: deque[tuple[Callable[[], object], Callable]] = deque()  # see ``call``
        self._active_count = 0
        self._closed = False
        self.failure: WorkerFailed | None = None  # set when the worker thread died
        self._job_seconds = 1.0  # moving average of how long an admitted request runs
        self.steps = 0
        self.tokens = 0
        self._thread = threading.Thread(target=self._run, name="tinygpt-decode", daemon=True)
        self._thread.start()

    # -- called from the web server's threads -----------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (False once it died or was closed)."""
        return self.failure is None and self._thread.is_alive()

    def submit(
        self, prompts: list[list[int]], n: int, params: GenerationParams, timeout: float, sink: Sink
    ) -> Job:
        """Queue a request: ``n`` choices per prompt, choice ``i * n + j`` is prompt ``i``'s
        ``j``-th. Raises ``QueueFull`` when the queue is at its limit, ``SchedulerClosed`` when
        the server stops or its worker died."""
        job = Job(params, time.monotonic() + timeout, sink)
        for i, ids in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                seed = None if params.seed is None else params.seed + index
                job.choices.append(Choice(job, index, list(ids), make_generator(seed)))
        if len(job.choices) > self.max_batch:
            raise ValueError(f"a request may have at most {self.max_batch} choices")
        with self._cv:
            if self.failure is not None:
                raise self.failure
            if self._closed or not self._thread.is_alive():
                raise SchedulerClosed("the server is shutting down")
            reserved = self._active_count + self._pending_choices
            fits_now = reserved + len(job.choices) <= self.max_batch
            if not fits_now and len(self._pending) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._pending.append(job)
            self._pending_choices += len(job.choices)
            self._cv.notify()
        return job

    def call(self, fn: Callable[[], object], sink: Callable[[object], None]) -> None:
        """Run ``fn()`` in the worker thread between two decode steps; ``sink`` gets its result
        or the exception it raised. The model is only ever run by the worker: other work on it
        (the attention maps) waits its turn here. Raises like ``submit``."""
        with self._cv:
            if self.failure is not None:
                raise self.failure
            if self._closed or not self._thread.is_alive():
                raise SchedulerClosed("the server is shutting down")
            if len(self._calls) > self.max_queue:
                raise QueueFull(self.retry_after())
            self._calls.append((fn, sink))
            self._cv.notify()

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
        """The worker: decode until closed. If it dies, every waiting request hears why."""
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug; reported to /health and every request
            log.exception("the decoding worker stopped")
            with self._cv:
                self.failure = WorkerFailed(e)
                self._closed = True
                jobs = list(self._pending) + list({c.job: None for c in self._active})
                calls = list(self._calls)
                self._pending.clear()
                self._calls.clear()
                self._active = []
                self._active_count = 0
            for job in jobs:
                self._fail(job, self.failure)
            for _, sink in calls:
                sink(self.failure)

    def _loop(self) -> None:
        while True:
            admitted: list[Job] = []
            dropped: list[Job] = []
            with self._cv:
                active = self._active
                self._active_count = len(active)
                while not self._closed and not self._pending and not active and not self._calls:
                    self._cv.wait()
                if self._closed:
                    leftover = list(self._pending) + list({c.job: None for c in active})
                    leftover_calls = list(self._calls)
                    self._pending.clear()
                    self._calls.clear()
                    break
                calls = list(self._calls)
                self._calls.clear()
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
            for fn, sink in calls:
                self._run_call(fn, sink)
            for job in dropped:  # waited in the queue until the time ran out (or the client left)
                if not job.cancelled:
                    job.sink([Event(c.index, "", "length", [] if job.params.logprobs is not None
                                    else None) for c in job.choices])
            for job in admitted:
                job.admitted_at = now
                try:
                    self._start(job)
                except Exception as e:  # noqa: BLE001 - reported to the client
                    self._fail(job, e)
            self._active = self._step(active)
        for job in leftover:
            self._fail(job, SchedulerClosed("the server is shutting down"))
        for _, sink in leftover_calls:
            sink(SchedulerClosed("the server is shutting down"))

    @staticmethod
    def _run_call(fn: Callable[[], object], sink: Callable[[object], None]) -> None:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            log.error("a call in the worker failed: %r", e)
            result = e
        sink(result)

    def _start(self, job: Job) -> None:
        """Make the engine's sequences of a newly admitted request (and score its prompts)."""
        scored: dict[tuple[int, ...], list[TokenLogprob]] = {}
        for c in job.choices:
            c.state = self.engine.new_sequence(c.prompt_ids)
            if job.params.score_prompt:
                key = tuple(c.prompt_ids)
                if key not in scored:
                    scored[key] = score_prompt(self.engine, c.prompt_ids, job.params.logprobs,
                                               self.chars, self._widths(c.prompt_ids))
                c.prompt_entries = scored[key]
        if job.params.score_prompt:  # a stream sends the echoed prompt with its entries first
            job.sink([Event(c.index, self.tokenizer.decode(c.prompt_ids), None,
                            c.prompt_entries) for c in job.choices])

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
                c.end("length")
                events.setdefault(job, []).append(c.take())
                continue
            running.append(c)
        if running:
            for c, row in zip(running, self._forward(running), strict=True):
                if c.job.cancelled:  # another choice of its request failed in this step
                    continue
                try:
                    if isinstance(row, BaseException):
                        raise row
                    self._sample(c, row)
                except Exception as e:  # noqa: BLE001 - fails this request, not the others
                    log.error("decoding a sequence failed: %r", e)
                    self._fail(c.job, e)
                    continue
                event = c.take()
                if event.text or event.finish:
                    events.setdefault(c.job, []).append(event)
            running = [c for c in running if not c.job.cancelled]
            self.steps += 1
            self.tokens += len(running)
        for job, evs in events.items():
            if not job.cancelled:
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

    def _forward(self, running: list[Choice]) -> list[torch.Tensor | Exception]:
        """Next-token logits (V,) of every running choice, or the error its own step raised.

        The batch runs in one step. Should that fail, each sequence is stepped alone (from its
        window, its cache dropped) to find out which one fails: only its request gets the error.
        """
        try:
            return list(self.engine.step([c.state for c in running]).float().cpu())
        except Exception:  # noqa: BLE001 - narrowed down below
            log.exception("a batched decode step failed; stepping its sequences one by one")
        rows: list[torch.Tensor | Exception] = []
        for c in running:
            self.engine.release(c.state)
            try:
                rows.append(self.engine.step([c.state]).float().cpu()[0])
            except Exception as e:  # noqa: BLE001 - reported to that request
                rows.append(e)
        return rows

    def _sample(self, c: Choice, logits: torch.Tensor) -> None:
        """Draw the next token of ``c`` from its logits (V,) and record it."""
        params = c.job.params
        token = int(sample_next(logits[None], params.sampling, c.generator)[0])
        self.engine.append(c.state, token)
        if c.decoder is None:
            c.decoder = self.tokenizer.text_decoder()
        text = c.decoder.push(token)  # whole characters only: maybe none yet
        if params.logprobs is not None:
            c.add_entry(score(logits, token, params.logprobs, self.chars, len(text)))
        c.add(text)

    def _widths(self, ids: list[int]) -> list[int]:
        """How many characters each token of ``ids`` completes."""
        decoder = self.tokenizer.text_decoder()
        return [len(decoder.push(i)) for i in ids]

    @staticmethod
    def _fail(job: Job, error: BaseException) -> None:
        if not job.cancelled:
            job.sink(error)
        job.cancelled = True
