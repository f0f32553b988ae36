"""Fakes for the key actor, pool and dispatcher tests: an in-memory upstream, keys and jobs.

The upstream is an ``httpx.MockTransport`` whose handler is an async function of ours, so
the real ``UpstreamClient`` (and httpx under it) is exercised without a socket. Streaming
bodies are :class:`ScriptedStream` s: byte parts and pauses on the trio clock, which record
when they were cancelled and closed. Every test runs on ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import trio

from observability.metrics import Metrics
from store.upstream_keys import UpstreamKey
from workers.job import Event, Failed, Job, Started
from workers.keyactor import KeyActor
from workers.pool import KeyPool
from workers.upstream import UpstreamClient

MODEL = "gpt-test"

Respond = Callable[[httpx.Request], Awaitable[httpx.Response]]

#: Virtual seconds after which a running actor or pool fails its test with TooSlowError:
#: a bug that leaves the test waiting forever fails it instead of hanging the run (the
#: autojump clock jumps straight there once every task is blocked). No test needs longer.
HANG_GUARD_S = 100_000.0


def make_key(
    key_id: str = "k1",
    *,
    base_url: str | None = None,
    models: tuple[str, ...] = (MODEL,),
    model_map: Mapping[str, str] | None = None,
    weight: int = 1,
    priority: int = 0,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int = 4,
    status: str = "active",
) -> UpstreamKey:
    return UpstreamKey(
        id=key_id,
        name=f"key {key_id}",
        base_url=base_url or f"https://{key_id}.upstream.test/v1/",
        api_key=f"sk-upstream-{key_id}",
        models=models,
        model_map=dict(model_map or {}),
        weight=weight,
        priority=priority,
        rpm=rpm,
        tpm=tpm,
        max_concurrency=max_concurrency,
        status=status,
        disabled_reason=None if status == "active" else "disabled by admin",
    )


# -- bodies --------------------------------------------------------------------------------


def sse(payload: Mapping[str, Any] | str) -> bytes:
    """One SSE event as an OpenAI-style upstream sends it."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def delta(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def completion_json(
    text: str = "hi", usage: tuple[int, int] | None = (10, 2)
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "c1", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": usage[0] + usage[1]}
    return body


def error_json(type_: str, code: str | None = None, message: str = "nope") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class ScriptedStream(httpx.AsyncByteStream):
    """A response body: ``bytes`` parts are yielded, numbers are pauses on the trio clock.

    Records whether a pause was cancelled and when httpx closed the stream, so tests can
    check that leaving a response really releases the upstream request.
    """

    def __init__(self, parts: Iterable[bytes | float]) -> None:
        self._parts: deque[bytes | float] = deque(parts)
        self.cancelled_at: float | None = None
        self.closed_at: float | None = None
        self.exhausted = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> bytes:
        while self._parts:
            part = self._parts.popleft()
            if isinstance(part, bytes):
                return part
            try:
                await trio.sleep(part)
            except trio.Cancelled:
                self.cancelled_at = trio.current_time()
                raise
        self.exhausted = True
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()


def stream_response(stream: ScriptedStream, status: int = 200) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": "text/event-stream"}, stream=stream)


def json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """A JSON answer whose body is still unread, as from a real connection.

    (``httpx.Response(json=...)`` would read its body up front, and the raw stream that
    ``UpstreamResponse.chunks`` reads would then count as consumed.)
    """
    return httpx.Response(
        status, headers={"content-type": "application/json", **(headers or {})},
        stream=ScriptedStream([orjson.dumps(body)]),
    )


@dataclass
class Seen:
    """One request the fake upstream received."""

    at: float
    host: str
    path: str
    authorization: str
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    """The MockTransport handler: records requests and how many are in flight at once."""

    respond: Respond
    seen: list[Seen] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0

    @property
    def times(self) -> list[float]:
        return [s.at for s in self.seen]

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.seen]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(Seen(
            at=trio.current_time(), host=request.url.host, path=request.url.path,
            authorization=request.headers["authorization"], body=orjson.loads(request.content),
        ))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self.respond(request)
        finally:
            self.inflight -= 1


def answer(status: int = 200, body: Mapping[str, Any] | None = None,
           headers: Mapping[str, str] | None = None, *, after_s: float = 0.0) -> Respond:
    """A handler that answers every request the same way (after ``after_s`` seconds)."""

    async def respond(request: httpx.Request) -> httpx.Response:
        if after_s:
            await trio.sleep(after_s)
        return json_response(status, completion_json() if body is None else body, headers)

    return respond


def make_client(upstream: FakeUpstream) -> UpstreamClient:
    return UpstreamClient(connect_timeout_s=1.0, max_connections=32,
                          transport=httpx.MockTransport(upstream))


@dataclass
class DisableLog:
    """The ``on_disable`` callback: records calls and wakes a waiting test."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    called: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, key_id: str, reason: str) -> None:
        self.calls.append((key_id, reason))
        self.called.set()


@asynccontextmanager
async def running_actor(
    key: UpstreamKey,
    upstream: FakeUpstream,
    *,
    metrics: Metrics | None = None,
    inbox_size: int = 16,
    first_byte_timeout_s: float = 30.0,
    idle_timeout_s: float = 10.0,
    on_disable: DisableLog | None = None,
) -> AsyncIterator[KeyActor]:
    """A KeyActor running in its own nursery; cancelled when the block ends."""
    client = make_client(upstream)
    try:
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                actor = KeyActor(
                    key, client, metrics or Metrics(), inbox_size=inbox_size,
                    first_byte_timeout_s=first_byte_timeout_s, idle_timeout_s=idle_timeout_s,
                    on_disable=on_disable or DisableLog(),
                )
                await nursery.start(actor.run)
                yield actor
                nursery.cancel_scope.cancel()
    finally:
        await client.aclose()


@asynccontextmanager
async def running_pool(
    upstream: FakeUpstream,
    *,
    metrics: Metrics | None = None,
    rng_seed: int = 0,
    inbox_size: int = 16,
    first_byte_timeout_s: float = 30.0,
    idle_timeout_s: float = 10.0,
    on_disable: DisableLog | None = None,
) -> AsyncIterator[KeyPool]:
    """A KeyPool running in its own nursery; cancelled when the block ends."""
    client = make_client(upstream)
    try:
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                pool = KeyPool(
                    client, metrics or Metrics(), inbox_size=inbox_size,
                    first_byte_timeout_s=first_byte_timeout_s, idle_timeout_s=idle_timeout_s,
                    on_disable=on_disable or DisableLog(), rng=random.Random(rng_seed),
                )
                await nursery.start(pool.run)
                yield pool
                nursery.cancel_scope.cancel()
    finally:
        await client.aclose()


def make_job(
    *,
    stream: bool = False,
    include_usage: bool = False,
    prompt_estimate: int = 10,
    max_output: int = 20,
    token_budget: int | None = None,
    deadline: float = math.inf,
    body: Mapping[str, Any] | None = None,
    buffer: int = 64,
) -> tuple[Job, trio.MemoryReceiveChannel[Event]]:
    """A chat job and the receiving end of its reply channel."""
    send, receive = trio.open_memory_channel[Event](buffer)
    request_body = dict(body or {"model": MODEL, "messages": [{"role": "user",
                                                                "content": "hello"}]})
    if stream:
        request_body["stream"] = True
        if include_usage:
            request_body["stream_options"] = {"include_usage": True}
    job = Job(
        request_id="req-1", endpoint="chat", upstream_path="/chat/completions",
        body=request_body, raw_body=orjson.dumps(request_body), public_model=MODEL,
        stream=stream, include_usage=include_usage,
        prompt_estimate=prompt_estimate, max_output=max_output, token_budget=token_budget,
        deadline=deadline, reply=send,
    )
    return job, receive


async def collect(receive: trio.MemoryReceiveChannel[Event]) -> list[Event]:
    """Every event of one reply, until the actor closes the channel."""
    async with receive:
        return [event async for event in receive]


async def run_job(actor: KeyActor, job: Job,
                  receive: trio.MemoryReceiveChannel[Event]) -> list[Event]:
    assert actor.submit_nowait(job)
    return await collect(receive)


def body_of(events: list[Event]) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


def started(events: list[Event]) -> Started:
    assert isinstance(events[0], Started), events
    return events[0]


def failed(events: list[Event]) -> Failed:
    assert len(events) == 1, events
    assert isinstance(events[0], Failed), events
    return events[0]


def failures(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "airgate_upstream_failures_total", {"failure_class": kind})
    return value or 0.0
