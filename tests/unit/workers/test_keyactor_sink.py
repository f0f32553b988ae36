"""A stream handed a sink: the actor writes to the client directly; a stalled client."""

from __future__ import annotations

import math

import httpx
import trio
from trio.testing import MockClock

from observability.metrics import Metrics
from tests.unit.workers.helpers import (
    FakeUpstream,
    ScriptedStream,
    collect,
    delta,
    failures,
    make_job,
    make_key,
    running_actor,
    sse,
    stream_response,
)
from workers.health import HealthState
from workers.job import Started

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
