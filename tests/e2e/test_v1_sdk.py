"""The /v1 routes through the official openai SDK, billed exactly once per request."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e.conftest import Harness, eventually, in_thread

CHAT = [{"role": "user", "content": "say hello to the gateway"}]  # 5 words -> 5 prompt tokens


async def test_chat_non_stream_is_billed_once_with_upstream_usage(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    client = harness.client(key)
    reply = await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                            messages=CHAT)
    assert reply.choices[0].message.content == "tok " * 20
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 20)
    rows = await harness.wait_for_usage(user_id, 1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 20)
    assert row["usage_source"] == "upstream"
    assert row["status"] == 200
    # 5 * 0.5 + 20 * 2 CNY per 1M tokens = 42.5 micro-CNY, rounded half up once.
    assert row["cost_micro"] == 43
    used = await harness.gw.db.fetchval("SELECT token_used FROM users WHERE id = $1", user_id)
    assert used == 25


async def test_chat_stream_relays_every_chunk_and_hides_usage_unless_asked(
    harness: Harness,
) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    client = harness.client(key)

    def consume(**extra: Any) -> list[Any]:
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT,
                                                stream=True, **extra)
        return list(stream)

    chunks = await in_thread(consume)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok " * 20
    assert all(c.usage is None for c in chunks)

    with_usage = await in_thread(consume, stream_options={"include_usage": True})
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 20

    rows = await harness.wait_for_usage(user_id, 2)
    assert len(rows) == 2
    # The gateway asked upstream for usage both times, so both bills are authoritative.
    assert [r["usage_source"] for r in rows] == ["upstream", "upstream"]
    assert [r["completion_tokens"] for r in rows] == [20, 20]
    assert all(r["ttft_ms"] is not None for r in rows)


async def test_completions_stream_and_non_stream(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    client = harness.client(key)
    whole = await in_thread(client.completions.create, model="deepseek-v4-flash",
                            prompt="one two three", max_tokens=4)
    assert whole.choices[0].text == "tok " * 4
    assert whole.choices[0].finish_reason == "length"

    def stream() -> str:
        return "".join(c.choices[0].text for c in client.completions.create(
            model="deepseek-v4-flash", prompt="one two three", stream=True) if c.choices)

    assert await in_thread(stream) == "tok " * 20
    rows = await harness.wait_for_usage(user_id, 2)
    assert sorted(r["completion_tokens"] for r in rows) == [4, 20]
    assert all(r["prompt_tokens"] == 3 and r["endpoint"] == "completions" for r in rows)


async def test_embeddings_and_models(harness: Harness) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    client = harness.client(key)
    result = await in_thread(client.embeddings.create, model="text-embedding-3-small",
                             input=["alpha beta", "gamma"])
    assert len(result.data) == 2
    assert result.usage.prompt_tokens == 3
    models = await in_thread(client.models.list)
    ids = {m.id for m in models.data}
    assert {"deepseek-v4-flash", "gpt-4o-mini", "text-embedding-3-small"} <= ids
    rows = await harness.wait_for_usage(user_id, 1)
    assert rows[0]["prompt_tokens"] == 3
    assert rows[0]["completion_tokens"] == 0


async def test_failover_to_a_healthy_key_is_invisible(harness: Harness) -> None:
    await harness.add_key("mock-500-a", priority=10)
    await harness.add_key("mock-healthy", priority=0)
    user_id, key = await harness.add_user()
    client = harness.client(key)
    for _ in range(3):
        reply = await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                                messages=CHAT)
        assert reply.choices[0].message.content == "tok " * 20
    stats = await harness.mock_stats()
    assert stats["requests"].get("mock-500-a", 0) >= 1
    assert stats["requests"]["mock-healthy"] == 3
    rows = await harness.wait_for_usage(user_id, 3)
    assert len(rows) == 3
    assert all(r["status"] == 200 for r in rows)


async def test_upstream_401_disables_the_key(harness: Harness) -> None:
    bad = await harness.add_key("mock-401-x", priority=10)
    await harness.add_key("mock-healthy", priority=0)
    _, key = await harness.add_user()
    client = harness.client(key)
    reply = await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                            messages=CHAT)
    assert reply.choices[0].message.content
    actor = harness.gw.pool.actors[bad.id]
    assert actor.health.disabled_reason is not None
    async def persisted() -> bool:
        status = await harness.gw.db.fetchval(
            "SELECT status FROM upstream_keys WHERE id = $1", bad.id)
        return bool(status == "disabled")

    await eventually(persisted)
    # Later requests never touch the disabled key again.
    before = (await harness.mock_stats())["requests"]["mock-401-x"]
    await in_thread(client.chat.completions.create, model="deepseek-v4-flash", messages=CHAT)
    assert (await harness.mock_stats())["requests"]["mock-401-x"] == before


async def test_every_key_failing_gives_an_openai_error_and_no_charge(harness: Harness) -> None:
    await harness.add_key("mock-500-only")
    user_id, key = await harness.add_user()
    client = harness.client(key)
    with pytest.raises(openai.APIStatusError) as caught:
        await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                        messages=CHAT)
    assert caught.value.status_code in (502, 503)
    assert caught.value.response.headers.get("x-request-id")
    rows = await harness.wait_for_usage(user_id, 1)
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] == 0
    used = await harness.gw.db.fetchval("SELECT token_used FROM users WHERE id = $1", user_id)
    assert used == 0


async def test_an_upstream_failing_mid_stream_ends_with_an_error_event(
    harness: Harness,
) -> None:
    await harness.add_key("mock-cut-1")
    user_id, key = await harness.add_user()
    client = harness.client(key)

    def consume() -> tuple[int, str]:
        pieces = 0
        try:
            for chunk in client.chat.completions.create(
                model="deepseek-v4-flash", messages=CHAT, stream=True,
                extra_body={"mock": {"chunks": 10}},
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces += 1
        except openai.APIError as exc:
            return pieces, exc.message
        return pieces, "no error"

    pieces, message = await in_thread(consume)
    assert pieces == 5  # the mock cuts after half the chunks
    assert "upstream stream failed" in message
    rows = await harness.wait_for_usage(user_id, 1)
    assert rows[0]["usage_source"] == "estimate"
    assert rows[0]["completion_tokens"] >= 5


async def test_model_mapping_patches_only_the_model(harness: Harness) -> None:
    await harness.add_key(model_map={"deepseek-v4-flash": "ds-upstream-name"})
    user_id, key = await harness.add_user()
    client = harness.client(key)
    reply = await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                            messages=CHAT, extra_body={"mock": {"chunks": 3}})
    # The mock echoes the model it was asked for, and honours the unknown `mock` field.
    assert reply.model == "ds-upstream-name"
    assert reply.choices[0].message.content == "tok " * 3
    rows = await harness.wait_for_usage(user_id, 1)
    assert rows[0]["model"] == "deepseek-v4-flash"  # billed under the public model
