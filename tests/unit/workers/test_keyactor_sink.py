"""A stream handed a sink, or an opener: the actor writes to the client directly; a
stalled client."""

from __future__ import annotations

import gc
import math
import weakref

import httpx
import pytest
import trio
from trio.testing import MockClock

from observability.metrics import Metrics
from tests.unit.workers.helpers import (
    FakeUpstream,
    ScriptedStream,
    answer,
    collect,
    delta,
    error_json,
    failures,
    make_job,
    make_key,
    running_actor,
    sse,
    stream_response,
)
from workers.health import HealthState
from workers.job import Event, Failed, Job, Sink, Started

HELLO = sse(delta("Hello"))
WORLD = sse(delta(" world"))
DONE = sse("[DONE]")


class RecordingSink:
    """A client that reads everything, or (``stall_after``) stops reading."""

    def __init__(self, stall_after: int | None = None) -> None:
        self.received: list[bytes] = []
        self.stall_after = stall_after

    async def send(self, data: bytes) -> None:
        if self.stall_after is not None and len(self.received) >= self.stall_after:
            await trio.sleep(math.inf)
        self.received.append(data)
        await trio.lowlevel.checkpoint()


class RecordingOpener:
    """The client's side's opener: notes what it was started with, and what the reply
    channel held at that moment."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Event]) -> None:
        self.receive = receive
        self.calls: list[Started] = []
        self.queued_at_open: int | None = None
        self.sink = RecordingSink()

    async def __call__(self, started: Started) -> Sink:
        self.calls.append(started)
        self.queued_at_open = self.receive.statistics().current_buffer_used
        return self.sink


def _streaming(*parts: bytes | float) -> FakeUpstream:
    async def respond(request: httpx.Request) -> httpx.Response:
        return stream_response(ScriptedStream(parts))

    return FakeUpstream(respond)


async def test_with_a_sink_every_chunk_goes_straight_to_it(autojump_clock: MockClock) -> None:
    upstream = _streaming(HELLO, 1.0, WORLD, 1.0, DONE)
    async with running_actor(make_key(), upstream) as actor:
        job, receive = make_job(stream=True)
        sink = RecordingSink()
        job.sink = sink
        assert actor.submit_nowait(job)
        events = await collect(receive)
    assert len(events) == 1  # the channel carries only Started, then closes
    assert isinstance(events[0], Started)
    assert b"".join(sink.received) == HELLO + WORLD + DONE
    assert len(sink.received) == 3  # chunks that arrived apart leave apart
    assert job.counter.done
    assert actor.health.state(trio.current_time()) is HealthState.HEALTHY


async def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout_without_blaming_the_key(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    upstream = _streaming(HELLO, 1.0, WORLD, 1.0, DONE)
    async with running_actor(make_key(), upstream, metrics=metrics,
                             idle_timeout_s=10.0) as actor:
        job, receive = make_job(stream=True)
        sink = RecordingSink(stall_after=1)
        job.sink = sink
        assert actor.submit_nowait(job)
        await collect(receive)
        ended = trio.current_time()
        assert 11.0 <= ended <= 12.0  # blocked on the client from 1 s, then 10 s (+ 1 s)
        assert sink.received == [HELLO]
        assert failures(metrics, "timeout") == 0
        assert actor.health.state(ended) is HealthState.HEALTHY


async def test_with_an_opener_the_actor_starts_the_stream_before_telling_the_request_task(
    autojump_clock: MockClock,
) -> None:
    upstream = _streaming(HELLO, 1.0, WORLD, 1.0, DONE)
    async with running_actor(make_key("k1"), upstream) as actor:
        job, receive = make_job(stream=True)
        opener = RecordingOpener(receive)
        job.opener = opener
        assert actor.submit_nowait(job)
        events = await collect(receive)
    assert opener.calls == [Started(200, "text/event-stream", "k1")]
    assert opener.queued_at_open == 0  # started before Started was queued for the task
    assert job.sink is opener.sink
    assert events == [Started(200, "text/event-stream", "k1")]  # no byte on the channel
    assert b"".join(opener.sink.received) == HELLO + WORLD + DONE
    assert job.counter.done


@pytest.mark.parametrize("status", [400, 429, 500])
async def test_an_opener_is_not_used_when_the_upstream_refuses(
    status: int, autojump_clock: MockClock
) -> None:
    # A 400 is relayed whole; a 429 or 500 may fail over to another key: neither starts
    # a stream.
    upstream = FakeUpstream(answer(status, error_json("invalid_request_error")))
    async with running_actor(make_key(), upstream) as actor:
        job, receive = make_job(stream=True)
        opener = RecordingOpener(receive)
        job.opener = opener
        assert actor.submit_nowait(job)
        events = await collect(receive)
    assert opener.calls == []
    assert job.sink is None
    assert isinstance(events[0], Started if status == 400 else Failed)


async def test_an_opener_is_not_used_for_a_whole_body(autojump_clock: MockClock) -> None:
    async with running_actor(make_key(), FakeUpstream(answer())) as actor:
        job, receive = make_job()
        opener = RecordingOpener(receive)
        job.opener = opener
        assert actor.submit_nowait(job)
        events = await collect(receive)
    assert opener.calls == []
    assert isinstance(events[0], Started)
    assert len(events) == 2


async def test_a_job_aborted_while_the_upstream_answers_is_not_started(
    autojump_clock: MockClock,
) -> None:
    jobs: list[Job] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        jobs[0].abort()  # the client leaves as the upstream's head comes in
        return stream_response(ScriptedStream((HELLO, DONE)))

    async with running_actor(make_key(), FakeUpstream(respond)) as actor:
        job, receive = make_job(stream=True)
        jobs.append(job)
        opener = RecordingOpener(receive)
        job.opener = opener
        assert actor.submit_nowait(job)
        await collect(receive)
    assert opener.calls == []
    assert job.sink is None


async def test_an_idle_worker_holds_nothing_of_the_job_it_served(
    autojump_clock: MockClock,
) -> None:
    async with running_actor(make_key(), _streaming(HELLO, DONE)) as actor:
        job, receive = make_job(stream=True)
        opener = RecordingOpener(receive)
        job.opener = opener
        served = weakref.ref(job)
        assert actor.submit_nowait(job)
        await collect(receive)
        del job, opener, receive
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        # Freed while the actor runs on: its worker waits for the next job holding none.
        assert served() is None
