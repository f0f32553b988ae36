"""Streaming relay through a KeyActor: bytes forwarded unchanged, counting, cut-offs, abort."""

from __future__ import annotations

import httpx
import orjson
import trio
from trio.testing import MockClock

from observability.metrics import Metrics
from tests.unit.workers.helpers import (
    FakeUpstream,
    ScriptedStream,
    answer,
    body_of,
    collect,
    delta,
    failures,
    make_job,
    make_key,
    run_job,
    running_actor,
    sse,
    started,
    stream_response,
    usage_chunk,
)
from workers.health import HealthState
from workers.job import Event, Started
from workers.tokens import StreamTokenCounter, Usage, estimate_text_tokens

ROLE = sse({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-test",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None}]})
HELLO = sse(delta("Hello"))
WORLD = sse(delta(" wörld"))
FINISH = sse({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-test",
              "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = sse(usage_chunk(12, 3))
DONE = sse("[DONE]")


def _streaming(*parts: bytes | float) -> tuple[FakeUpstream, list[ScriptedStream]]:
    """An upstream answering every request with a new stream of ``parts``."""
    streams: list[ScriptedStream] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        streams.append(ScriptedStream(parts))
        return stream_response(streams[-1])

    return FakeUpstream(respond), streams


def _error_event(body: bytes) -> dict[str, object]:
    """The last SSE event of ``body``, which must be an OpenAI-shaped error event."""
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: "), body
    assert body.endswith(b"\n\n")
    error = orjson.loads(last[6:])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


async def test_stream_is_forwarded_byte_for_byte_without_the_usage_chunk(
    autojump_clock: MockClock,
) -> None:
    whole = ROLE + HELLO + WORLD + FINISH + USAGE + DONE
    # Network chunks that cut events in half and carry several events at once.
    cut = [whole[:7], whole[7:len(ROLE) + 20], whole[len(ROLE) + 20:-30], whole[-30:]]
    upstream, _ = _streaming(*cut)
    async with running_actor(make_key(tpm=6000), upstream) as actor:
        job, receive = make_job(stream=True, prompt_estimate=100, max_output=100)
        events = await run_job(actor, job, receive)
        assert started(events) == Started(200, "text/event-stream", "k1")
        assert body_of(events) == ROLE + HELLO + WORLD + FINISH + DONE
        # airgate asked for the usage chunk on the client's behalf ...
        assert upstream.seen[0].body["stream_options"] == {"include_usage": True}
        assert "stream_options" not in job.body
        # ... and the upstream's usage is what settles the tpm reservation.
        assert job.known_usage == Usage(prompt_tokens=12, cached_tokens=0, completion_tokens=3)
        assert actor.tpm is not None
        assert actor.tpm.level(trio.current_time()) == 6000 - 15
        assert job.first_byte_at == 0.0
        assert actor.health.state(0.0) is HealthState.HEALTHY


async def test_stream_keeps_the_usage_chunk_when_the_client_asked_for_it(
    autojump_clock: MockClock,
) -> None:
    whole = ROLE + HELLO + WORLD + FINISH + USAGE + DONE
    upstream, _ = _streaming(whole[:50], whole[50:])
    async with running_actor(make_key(), upstream) as actor:
        events = await run_job(actor, *make_job(stream=True, include_usage=True))
        assert body_of(events) == whole
    assert upstream.seen[0].body["stream_options"] == {"include_usage": True}


async def test_stream_without_upstream_usage_is_counted(autojump_clock: MockClock) -> None:
    upstream, _ = _streaming(ROLE, HELLO, WORLD, FINISH, DONE)
    async with running_actor(make_key(tpm=6000), upstream) as actor:
        job, receive = make_job(stream=True, prompt_estimate=100, max_output=100)
        events = await run_job(actor, job, receive)
        assert body_of(events) == ROLE + HELLO + WORLD + FINISH + DONE
        assert job.known_usage is None
        # Two text pieces; the heuristic over "Hello wörld": ceil(10 ASCII / 4) + 1 = 4.
        assert estimate_text_tokens("Hello wörld") == 4
        assert job.counter.completion_tokens_estimate == 4
        assert actor.tpm is not None
        assert actor.tpm.level(trio.current_time()) == 6000 - (100 + 4)


async def test_idle_upstream_mid_stream_ends_with_an_error_event_and_counts_against_the_key(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    upstream, streams = _streaming(ROLE, 2.0, HELLO, 1000.0, WORLD, DONE)
    async with running_actor(make_key(), upstream, metrics=metrics,
                             idle_timeout_s=10.0) as actor:
        job, receive = make_job(stream=True)
        events = await run_job(actor, job, receive)
        # The last byte at 2 s, then 10 s idle, plus the deadline's 1 s granularity.
        ended = trio.current_time()
        assert 12.0 <= ended <= 13.0
        body = body_of(events)
        assert body.startswith(ROLE + HELLO)
        error = _error_event(body)
        assert error["type"] == "upstream_error"
        assert error["code"] == "timeout"
        assert WORLD not in body
        assert failures(metrics, "timeout") == 1
        assert actor.health.state(ended) is HealthState.COOLING
        assert actor.health.available_at(ended) == ended + 1.0
    [stream] = streams
    assert stream.cancelled_at == ended
    assert stream.closed_at == ended


async def test_stream_cut_before_done_ends_with_an_error_event_and_counts_against_the_key(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    upstream, streams = _streaming(ROLE, HELLO)
    async with running_actor(make_key(), upstream, metrics=metrics) as actor:
        job, receive = make_job(stream=True)
        events = await run_job(actor, job, receive)
        body = body_of(events)
        assert body.startswith(ROLE + HELLO)
        assert _error_event(body)["code"] == "connect"
        assert failures(metrics, "connect") == 1
        assert actor.health.state(0.0) is HealthState.COOLING
    assert streams[0].exhausted


async def test_broken_connection_mid_stream_ends_with_an_error_event(
    autojump_clock: MockClock,
) -> None:
    class Broken(ScriptedStream):
        async def __anext__(self) -> bytes:
            if self.exhausted:
                raise httpx.ReadError("connection reset")
            part = await super().__anext__()
            self.exhausted = True
            return part

    async def respond(request: httpx.Request) -> httpx.Response:
        return stream_response(Broken([ROLE + HELLO]))

    async with running_actor(make_key(), FakeUpstream(respond)) as actor:
        events = await run_job(actor, *make_job(stream=True))
        body = body_of(events)
        assert body.startswith(ROLE + HELLO)
        assert _error_event(body)["code"] == "connect"
        assert actor.health.state(0.0) is HealthState.COOLING


async def test_upstream_error_event_in_the_stream_is_passed_on_once(
    autojump_clock: MockClock,
) -> None:
    upstream_error = sse({"error": {"message": "overloaded", "type": "server_error",
                                    "param": None, "code": None}})
    upstream, _ = _streaming(ROLE, upstream_error, HELLO, DONE)
    async with running_actor(make_key(), upstream) as actor:
        events = await run_job(actor, *make_job(stream=True))
        assert body_of(events) == ROLE + upstream_error
        assert actor.health.state(0.0) is HealthState.COOLING


async def test_token_budget_cuts_the_stream_with_an_insufficient_quota_event(
    autojump_clock: MockClock,
) -> None:
    pieces = [sse(delta(word)) for word in ("one", "two", "three", "four", "five")]
    upstream, streams = _streaming(ROLE, *pieces, DONE)
    async with running_actor(make_key(), upstream) as actor:
        job, receive = make_job(stream=True, token_budget=2)
        events = await run_job(actor, job, receive)
        body = body_of(events)
        # The third piece makes the estimate 3 > 2: it is relayed, then the cut.
        assert body.startswith(ROLE + pieces[0] + pieces[1] + pieces[2])
        error = _error_event(body)
        assert error["type"] == "insufficient_quota"
        assert error["code"] == "insufficient_quota"
        assert pieces[3] not in body
        assert job.cut_for_quota
        # Our cut is not the upstream's fault.
        assert actor.health.state(0.0) is HealthState.HEALTHY
    assert streams[0].closed_at == 0.0
    assert not streams[0].exhausted


async def test_abort_cancels_the_running_upstream_stream_and_frees_the_worker(
    autojump_clock: MockClock,
) -> None:
    upstream, streams = _streaming(ROLE, HELLO, 1000.0, WORLD, DONE)
    async with running_actor(make_key(max_concurrency=1), upstream) as actor:
        job, receive = make_job(stream=True, buffer=0)
        assert actor.submit_nowait(job)
        async with receive:
            assert isinstance(await receive.receive(), Started)
            assert await receive.receive() == ROLE
            assert await receive.receive() == HELLO
            await trio.sleep(5.0)  # the upstream is silent; the request is still open
            assert actor.inflight == 1
            assert not actor.can_take(5.0, 0)
            job.abort()
            rest: list[Event] = [event async for event in receive]
        assert rest == []
        assert trio.current_time() == 5.0
        [stream] = streams
        assert stream.cancelled_at == 5.0
        assert stream.closed_at == 5.0
        assert actor.inflight == 0
        # The only worker is free again: the next job starts at once.
        job, receive = make_job(stream=True)
        assert actor.submit_nowait(job)
        async with receive:
            assert isinstance(await receive.receive(), Started)
            assert trio.current_time() == 5.0
            job.abort()
        # Leaving mid-stream after a 200 is no verdict against the key.
        assert actor.health.state(5.0) is HealthState.HEALTHY
    assert upstream.times == [0.0, 5.0]


async def test_abort_of_a_queued_job_never_reaches_the_upstream(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer(after_s=10.0))
    async with running_actor(make_key(max_concurrency=1), upstream) as actor:
        first, first_reply = make_job()
        second, second_reply = make_job()
        assert actor.submit_nowait(first)
        assert actor.submit_nowait(second)
        second.abort()
        assert started(await collect(first_reply)).status == 200
        assert await collect(second_reply) == []
        assert trio.current_time() == 10.0
    assert upstream.times == [0.0]


async def test_abort_while_waiting_for_rpm_ends_the_wait_and_spends_nothing(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer())
    async with running_actor(make_key(rpm=1, max_concurrency=1), upstream) as actor:
        started(await run_job(actor, *make_job()))
        waiting, reply = make_job()
        assert actor.submit_nowait(waiting)
        await trio.sleep(5.0)  # the worker waits for the rpm refill at 60 s
        waiting.abort()
        assert await collect(reply) == []
        assert trio.current_time() == 5.0
        # The refill was not spent on the abandoned job: the next one runs at 60 s.
        assert actor.rpm is not None
        next_job, next_reply = make_job()
        assert started(await run_job(actor, next_job, next_reply)).status == 200
        assert trio.current_time() == 60.0
    assert upstream.times == [0.0, 60.0]


async def test_non_stream_body_is_relayed_whole_with_its_usage(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer())
    async with running_actor(make_key(), upstream) as actor:
        job, receive = make_job()
        events = await run_job(actor, job, receive)
        assert started(events) == Started(200, "application/json", "k1")
        assert orjson.loads(body_of(events))["choices"][0]["message"]["content"] == "hi"
        assert job.known_usage == Usage(prompt_tokens=10, cached_tokens=0, completion_tokens=2)


def test_the_usage_chunk_in_the_test_data_is_usage_only() -> None:
    # A guard on the data above: USAGE is the chunk the relay must drop, HELLO is not.
    counter = StreamTokenCounter()
    assert counter.feed(USAGE[6:-2]).usage_only
    assert not counter.feed(HELLO[6:-2]).usage_only
