"""From the worker thread to the client: the thread bridge and the two ways a completion is sent.

The model runs in the scheduler's worker thread; a request waits on its own ``asyncio.Queue``,
which the worker fills through a ``Mailbox`` (so the event loop stays free while tokens are
computed). ``next_item`` waits with a watchdog: should the worker die without a word, the
request learns it. A submitted completion (a ``Delivery``) then goes out as one JSON body
(``Delivery.response``) or as server-sent events (``Delivery.events``). ``Delivery`` gives them the
Completions API's shape; the chat route's ``ChatDelivery`` (``tinygpt.serve.chat``) gives the
same choices the chat shape.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tinygpt.serve.errors import server_error
from tinygpt.serve.logprobs import as_openai, entries_within
from tinygpt.serve.protocol import Completion
from tinygpt.serve.scheduler import Event, Job, Scheduler, SchedulerClosed

WATCHDOG_SECONDS = 1.0  # how often a waiting request checks that the worker is still alive


class Mailbox:
    """Carries items from the worker thread to requests' asyncio queues.

    Waking the event loop costs a system call; one decode step produces items for many requests,
    so they are collected and the loop is woken once to deliver them all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.scheduled = False

    def sink(self, queue: asyncio.Queue) -> Callable[[object], None]:
        """A function the worker thread calls with each item for ``queue``."""
        def put(item: object) -> None:  # runs in the worker thread
            with self.lock:
                self.items.append((queue, item))
                if self.scheduled:
                    return
                self.scheduled = True
            with suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
                self.loop.call_soon_threadsafe(self.deliver)

        return put

    def deliver(self) -> None:
        """Put every collected item into its queue (runs on the event loop)."""
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


async def next_item(queue: asyncio.Queue, scheduler: Scheduler) -> object:
    """The next item from the worker; the worker's failure if it died without a word."""
    getter = asyncio.ensure_future(queue.get())  # one getter throughout: no item is lost
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=WATCHDOG_SECONDS)
            if done:
                return getter.result()
            if not scheduler.alive and queue.empty():
                return scheduler.failure or SchedulerClosed("the server is shutting down")
    finally:
        getter.cancel()  # no-op once it has its item


def drain(queue: asyncio.Queue) -> list:
    """Every item already waiting in ``queue``, without waiting for more."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def merge(first: Event | None, then: Event) -> Event:
    """One event for two consecutive events of the same choice."""
    if first is None:
        return then
    logprobs = None if then.logprobs is None else (first.logprobs or []) + then.logprobs
    return Event(then.index, first.text + then.text, then.finish or first.finish, logprobs)


def sse(obj: object) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def wait_disconnect(request: Request) -> None:
    """Return when the client has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Delivery:
    """A submitted completion on its way to the client: its job, the checked request, the queue
    the worker fills, and the fields every answer repeats (``id``, ``created``, ``model``)."""

    job: Job
    spec: Completion
    queue: asyncio.Queue
    meta: dict
    scheduler: Scheduler
    offset: list[int] = field(init=False, default_factory=list)  # see ``opening``

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.spec.prompt_ids)
        completion = sum(c.num_tokens for c in self.job.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def prompt_of(self, index: int) -> str:
        """The prompt of choice ``index`` (choice ``i * n + j`` is prompt ``i``'s)."""
        return self.spec.prompts[index // self.spec.n]

    async def collect(self) -> BaseException | None:
        """Wait until every choice has finished; returns the error if generation failed."""
        left = len(self.job.choices)
        while left:
            item = await next_item(self.queue, self.scheduler)
            if isinstance(item, BaseException):
                return item
            left -= sum(1 for event in item if event.finish)
        return None

    async def response(self, request: Request) -> Response:
        """The whole completion as one JSON body, once every choice has finished.

        If the client leaves first, decoding stops and the (unsent) answer is a 499.
        """
        collect = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left (or the server is stopping): stop decoding
                collect.cancel()
                self.job.cancel()
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)
        error = collect.result()
        if error is not None:
            raise server_error(error)
        return JSONResponse(self.body())

    def body(self) -> dict:
        """The JSON answer, once every choice has finished."""
        return {**self.meta, "choices": [self.choice_body(c) for c in self.job.choices],
                "usage": self.usage()}

    def choice_body(self, choice) -> dict:
        """One finished choice of the JSON answer (the echoed prompt first, if asked)."""
        spec = self.spec
        prompt = self.prompt_of(choice.index)
        logprobs = None
        if spec.logprobs is not None:
            entries = (choice.prompt_entries or []) + entries_within(choice.entries,
                                                                      len(choice.text))
            logprobs = as_openai(entries, 0 if spec.echo else len(prompt))
        return {"text": (prompt if spec.echo else "") + choice.text, "index": choice.index,
                "logprobs": logprobs, "finish_reason": choice.finish_reason}

    async def next_events(self) -> tuple[list[Event], BaseException | None]:
        """The new text of each choice, merged from what piled up since the last call, and the
        worker's error if one came."""
        merged: dict[int, Event] = {}
        for item in [await next_item(self.queue, self.scheduler), *drain(self.queue)]:
            if isinstance(item, BaseException):
                return list(merged.values()), item
            for event in item:
                merged[event.index] = merge(merged.get(event.index), event)
        return list(merged.values()), None

    def opening(self) -> list[str]:
        """The events sent before the first generated text: an echoed prompt (without logprobs;
        with them it comes from the worker, which scores it)."""
        spec = self.spec
        # where each choice's next character is, counted from the start of its prompt
        self.offset = [0 if spec.echo else len(self.prompt_of(c.index)) for c in self.job.choices]
        if not spec.echo or spec.logprobs is not None:
            return []
        return [self.chunk(Event(c.index, self.prompt_of(c.index))) for c in self.job.choices]

    def chunk(self, event: Event) -> str:
        """The event of a choice's new text; with ``logprobs``, the entries of its characters."""
        logprobs = None
        if event.logprobs is not None:
            logprobs = as_openai(event.logprobs, self.offset[event.index])
            self.offset[event.index] += sum(e.chars for e in event.logprobs)
        choice = {"text": event.text, "index": event.index, "logprobs": logprobs,
                  "finish_reason": event.finish}
        return sse({**self.meta, "choices": [choice]})

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the ``opening``, one ``data: {chunk}`` per choice with new text,
        the usage if asked, then ``[DONE]``."""
        try:
            for text in self.opening():
                yield text
            left = len(self.job.choices)
            while left:
                events, error = await self.next_events()
                for event in events:
                    yield self.chunk(event)
                    left -= event.finish is not None
                if error is not None:
                    yield sse(server_error(error).body())
                    return
            if self.spec.include_usage:
                yield sse({**self.meta, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # no-op when finished; stops decoding when the client went away
