"""The scheduler without HTTP: a tiny GPT, a character tokenizer, a fake clock, rounds run by hand.

``Scheduler(start=False)`` runs no thread: each ``run_once`` is one round of the worker
(admission, then one decode step), so every test says exactly what happened at which step.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tinygpt.engine import Engine
from tinygpt.models import GPT, GPTConfig
from tinygpt.sampling import GenerationConfig, SamplingConfig
from tinygpt.sequence import generate_text
from tinygpt.serve.scheduler import (
    Event,
    GenerationParams,
    QueueFull,
    Scheduler,
    SchedulerClosed,
    WorkerFailed,
)
from tinygpt.tokenizer import CharTokenizer

TOK = CharTokenizer("abcdefghijk")
SAMPLING = SamplingConfig(temperature=1.0)


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16,
                          dropout=0.0))
    with torch.no_grad():  # sharper distributions than the init's near-uniform ones
        model.lm_head.weight.mul_(30)
    return model.eval()


class Clock:
    """A clock that moves only when told: one second per engine step here."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingEngine(Engine):
    """Records the batch size of every step; each step moves ``clock`` on by one second and
    fails when a sequence starts with the ``poison`` token twice."""

    def __init__(self, model, clock: Clock | None = None, poison: int | None = None) -> None:
        super().__init__(model)
        self.clock, self.poison = clock, poison
        self.batch_sizes: list[int] = []

    def step(self, states):
        self.batch_sizes.append(len(states))
        if self.clock is not None:
            self.clock.now += 1
        if self.poison is not None and any(s.tokens[:2] == [self.poison] * 2 for s in states):
            raise RuntimeError("injected forward failure")
        return super().step(states)


class Sink:
    """What the scheduler delivered to one request: events, or the error."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.error: BaseException | None = None

    def __call__(self, item) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.events.extend(item)

    def text(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if e.index == index)

    def finish(self, index: int = 0) -> list[str]:
        return [e.finish for e in self.events if e.index == index and e.finish]


def params(max_tokens=12, seed=0, stop=(), logprobs=None, **sampling) -> GenerationParams:
    sampling = SamplingConfig(**sampling) if sampling else SAMPLING
    return GenerationParams(GenerationConfig(max_tokens, sampling, seed, stop, logprobs))


def submit(sched: Scheduler, prompt="abc", n=1, timeout=100.0, **kw) -> tuple[object, Sink]:
    sink = Sink()
    return sched.submit([TOK.encode(prompt)], n, params(**kw), timeout, sink), sink


def run_until_idle(sched: Scheduler, limit: int = 200) -> int:
    rounds = 0
    while sched._active or sched._pending:
        sched.run_once()
        rounds += 1
        assert rounds < limit
    return rounds


def test_requests_are_decoded_together_and_give_the_library_text(gpt):
    engine = CountingEngine(gpt)
    sched = Scheduler(engine, TOK, start=False)
    jobs = [submit(sched, "abc", n=2, seed=5, max_tokens=12),
            submit(sched, "ba", seed=9, max_tokens=6),
            submit(sched, "k", seed=1, max_tokens=9, top_k=3)]
    assert sched.stats()["queued_requests"] == 3
    run_until_idle(sched)
    # all four choices in one batch; the short ones leave it as they finish
    assert engine.batch_sizes == [4] * 6 + [3] * 3 + [2] * 3
    assert sched.stats() == {"active_sequences": 0, "queued_requests": 0, "steps": 12,
                             "tokens": 4 * 6 + 3 * 3 + 2 * 3}
    (_, a), (_, b), (_, c) = jobs
    # the same texts as the library's, with the seeds seed + i: one loop for both
    assert [a.text(0), a.text(1)] == generate_text(gpt, TOK, "abc", 12, SAMPLING, seed=5,
                                                   num_samples=2)
    assert b.text() == generate_text(gpt, TOK, "ba", 6, SAMPLING, seed=9)[0]
    assert c.text() == generate_text(gpt, TOK, "k", 9, SamplingConfig(top_k=3), seed=1)[0]
    for sink, n in ((a, 2), (b, 1), (c, 1)):
        assert all(sink.finish(i) == ["length"] for i in range(n)) and sink.error is None


def test_a_stop_string_across_tokens_cuts_the_text_and_is_never_sent(gpt):
    full = generate_text(gpt, TOK, "abc", 20, SAMPLING, seed=3)[0]
    stop = full[6:9]  # three tokens long
    sched = Scheduler(CountingEngine(gpt), TOK, start=False)
    job, sink = submit(sched, seed=3, max_tokens=20, stop=(stop,))
    run_until_idle(sched)
    cut = full.index(stop)
    assert sink.text() == full[:cut] and sink.finish() == ["stop"]
    assert job.choices[0].num_tokens == cut + len(stop)  # it stopped at the stop string's end
    sent = ""
    for e in sink.events:  # no event ever carried a character of the stop string
        sent += e.text
        assert full[:cut].startswith(sent)


def test_logprobs_are_the_models_own_and_follow_the_sent_text(gpt):
    sched = Scheduler(CountingEngine(gpt), TOK, start=False)
    job, sink = submit(sched, "ab", seed=2, max_tokens=5, logprobs=2)
    run_until_idle(sched)
    text = sink.text()
    entries = [x for e in sink.events for x in e.logprobs]
    assert [x.token for x in entries] == list(text) and len(text) == 5
    with torch.no_grad():
        logits, _ = gpt(torch.tensor([TOK.encode("ab" + text)]))
    logp = torch.log_softmax(logits[0], dim=-1)
    for pos, x in enumerate(entries):
        expected = logp[1 + pos, TOK.encode(x.token)[0]].item()
        assert x.logprob == pytest.approx(expected, abs=1e-5)
        assert x.token in x.top and 2 <= len(x.top) <= 3
    for e in sink.events:  # each event carries the entries of its own characters
        assert len(e.logprobs) == len(e.text)


def test_the_deadline_cuts_a_running_request_after_its_steps(gpt):
    clock = Clock()
    engine = CountingEngine(gpt, clock)
    sched = Scheduler(engine, TOK, start=False, clock=clock)
    job, sink = submit(sched, max_tokens=1000, timeout=3)
    run_until_idle(sched)
    assert job.choices[0].num_tokens == 3 and len(engine.batch_sizes) == 3
    assert sink.finish() == ["length"] and len(sink.text()) == 3


def test_a_request_whose_time_runs_out_in_the_queue_ends_empty(gpt):
    clock = Clock()
    engine = CountingEngine(gpt, clock)
    sched = Scheduler(engine, TOK, max_batch=1, start=False, clock=clock)
    _, first = submit(sched, max_tokens=5)
    sched.run_once()  # the first takes the batch
    _, late = submit(sched, max_tokens=5, timeout=2, logprobs=0)
    run_until_idle(sched)
    assert first.finish() == ["length"] and len(first.text()) == 5
    assert late.events == [Event(0, "", "length", [])]
    assert engine.batch_sizes == [1] * 5  # the late request never ran


def test_cancelling_a_request_takes_it_out_of_the_batch(gpt):
    engine = CountingEngine(gpt)
    sched = Scheduler(engine, TOK, start=False)
    gone, gone_sink = submit(sched, max_tokens=50)
    stays, stays_sink = submit(sched, max_tokens=6)
    sched.run_once()
    sched.run_once()
    delivered = len(gone_sink.events)
    gone.cancel()
    run_until_idle(sched)
    assert engine.batch_sizes == [2, 2] + [1] * 4
    assert len(gone_sink.events) == delivered and gone_sink.error is None  # nothing more
    assert gone.choices[0].sample.state is None  # its cache was freed
    assert stays_sink.finish() == ["length"] and len(stays_sink.text()) == 6


def test_a_failing_sequence_fails_only_its_own_request(gpt):
    poison = TOK.encode("k")[0]
    engine = CountingEngine(gpt, poison=poison)
    sched = Scheduler(engine, TOK, start=False)
    _, honest = submit(sched, "abc", seed=4, max_tokens=8)
    _, victim = submit(sched, "kk", n=2, max_tokens=8)
    _, other = submit(sched, "ba", seed=6, max_tokens=8)
    run_until_idle(sched)
    assert isinstance(victim.error, RuntimeError) and victim.events == []
    # the others were stepped again alone, from their windows: the text they get alone
    assert honest.text() == generate_text(gpt, TOK, "abc", 8, SAMPLING, seed=4)[0]
    assert other.text() == generate_text(gpt, TOK, "ba", 8, SAMPLING, seed=6)[0]
    assert engine.batch_sizes[:5] == [4, 1, 1, 1, 1]  # the batch, then each alone
    assert engine.batch_sizes[5:] == [2] * 7


def test_a_failing_sampling_fails_only_its_own_request(gpt, monkeypatch):
    import tinygpt.sequence as sequence_module

    real = sequence_module.sample_next

    def sample_or_fail(logits, sampling, generator=None):
        if sampling.top_k == 3:
            raise RuntimeError("injected sampling failure")
        return real(logits, sampling, generator)

    monkeypatch.setattr(sequence_module, "sample_next", sample_or_fail)
    sched = Scheduler(CountingEngine(gpt), TOK, start=False)
    _, victim = submit(sched, max_tokens=4, top_k=3)
    _, honest = submit(sched, max_tokens=4, seed=8)
    run_until_idle(sched)
    assert str(victim.error) == "injected sampling failure"
    assert honest.text() == generate_text(gpt, TOK, "abc", 4, SAMPLING, seed=8)[0]


def test_a_full_queue_refuses_with_retry_after(gpt):
    sched = Scheduler(CountingEngine(gpt), TOK, max_batch=1, max_queue=1, start=False)
    submit(sched)
    sched.run_once()  # running: the batch is full
    submit(sched)  # waits in the queue
    with pytest.raises(QueueFull) as e:
        submit(sched)
    assert e.value.retry_after >= 1
    assert sched.stats()["active_sequences"] == 1 and sched.stats()["queued_requests"] == 1
    with pytest.raises(ValueError, match="at most 1 choices"):
        submit(sched, n=2)


def test_closing_fails_what_waits_and_refuses_more(gpt):
    sched = Scheduler(CountingEngine(gpt), TOK, start=False)
    _, sink = submit(sched)
    sched.close()
    assert isinstance(sink.error, SchedulerClosed) and not sched.alive
    with pytest.raises(SchedulerClosed):
        submit(sched)


def test_the_worker_thread_delivers_and_a_dead_worker_is_reported(gpt):
    gate = threading.Event()

    class Gated(CountingEngine):
        def step(self, states):
            gate.wait(20)
            return super().step(states)

    sched = Scheduler(Gated(gpt), TOK)
    done = threading.Event()
    results = Sink()

    def sink(item):
        results(item)
        if isinstance(item, BaseException) or any(e.finish for e in item):
            done.set()

    sched.submit([TOK.encode("abc")], 1, params(max_tokens=5, seed=1), 100, sink)
    gate.set()
    assert done.wait(20)
    assert results.text() == generate_text(gpt, TOK, "abc", 5, SAMPLING, seed=1)[0]
    # a bug outside any request stops the worker: everyone waiting is told, new ones refused
    gate.clear()
    done.clear()
    results = Sink()
    sched.submit([TOK.encode("abc")], 1, params(max_tokens=50), 100, sink)

    def crash(active):
        raise RuntimeError("injected worker bug")

    sched._step = crash
    gate.set()
    assert done.wait(20)
    assert isinstance(results.error, WorkerFailed) and sched.failure is results.error
    sched._thread.join(20)
    assert not sched.alive
    with pytest.raises(WorkerFailed):
        submit(sched)
