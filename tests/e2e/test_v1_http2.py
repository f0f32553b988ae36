"""Clients that speak HTTP/2 (h2c with prior knowledge, as ``httpx(http2=True)`` does):
many streams on one connection, each relayed whole and billed once, with hypercorn
scheduling the streams in turn (``proxy.h2_schedule``)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio
from hypercorn.protocol import h2 as hypercorn_h2

from proxy.h2_schedule import RoundRobin
from tests.e2e.conftest import Harness, in_thread

CHAT = [{"role": "user", "content": "say hello over http/2"}]
STREAMS = 40


async def test_many_streams_share_one_http2_connection_and_are_billed_once(
    harness: Harness,
) -> None:
    assert hypercorn_h2.priority.PriorityTree is RoundRobin  # installed by serve()
    await harness.add_key()
    user_id, key = await harness.add_user()
    bodies: list[list[str]] = []
    versions: set[str] = set()
    async with httpx.AsyncClient(http1=False, http2=True, base_url=harness.base_url,
                                 timeout=20,
                                 headers={"authorization": f"Bearer {key}"}) as client:

        async def one() -> None:
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": "gpt-4o-mini", "messages": CHAT, "stream": True,
                    "stream_options": {"include_usage": True}}) as response:
                assert response.status_code == 200
                versions.add(response.http_version)
                bodies.append([line async for line in response.aiter_lines() if line])

        async with trio.open_nursery() as nursery:
            for _ in range(STREAMS):
                nursery.start_soon(one)
        refused = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini"},
                                    headers={"authorization": "Bearer sk-not-a-key"})
    assert versions == {"HTTP/2"}
    assert len(bodies) == STREAMS
    for lines in bodies:
        assert lines[-1] == "data: [DONE]"
        events = [orjson.loads(line[len("data: "):]) for line in lines[:-1]]
        text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e["choices"])
        assert text == "tok " * 20
        assert events[-1]["usage"]["completion_tokens"] == 20
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    rows = await harness.wait_for_usage(user_id, STREAMS)
    assert len(rows) == STREAMS
    assert sum(r["completion_tokens"] for r in rows) == 20 * STREAMS


async def test_the_openai_sdk_over_http2(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()

    def consume() -> list[Any]:
        with httpx.Client(http1=False, http2=True) as http_client:
            client = harness.client(key, http_client=http_client)
            return list(client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT, stream=True,
                stream_options={"include_usage": True}))

    chunks = await in_thread(consume)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok " * 20
    assert chunks[-1].usage.completion_tokens == 20
    rows = await harness.wait_for_usage(user_id, 1)
    assert len(rows) == 1
