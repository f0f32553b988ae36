"""A request task that runs late: the chunks queued before it handed over its sink are
written first, by it, in one write; every later chunk goes straight from the key actor to
the client, and the client gets them all in order."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import httpx
import trio
from trio.testing import MockClock

from proxy.v1_stream import relay_reply
from store.apikeys import ApiKeyOwner
from tests.unit.workers.helpers import (
    FakeUpstream,
    ScriptedStream,
    delta,
    make_job,
    make_key,
    running_actor,
    sse,
    stream_response,
)
from workers.accounts import Account
from workers.dispatch import Reply, Request
from workers.job import Started

PARTS: list[bytes | float] = [
    sse(delta("one")), 0.01, sse(delta("two")), 1.0, sse(delta("three")), 1.0, sse("[DONE]"),
]


def _request() -> Request:
    account = Account(user_id="u1", status="active", plan=None, token_limit=1_000_000,
                      token_used=0, expires_at=None, allowed_groups=None, rpm=None)
    return Request(
        request_id="req-1", endpoint="chat", upstream_path="/chat/completions", body={},
        raw_body=b"{}", model="m", stream=True, include_usage=False, prompt_estimate=10,
        max_output=20, owner=ApiKeyOwner(api_key_id="ak1", user_id="u1"), account=account,
    )


async def test_queued_chunks_go_first_then_the_actor_writes_straight_through(
    autojump_clock: MockClock,
) -> None:
    async def respond(request: httpx.Request) -> httpx.Response:
        return stream_response(ScriptedStream(PARTS))

    written: list[tuple[bytes, str]] = []  # body bytes and the task that wrote them

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            written.append((message["body"], trio.lowlevel.current_task().name))
        await trio.lowlevel.checkpoint()

    async with running_actor(make_key(), FakeUpstream(respond)) as actor:
        job, receive = make_job(stream=True)
        assert actor.submit_nowait(job)
        await trio.sleep(0.5)  # the request task runs late: "one" and "two" are queued
        started = await receive.receive()
        assert isinstance(started, Started)
        reply = Reply(_request(), started, job, receive)
        done = [False]
        await relay_reply(send, reply, (b"x-request-id", b"req-1"), done, 15.0)

    assert done[0]
    assert b"".join(body for body, _ in written) == b"".join(
        part for part in PARTS if isinstance(part, bytes))
    request_task = trio.lowlevel.current_task().name
    writers = [task for _, task in written]
    # What was queued ("one", "two"): written by the request task, in one write; the rest
    # by the key actor, straight through, each chunk as it arrived.
    assert written[0][0] == sse(delta("one")) + sse(delta("two"))
    assert writers[0] == request_task
    assert request_task not in writers[1:]
    assert len(writers) == 3
