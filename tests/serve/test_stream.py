"""The worker -> request bridge and the two answers of a completion, without a server or a model.

A ``Delivery`` gets what the worker would send (lists of ``Event``s, or an exception) straight
into its queue; the job and its choices are stand-ins with the fields the delivery reads.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("fastapi")

from starlette.requests import Request  # noqa: E402

from tinygpt.logprobs import TokenLogprob  # noqa: E402
from tinygpt.serve import stream  # noqa: E402
from tinygpt.serve.protocol import ApiError, Completion  # noqa: E402
from tinygpt.serve.scheduler import Event, SchedulerClosed, WorkerFailed  # noqa: E402
from tinygpt.serve.stream import Delivery, Mailbox, merge, next_item  # noqa: E402

META = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny"}


class FakeLoop:
    def __init__(self, closed: bool = False) -> None:
        self.callbacks: list = []
        self.closed = closed

    def call_soon_threadsafe(self, callback) -> None:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.callbacks.append(callback)


def test_the_mailbox_wakes_the_loop_once_per_batch_of_items():
    loop = FakeLoop()
    box = Mailbox(loop)
    a, b = asyncio.Queue(), asyncio.Queue()
    put_a, put_b = box.sink(a), box.sink(b)
    put_a(1)
    put_b("x")
    put_a(2)
    assert len(loop.callbacks) == 1  # one wake-up for three items
    assert a.empty() and b.empty()
    loop.callbacks.pop()()
    assert stream.drain(a) == [1, 2] and stream.drain(b) == ["x"]
    put_b("y")  # the next item wakes the loop again
    assert len(loop.callbacks) == 1
    loop.callbacks.pop()()
    assert stream.drain(b) == ["y"]


def test_the_mailbox_outlives_its_loop():
    box = Mailbox(FakeLoop(closed=True))
    box.sink(asyncio.Queue())("late")  # the worker finishing after shutdown: no error


@dataclass
class FakeScheduler:
    alive: bool = True
    failure: BaseException | None = None


def test_next_item_returns_what_the_worker_sent():
    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait("item")
        return await next_item(queue, FakeScheduler())

    assert asyncio.run(main()) == "item"


@pytest.mark.parametrize("failure, kind", [(None, SchedulerClosed),
                                           (WorkerFailed(OSError()), WorkerFailed)])
def test_next_item_notices_a_dead_worker(monkeypatch, failure, kind):
    monkeypatch.setattr(stream, "WATCHDOG_SECONDS", 0.01)

    async def main():
        return await next_item(asyncio.Queue(), FakeScheduler(alive=False, failure=failure))

    assert isinstance(asyncio.run(main()), kind)


def lp(token: str, chars: int = 1) -> TokenLogprob:
    return TokenLogprob(token, -0.5, {token: -0.5}, chars)


def test_merge_joins_the_text_and_logprobs_of_one_choice():
    first = Event(0, "ab", None, [lp("a"), lp("b")])
    then = Event(0, "c", "stop", [lp("c")])
    assert merge(None, first) == first
    both = merge(first, then)
    assert (both.index, both.text, both.finish) == (0, "abc", "stop")
    assert [e.token for e in both.logprobs] == ["a", "b", "c"]
    assert merge(Event(1, "x"), Event(1, "y")) == Event(1, "xy", None, None)


@dataclass
class FakeChoice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    entries: list = field(default_factory=list)
    prompt_entries: list | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.text)


class FakeJob:
    def __init__(self, n_choices: int) -> None:
        self.choices = [FakeChoice(i) for i in range(n_choices)]
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, index: int, text: str, reason: str = "length") -> None:
        self.choices[index].text, self.choices[index].finish_reason = text, reason


def delivery(prompts: list[str], n: int = 1, echo: bool = False, include_usage: bool = False,
             items: tuple = (), logprobs: int | None = None) -> Delivery:
    spec = Completion(prompts, [[0] * len(p) for p in prompts], n, None, True, include_usage,
                      echo, logprobs)
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    return Delivery(FakeJob(len(prompts) * n), spec, queue, META, FakeScheduler())


def events_of(d: Delivery) -> list:
    async def main():
        return [chunk async for chunk in d.events()]

    out = []
    for chunk in asyncio.run(main()):
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        data = chunk[len("data: "):-2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_events_merge_what_piled_up_and_end_with_done():
    d = delivery(["To", "Be"], items=([Event(0, "a"), Event(1, "x")], [Event(0, "b", "length")],
                                      [Event(1, "y", "stop")]))
    out = events_of(d)
    assert out[-1] == "[DONE]"
    chunks = [(c["choices"][0]["index"], c["choices"][0]["text"],
               c["choices"][0]["finish_reason"]) for c in out[:-1]]
    assert chunks == [(0, "ab", "length"), (1, "xy", "stop")]  # one chunk per choice per wake
    assert all(c["id"] == "cmpl-1" and c["model"] == "tiny" for c in out[:-1])
    assert d.job.cancelled  # always, so that a client who left stops the decoding


def test_events_echo_the_prompt_first_and_end_with_usage():
    d = delivery(["To"], n=2, echo=True, include_usage=True,
                 items=([Event(0, "a", "length"), Event(1, "b", "length")],))
    d.job.finish(0, "a")
    d.job.finish(1, "b")
    out = events_of(d)
    texts = [c["choices"][0]["text"] for c in out[:4]]
    assert texts == ["To", "To", "a", "b"]
    assert out[4]["choices"] == []
    assert out[4]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert out[5] == "[DONE]"


def test_streamed_logprobs_count_offsets_from_the_prompt():
    d = delivery(["To"], logprobs=1, items=([Event(0, "a", None, [lp("a")])],))

    async def main():
        events = d.events()
        first = await anext(events)
        d.queue.put_nowait([Event(0, "bc", "length", [lp("b"), lp("c")])])  # the next step
        return [first, *[chunk async for chunk in events]]

    out = [json.loads(c[len("data: "):]) for c in asyncio.run(main())[:2]]
    first, second = (c["choices"][0]["logprobs"] for c in out)
    assert first == {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5}],
                     "text_offset": [2]}
    assert second["tokens"] == ["b", "c"] and second["text_offset"] == [3, 4]


def test_a_worker_failure_ends_the_stream_with_an_error_event():
    d = delivery(["To"], items=([Event(0, "a")], WorkerFailed(RuntimeError("boom"))))
    out = events_of(d)
    assert out[0]["choices"][0]["text"] == "a"
    assert out[1]["error"]["code"] == "worker_failed"
    assert len(out) == 2  # no [DONE]: the completion did not finish


def never_leaves() -> Request:
    async def receive():
        await asyncio.Event().wait()

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_the_json_answer_has_every_choice():
    d = delivery(["To", "Be"], echo=True, items=([Event(0, "ab", "length")],
                                                 [Event(1, "c", "stop")]))
    d.job.finish(0, "ab")
    d.job.finish(1, "c", "stop")
    response = asyncio.run(d.response(never_leaves()))
    assert response.status_code == 200
    body = json.loads(response.body)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Toab", "length"), (1, "Bec", "stop")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert body["id"] == "cmpl-1"


def test_the_json_answer_keeps_the_logprobs_of_the_text_sent():
    d = delivery(["To"], logprobs=0, items=([Event(0, "ab", "stop")],))
    d.job.finish(0, "ab", "stop")
    d.job.choices[0].entries = [lp("a"), lp("b"), lp("c")]  # "c" began the stop string: cut
    body = json.loads(asyncio.run(d.response(never_leaves())).body)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["a", "b"] and logprobs["text_offset"] == [2, 3]


def test_a_failure_before_the_end_is_an_error():
    d = delivery(["To"], items=([Event(0, "a")], RuntimeError("bug")))
    with pytest.raises(ApiError) as e:
        asyncio.run(d.response(never_leaves()))
    assert (e.value.status, e.value.code) == (500, "internal_error")


def test_a_client_who_leaves_stops_the_job():
    d = delivery(["To"])  # the worker never answers

    async def gone():
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, gone)
    assert asyncio.run(d.response(request)).status_code == 499
    assert d.job.cancelled
