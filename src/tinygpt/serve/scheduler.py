"""Continuous batching: one worker thread decodes every running sequence together, step by step.

Requests wait in a bounded queue; between two decode steps the worker admits waiting requests
while the batch has room and drops the sequences that finished, were cancelled or ran out of
time. Each sequence is a ``tinygpt.sequence.Sample``, the same as the library's and the CLI's:
it samples with its own ``torch.Generator`` (so a seeded request produces the same text whichever
other requests share its batch) and keeps its text, stop strings, logprobs and finish reason.
The scheduler only admits, batches, cuts at the deadline and delivers.

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

from tinygpt.engine import Engine
from tinygpt.logprobs import TokenLogprob, score_prompt, token_texts
from tinygpt.sampling import GenerationConfig
from tinygpt.sequence import Sample
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
    """A request's settings: what to generate (``GenerationConfig``, checked once for the
    library, the CLI and the API) and whether its prompts are scored too (echo with logprobs)."""

    config: GenerationConfig
    score_prompt: bool = False


class Choice:
    """One choice of a request: its ``Sample`` and how much of it was delivered."""

    def __init__(self, job: Job, index: int, sample: Sample) -> None:
        self.job = job
        self.index = index
        self.sample = sample
        self.unsent = ""  # text the sample released and not yet sent
        self.sent = 0  # characters sent so far
        self.sent_entries = 0  # logprobs entries sent so far
        self.prompt_entries: list[TokenLogprob] | None = None  # echo with logprobs

    @property
    def text(self) -> str:
        """The text released so far: all of it once finished."""
        return self.sample.text

    @property
    def entries(self) -> list[TokenLogprob]:
        return self.sample.entries

    @property
    def num_tokens(self) -> int:
        return self.sample.num_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.sample.finish_reason

    def take(self) -> Event:
        """An event with the text that is safe to send now (all but a possible stop string
        start), and its characters' log-probabilities if the request asked for them."""
        text, self.unsent = self.unsent, ""
        entries = None
        if self.sample.config.logprobs is not None:  # the tokens whose characters are sent
            first = self.sent_entries
            # (an event with no text is not sent: the pieces of a character wait for it)
            if text or self.finish_reason:
                self.sent_entries = self.sample.entry_count(self.sent + len(text))
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


class Scheduler:
    """Owns the engine and the worker thread that drives it.

    ``clock`` gives the time that deadlines are counted in (``time.monotonic``; a test passes
    its own). ``start=False`` starts no thread: the caller runs the worker's rounds itself with
    ``run_once`` (the unit tests do).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        max_queue: int = 64,
        *,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chars = token_texts(tokenizer, engine.vocab_size)  # for logprobs
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.clock = clock
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
        if start:
            self._thread.start()

    # -- called from the web server's threads -----------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker is running (False once it died or was closed)."""
        return self.failure is None and not self._stopped()

    def _stopped(self) -> bool:
        return self._closed or (self._thread.ident is not None and not self._thread.is_alive())

    def submit(
        self, prompts: list[list[int]], n: int, params: GenerationParams, timeout: float, sink: Sink
    ) -> Job:
        """Queue a request: ``n`` choices per prompt, choice ``i * n + j`` is prompt ``i``'s
        ``j``-th (its seed is the request's plus ``i * n + j``). Raises ``QueueFull`` when the
        queue is at its limit, ``SchedulerClosed`` when the server stops or its worker died."""
        job = Job(params, self.clock() + timeout, sink)
        for i, ids in enumerate(prompts):
            for j in range(n):
                sample = Sample(self.tokenizer, ids, params.config, i * n + j,
                                token_texts=self.chars)
                job.choices.append(Choice(job, i * n + j, sample))
        if len(job.choices) > self.max_batch:
            raise ValueError(f"a request may have at most {self.max_batch} choices")
        with self._cv:
            self._check_open()
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
            self._check_open()
            if len(self._calls) > self.max_queue:
                raise QueueFull(self.retry_after())
            self._calls.append((fn, sink))
            self._cv.notify()

    def _check_open(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._stopped():
            raise SchedulerClosed("the server is shutting down")

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
        if self._thread.ident is not None:
            self._thread.join(timeout)
        else:  # no worker thread: tell the waiting requests here
            self._shut_down()

    # -- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        """The worker: decode until closed. If it dies, every waiting request hears why."""
        try:
            while self._wait_for_work():
                self.run_once()
            self._shut_down()
        except BaseException as e:  # noqa: BLE001 - a bug; reported to /health and every request
            log.exception("the decoding worker stopped")
            with self._cv:
                self.failure = WorkerFailed(e)
                self._closed = True
            self._shut_down(self.failure)

    def _wait_for_work(self) -> bool:
        """Wait until there is something to do; False once closed."""
        with self._cv:
            self._active_count = len(self._active)
            while not (self._closed or self._pending or self._active or self._calls):
                self._cv.wait()
            return not self._closed

    def _shut_down(self, error: BaseException | None = None) -> None:
        """Fail every request and call still waiting or running."""
        with self._cv:
            jobs = list(self._pending) + list({c.job: None for c in self._active})
            calls = list(self._calls)
            self._pending.clear()
            self._calls.clear()
            self._pending_choices = 0
            self._active = []
            self._active_count = 0
        error = error or SchedulerClosed("the server is shutting down")
        for job in jobs:
            self._fail(job, error)
        for _, sink in calls:
            sink(error)

    def run_once(self) -> None:
        """One round of the worker: the waiting calls, admission (and the requests whose time
        ran out in the queue), then one decode step of the batch."""
        calls, admitted, dropped, now = self._admit()
        for fn, sink in calls:
            self._run_call(fn, sink)
        for job in dropped:  # waited in the queue until the time ran out (or the client left)
            if not job.cancelled:
                job.sink([Event(c.index, "", "length", [] if c.sample.config.logprobs is not None
                                else None) for c in job.choices])
        for job in admitted:
            job.admitted_at = now
            try:
                self._start(job)
            except Exception as e:  # noqa: BLE001 - reported to the client
                self._fail(job, e)
        active = self._step(self._active)
        with self._cv:
            self._active = active
            self._active_count = len(active)

    def _admit(self) -> tuple[list, list[Job], list[Job], float]:
        """Take the waiting calls, and the waiting requests that fit in the batch."""
        admitted: list[Job] = []
        dropped: list[Job] = []
        with self._cv:
            calls = list(self._calls)
            self._calls.clear()
            now = self.clock()
            while self._pending:
                job = self._pending[0]
                gone = job.cancelled or now >= job.deadline
                if not gone and len(self._active) + len(job.choices) > self.max_batch:
                    break
                self._pending.popleft()
                self._pending_choices -= len(job.choices)
                if gone:
                    dropped.append(job)
                    continue
                admitted.append(job)
                self._active.extend(job.choices)
            self._active_count = len(self._active)
        return calls, admitted, dropped, now

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
            c.sample.start(self.engine)
            if job.params.score_prompt:
                ids = c.sample.prompt_ids
                if tuple(ids) not in scored:
                    scored[tuple(ids)] = score_prompt(self.engine, ids, c.sample.config.logprobs,
                                                      self.chars, self._widths(ids))
                c.prompt_entries = scored[tuple(ids)]
        if job.params.score_prompt:  # a stream sends the echoed prompt with its entries first
            job.sink([Event(c.index, self.tokenizer.decode(c.sample.prompt_ids), None,
                            c.prompt_entries) for c in job.choices])

    def _step(self, active: list[Choice]) -> list[Choice]:
        """Drop finished sequences, decode one token for the rest; returns those still running."""
        now = self.clock()
        events: dict[Job, list[Event]] = {}
        running = []
        for c in active:
            if c.job.cancelled:
                continue
            if now >= c.job.deadline and not c.sample.finished:  # out of time: like max_tokens
                c.unsent += c.sample.end("length")
            if c.sample.finished:
                events.setdefault(c.job, []).append(c.take())
                continue
            running.append(c)
        if running:
            self._decode(running, events)
            running = [c for c in running if not c.job.cancelled]
            self.steps += 1
            self.tokens += len(running)
        for job, evs in events.items():
            if not job.cancelled:
                job.sink(evs)
        for c in active:
            if c.sample.finished or c.job.cancelled:
                c.sample.release()  # out of the batch: free its cache now
        still = [c for c in running if not c.sample.finished]
        finished_jobs = {c.job for c in running if c.sample.finished} - {c.job for c in still}
        for job in finished_jobs:
            if job.admitted_at is not None:
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (now - job.admitted_at)
        return still

    def _decode(self, running: list[Choice], events: dict[Job, list[Event]]) -> None:
        """One token for every running choice; a choice whose step or sampling fails fails its
        own request, the others go on."""
        for c, row in zip(running, self._forward(running), strict=True):
            if c.job.cancelled:  # another choice of its request failed in this step
                continue
            try:
                if isinstance(row, BaseException):
                    raise row
                c.unsent += c.sample.advance(row)
            except Exception as e:  # noqa: BLE001 - fails this request, not the others
                log.error("decoding a sequence failed: %r", e)
                self._fail(c.job, e)
                continue
            event = c.take()
            if event.text or event.finish:
                events.setdefault(c.job, []).append(event)

    def _forward(self, running: list[Choice]) -> list[torch.Tensor | Exception]:
        """Next-token logits (V,) of every running choice, or the error its own step raised.

        The batch runs in one step. Should that fail, each sequence is stepped alone (from its
        window, its cache dropped) to find out which one fails: only its request gets the error.
        """
        states = [c.sample.state for c in running]
        try:
            return list(self.engine.step(states).float().cpu())
        except Exception:  # noqa: BLE001 - narrowed down below
            log.exception("a batched decode step failed; stepping its sequences one by one")
        rows: list[torch.Tensor | Exception] = []
        for state in states:
            self.engine.release(state)
            try:
                rows.append(self.engine.step([state]).float().cpu()[0])
            except Exception as e:  # noqa: BLE001 - reported to that request
                rows.append(e)
        return rows

    def _widths(self, ids: list[int]) -> list[int]:
        """How many characters each token of ``ids`` completes."""
        decoder = self.tokenizer.text_decoder()
        return [len(decoder.push(i)) for i in ids]

    @staticmethod
    def _fail(job: Job, error: BaseException) -> None:
        if not job.cancelled:
            job.sink(error)
        job.cancelled = True
