"""Keys revoked mid-session, clients that leave mid-stream, shutdown with streams open."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from proxy.sessions import issue_token
from store.runtime import open_store
from tests.e2e.conftest import (
    Harness,
    eventually,
    gateway_settings,
    in_thread,
    start_gateway,
)

CHAT = [{"role": "user", "content": "count slowly"}]


async def test_revoked_key_fails_on_the_very_next_request(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    client = harness.client(key)
    await in_thread(client.chat.completions.create, model="deepseek-v4-flash", messages=CHAT)
    token = issue_token(harness.gw.jwt_secret, user_id, "user", 3600)
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        response = await api.request("DELETE", "/api/auth/apikey", json={"api_key": key},
                                     headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200
    with pytest.raises(openai.AuthenticationError) as caught:
        await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                        messages=CHAT)
    assert caught.value.code == "invalid_api_key"


async def test_client_leaving_mid_stream_cancels_upstream_and_bills_what_was_sent(
    harness: Harness,
) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    client = harness.client(key)

    def read_three_then_leave() -> str:
        stream = client.chat.completions.create(
            model="deepseek-v4-flash", messages=CHAT, stream=True,
            extra_body={"mock": {"chunks": 200, "chunk_delay_ms": 20}},
        )
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if text.count("tok") >= 3:
                break
        stream.close()
        return text

    text = await in_thread(read_three_then_leave)
    assert text.count("tok") >= 3
    rows = await harness.wait_for_usage(user_id, 1)
    row = rows[0]
    assert row["status"] == 499
    assert row["usage_source"] == "estimate"
    assert row["prompt_tokens"] > 0
    # Billed for what was streamed: at least what the client read, far below 200 chunks.
    assert 3 <= row["completion_tokens"] < 200
    async def upstream_saw_disconnect() -> bool:
        return bool((await harness.mock_stats())["disconnected_streams"] >= 1)

    await eventually(upstream_saw_disconnect)


async def test_quota_and_plan_checks_refuse_before_dispatch(harness: Harness) -> None:
    await harness.add_key()
    _, empty_key = await harness.add_user(token_limit=0)
    _, expired_key = await harness.add_user(expires_in_s=-60)
    for key, code in ((empty_key, "insufficient_quota"), (expired_key, "plan_expired")):
        client = harness.client(key)
        with pytest.raises(openai.RateLimitError) as caught:
            await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                            messages=CHAT)
        assert caught.value.code == code
        assert caught.value.response.headers["x-should-retry"] == "false"
    assert (await harness.mock_stats())["requests"] == {}


async def test_near_the_end_of_quota_the_output_is_limited_to_what_is_left(
    harness: Harness,
) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user(token_limit=30)
    client = harness.client(key)
    reply = await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                            messages=CHAT, extra_body={"mock": {"chunks": 500}})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.total_tokens <= 30
    rows = await harness.wait_for_usage(user_id, 1)
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] <= 30


async def test_stream_is_cut_when_quota_runs_out(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user(token_limit=30)
    client = harness.client(key)

    def consume() -> tuple[int, str | None]:
        pieces = 0
        try:
            for chunk in client.chat.completions.create(
                model="deepseek-v4-flash", messages=CHAT, stream=True,
                extra_body={"mock": {"chunks": 500, "ignore_max_tokens": True}},
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces += 1
        except openai.APIError as exc:
            return pieces, str(exc.code) if hasattr(exc, "code") else "error"
        return pieces, None

    pieces, error = await in_thread(consume)
    assert error == "insufficient_quota"
    assert 0 < pieces < 30
    rows = await harness.wait_for_usage(user_id, 1)
    # Billed for what was relayed: at most one token past the budget.
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] <= 31


async def test_shutdown_with_streams_in_flight_loses_no_usage(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str
) -> None:
    h, done = await start_gateway(nursery, gateway_settings(pg_dsn), mock_url)
    await h.add_key()
    user_id, key = await h.add_user()
    client = h.client(key)
    finished: list[int] = []

    def stream_slowly() -> None:
        count = 0
        for chunk in client.chat.completions.create(
            model="deepseek-v4-flash", messages=CHAT, stream=True,
            extra_body={"mock": {"chunks": 10, "chunk_delay_ms": 50}},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                count += 1
        finished.append(count)

    async with trio.open_nursery() as clients:
        for _ in range(5):
            clients.start_soon(in_thread, stream_slowly)
        async def all_streaming() -> bool:
            active = h.gw.metrics.registry.get_sample_value("airgate_active_streams")
            return (active or 0) >= 5

        await eventually(all_streaming)
        h.stop.set()  # graceful: in-flight streams finish, then the batcher flushes
    with trio.fail_after(20):
        await done.wait()
    h.close_clients()
    assert finished == [10] * 5
    # The gateway's pool is closed now; read back through a fresh connection.
    async with open_store(pg_dsn, pool_size=1) as db:
        rows = await db.fetch(
            "SELECT completion_tokens, usage_source, status FROM usage_records"
            " WHERE user_id = $1", user_id)
        used = await db.fetchval("SELECT token_used FROM users WHERE id = $1", user_id)
    # Every stream was billed the upstream's own usage, none an estimate: the SDK closes
    # the connection the moment it has [DONE], before the stream's task may run again.
    assert [(r["completion_tokens"], r["usage_source"], r["status"]) for r in rows] \
        == [(10, "upstream", 200)] * 5
    assert used == sum(r["completion_tokens"] for r in rows) + 5 * 2
