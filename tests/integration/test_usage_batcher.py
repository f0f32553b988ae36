"""The usage batcher and the idempotent usage write, against a real Postgres."""

from __future__ import annotations

import dataclasses

import trio

from observability.metrics import Metrics
from store.batcher import UsageBatcher
from store.db import Database
from store.usage import UsageRecord, write_usage
from store.users import create_user


def record(user_id: str, request_id: str, prompt: int = 3, completion: int = 7) -> UsageRecord:
    return UsageRecord(
        request_id=request_id, user_id=user_id, api_key_id=None, upstream_key_id=None,
        model="deepseek-v4-flash", endpoint="chat", prompt_tokens=prompt, cached_tokens=0,
        completion_tokens=completion, cost_micro=15, latency_ms=12, ttft_ms=3, status=200,
        usage_source="upstream",
    )


async def _user(db: Database, email: str = "b@airgate.test") -> str:
    return (await create_user(db, email=email, password_hash="x")).id


async def counters(db: Database, user_id: str) -> tuple[int, int]:
    row = await db.fetchrow("SELECT token_used, request_count FROM users WHERE id = $1",
                            user_id)
    assert row is not None
    return row["token_used"], row["request_count"]


async def test_a_retried_write_never_bills_twice(db: Database) -> None:
    user = await _user(db)
    batch = [record(user, f"req_{i}") for i in range(5)]
    assert await write_usage(db, batch) == 5
    assert await write_usage(db, batch) == 0  # the same flush again, e.g. after a timeout
    assert await write_usage(db, [*batch, record(user, "req_new")]) == 1
    assert await counters(db, user) == (60, 6)
    assert await db.fetchval("SELECT count(*) FROM usage_records") == 6


async def test_duplicates_inside_one_batch_count_once(db: Database) -> None:
    user = await _user(db)
    assert await write_usage(db, [record(user, "dup"), record(user, "dup")]) == 1
    assert await counters(db, user) == (10, 1)


async def test_records_are_flushed_on_size_and_the_rest_at_shutdown(db: Database) -> None:
    user = await _user(db)
    batcher = UsageBatcher(db, Metrics(), batch_size=10, interval_s=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        sender = batcher.sender
        for i in range(25):
            await sender.send(record(user, f"r{i}"))
        # Two full batches go out without waiting for the (hour-long) interval.
        with trio.fail_after(10):
            while batcher.written < 20:  # noqa: ASYNC110 - the flush is real database I/O
                await trio.sleep(0.01)
        assert await db.fetchval("SELECT count(*) FROM usage_records") == 20
        await sender.aclose()  # every producer gone: drain and flush the remaining 5
    assert batcher.written == 25
    assert await counters(db, user) == (250, 25)


async def test_a_record_the_database_refuses_does_not_block_the_others(db: Database) -> None:
    user = await _user(db)
    metrics = Metrics()
    batcher = UsageBatcher(db, metrics, batch_size=100, interval_s=0.01)
    poison = dataclasses.replace(record(user, "bad"), usage_source="guessed")  # CHECK fails
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with batcher.sender:
            await batcher.sender.send(record(user, "good1"))
            await batcher.sender.send(poison)
            await batcher.sender.send(record(user, "good2"))
    ids = sorted(r["request_id"] for r in await db.fetch("SELECT request_id FROM usage_records"))
    assert ids == ["good1", "good2"]
    assert batcher.rejected == [poison]
    assert metrics.registry.get_sample_value("airgate_usage_records_rejected_total") == 1
    assert await counters(db, user) == (20, 2)
