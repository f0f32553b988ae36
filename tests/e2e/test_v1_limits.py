"""Limits seen by clients: key rate limits, per-user rpm, keep-alive pings."""

from __future__ import annotations

import math

import h11
import httpx
import openai
import orjson
import pytest
import trio

from tests.e2e.conftest import (
    Harness,
    gateway_settings,
    in_thread,
    start_gateway,
)
from tests.http1 import connect, exchange
from workers.overload import WAIT_S

CHAT = [{"role": "user", "content": "hello"}]


async def test_a_key_at_its_rpm_gives_429_with_retry_after(harness: Harness) -> None:
    await harness.add_key(rpm=1)
    _, key = await harness.add_user()
    client = harness.client(key)
    await in_thread(client.chat.completions.create, model="deepseek-v4-flash", messages=CHAT)
    with pytest.raises(openai.RateLimitError) as caught:
        await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                        messages=CHAT)
    assert caught.value.code == "rate_limit_exceeded"
    seconds = int(caught.value.response.headers["retry-after"])
    assert seconds >= 1
    # the same wait to the millisecond; whole seconds are rounded up
    assert 1000 * (seconds - 1) < int(caught.value.response.headers["retry-after-ms"]) \
        <= 1000 * seconds
    assert (await harness.mock_stats())["requests"]["mock-healthy"] == 1


async def test_per_user_rpm_refuses_before_any_upstream_call(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    await harness.gw.db.execute("UPDATE users SET rpm = 2 WHERE id = $1", user_id)
    client = harness.client(key)
    for _ in range(2):
        await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                        messages=CHAT)
    with pytest.raises(openai.RateLimitError) as caught:
        await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                        messages=CHAT)
    assert caught.value.code == "rate_limit_exceeded"
    assert "retry-after" in caught.value.response.headers
    assert (await harness.mock_stats())["requests"]["mock-healthy"] == 2


async def test_idle_stream_gets_ping_comments_before_the_first_token(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str
) -> None:
    h, done = await start_gateway(nursery, gateway_settings(pg_dsn, ping_interval_s=0.05),
                                  mock_url)
    await h.add_key()
    _, key = await h.add_user()
    body = {"model": "deepseek-v4-flash", "messages": CHAT, "stream": True,
            "mock": {"ttft_ms": 400, "chunks": 2}}
    lines: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client, client.stream(
        "POST", h.base_url + "/v1/chat/completions", json=body,
        headers={"authorization": f"Bearer {key}"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        lines = [line async for line in response.aiter_lines() if line]
    first_token = next(i for i, line in enumerate(lines) if '"content":"tok' in line)
    assert ": ping" in lines[:first_token]  # the upstream was silent for 400 ms
    assert all(line == ": ping" or line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    h.stop.set()
    with trio.fail_after(20):
        await done.wait()


async def test_past_the_waiting_limit_requests_are_shed_at_once(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str
) -> None:
    h, done = await start_gateway(
        nursery, gateway_settings(pg_dsn, max_waiting_requests=2), mock_url)
    await h.add_key()
    user_id, key = await h.add_user()
    body = {"model": "deepseek-v4-flash", "messages": CHAT, "mock": {"ttft_ms": 300}}
    statuses: list[int] = []
    retry_after: list[str] = []

    async def call() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(h.base_url + "/v1/chat/completions", json=body,
                                         headers={"authorization": f"Bearer {key}"})
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "gateway_overloaded"
            retry_after.append(response.headers["retry-after"])

    async with trio.open_nursery() as clients:
        for _ in range(6):
            clients.start_soon(call)
    assert statuses.count(200) >= 2
    assert statuses.count(429) >= 1
    assert set(statuses) == {200, 429}
    assert all(int(r) >= 1 for r in retry_after)
    # Shed requests are not billed; served ones are, once each.
    rows = await h.wait_for_usage(user_id, statuses.count(200))
    assert len(rows) == statuses.count(200)
    h.stop.set()
    with trio.fail_after(20):
        await done.wait()


async def test_while_the_gateway_lags_completions_are_refused_at_the_door(
    harness: Harness,
) -> None:
    """Refusals come before auth and body parsing, carry retry-after, bill nothing, and
    leave the connection usable; /v1/models and /api keep working."""
    await harness.add_key()
    user_id, key = await harness.add_user()
    harness.gw.admission.limit = 0  # the lag monitor is off in e2e; play its part
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=10) as client:
        for auth in (headers, {"authorization": "Bearer sk-not-a-key"}):
            response = await client.post("/v1/chat/completions", headers=auth,
                                          content=b'{"model": "deepseek-v4-flash", "mess')
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "gateway_overloaded"
            assert int(response.headers["retry-after"]) == 1
            # Sooner for clients that read milliseconds: with nothing measured yet, the
            # shortest wait, jittered (workers.overload).
            assert 0.75 * WAIT_S[0] * 1000 <= int(response.headers["retry-after-ms"]) \
                <= 1.25 * WAIT_S[0] * 1000
        assert (await client.get("/v1/models", headers=headers)).status_code == 200
        assert (await client.get("/api/plans")).status_code == 200
        harness.gw.admission.limit = math.inf
        assert harness.gw.admission.inflight == 0  # refusals were never counted in
        response = await client.post("/v1/chat/completions", headers=headers,
                                     json={"model": "deepseek-v4-flash", "messages": CHAT})
        assert response.status_code == 200
    rows = await harness.wait_for_usage(user_id, 1)
    assert len(rows) == 1
    assert (await harness.mock_stats())["requests"]["mock-healthy"] == 1


async def test_a_whole_request_refused_early_gets_the_same_answer(harness: Harness) -> None:
    """A completion that arrives in one read while shedding is refused by the connection
    handler (proxy.early_refusal) before hypercorn parses it: the same 429 as the app's
    own door, counted the same, and the connection serves the next request."""
    await harness.add_key()
    user_id, key = await harness.add_user()
    body = b'{"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
               b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (key.encode(), len(body), body))
    stream = await connect(harness.base_url)
    conn = h11.Connection(h11.CLIENT)
    shed_before = harness.gw.metrics.registry.get_sample_value(
        "airgate_shed_requests_total", {"reason": "overloaded"}) or 0.0
    harness.gw.admission.limit = 0
    try:
        head, data = await exchange(stream, conn, request)  # one write: one read there
    finally:
        harness.gw.admission.limit = math.inf
    headers = dict(head.headers)
    assert head.status_code == 429
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"x-request-id"].startswith(b"req_")
    assert int(headers[b"retry-after"]) == 1
    assert 0.75 * WAIT_S[0] * 1000 <= int(headers[b"retry-after-ms"]) <= 1.25 * WAIT_S[0] * 1000
    assert orjson.loads(data)["error"]["code"] == "gateway_overloaded"
    assert harness.gw.metrics.registry.get_sample_value(
        "airgate_shed_requests_total", {"reason": "overloaded"}) == shed_before + 1
    assert harness.gw.metrics.registry.get_sample_value(
        "airgate_requests_total", {"route": "/v1/chat/completions", "model": "",
                                   "status_class": "4xx"}) == 1
    assert harness.gw.admission.inflight == 0
    # The same connection, no longer shedding: served and billed.
    head, data = await exchange(stream, conn, request)
    await stream.aclose()
    assert head.status_code == 200
    assert orjson.loads(data)["choices"][0]["message"]["content"]
    rows = await harness.wait_for_usage(user_id, 1)
    assert len(rows) == 1


@pytest.mark.parametrize("hold_ms", [0, 50], ids=["off (default)", "50 ms"])
async def test_a_client_back_before_its_retry_after_is_held_when_holds_are_on(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str, hold_ms: int,
) -> None:
    """As wrk does: the next request on the connection the instant the refusal arrives.
    With AIRGATE_REFUSAL_HOLD_MS it is held (a timer, not CPU) until the wait the first
    refusal told is over, or that long if sooner; by default it is answered at once."""
    harness, done = await start_gateway(
        nursery, gateway_settings(pg_dsn, refusal_hold_ms=hold_ms), mock_url)
    key = (await harness.add_user())[1]
    body = b'{"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
               b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
               % (key.encode(), len(body), body))
    stream = await connect(harness.base_url)
    conn = h11.Connection(h11.CLIENT)
    admission = harness.gw.admission
    admission.limit = 0
    try:
        head, _ = await exchange(stream, conn, request)
        answered = trio.current_time()
        told_s = int(dict(head.headers)[b"retry-after-ms"]) / 1000
        assert head.status_code == 429
        held: list[int] = []

        async def watch() -> None:
            while not held:
                if admission.held:
                    held.append(admission.held)
                await trio.sleep(0.005)

        async with trio.open_nursery() as watching:
            watching.start_soon(watch)
            head, data = await exchange(stream, conn, request)
            watching.cancel_scope.cancel()
        took = trio.current_time() - answered
        assert head.status_code == 429
        assert orjson.loads(data)["error"]["code"] == "gateway_overloaded"
        if hold_ms:
            assert held == [1]
            assert took >= min(told_s, hold_ms / 1000) - 0.02
        else:
            assert held == []
            assert took < min(told_s, 0.1)  # answered at once
        assert admission.held == 0
    finally:
        admission.limit = math.inf
        await stream.aclose()
        harness.stop.set()
    with trio.fail_after(20):
        await done.wait()


@pytest.mark.parametrize("shedding", [False, True], ids=["bad key", "refused at the door"])
async def test_an_error_before_the_body_arrived_still_leaves_the_connection_usable(
    harness: Harness, shedding: bool,
) -> None:
    """The head alone reaches the gateway; the body comes 0.2 s later. A bad key (the
    body is read before authenticating) or a door refusal (the body is drained first) is
    answered only after the body has been read, so the connection serves the next
    request (unread, it would make hypercorn close the connection, and the close could
    lose the answer)."""
    body = b'{"model": "deepseek-v4-flash", "messages": []}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
            b"authorization: Bearer sk-not-a-key\r\ncontent-length: %d\r\n\r\n" % len(body))
    stream = await connect(harness.base_url)
    conn = h11.Connection(h11.CLIENT)
    harness.gw.admission.limit = 0 if shedding else math.inf
    try:
        for _ in range(2):
            with trio.fail_after(5):
                response, data = await exchange(stream, conn, head, body, gap_s=0.2)
            assert response.status_code == (429 if shedding else 401)
            assert orjson.loads(data)["error"]["code"] == \
                ("gateway_overloaded" if shedding else "invalid_api_key")
    finally:
        harness.gw.admission.limit = math.inf
    await stream.aclose()
