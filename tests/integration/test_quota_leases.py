"""Quota leases never grant more than a user has left, across holders."""

from __future__ import annotations

import trio

from store.db import Database
from store.quota import acquire_lease, lease_of, release_leases, return_lease
from store.usage import UsageRecord, write_usage
from store.users import create_user


async def _user(db: Database, limit: int) -> str:
    return (await create_user(db, email="lease@airgate.test", password_hash="x",
                              token_limit=limit)).id


def _record(user_id: str, request_id: str, tokens: int) -> UsageRecord:
    return UsageRecord(request_id, user_id, None, None, "m", "chat", tokens, 0, 0, 0, 1, None,
                       200, "upstream")


async def test_holders_share_what_is_left_and_never_more(db: Database) -> None:
    user = await _user(db, 1000)
    assert await acquire_lease(db, user, "a", need=800, cap=10_000) == (800, True)
    assert await acquire_lease(db, user, "b", need=500, cap=10_000) == (200, True)
    assert await acquire_lease(db, user, "b", need=1, cap=10_000) == (0, False)
    # "a" spends 300 of its lease: the flush moves it from the lease into token_used.
    assert await write_usage(db, [_record(user, "r1", 300)], "a") == 1
    assert await lease_of(db, user, "a") == 500
    assert await db.fetchval("SELECT token_used FROM users WHERE id = $1", user) == 300
    # "a" goes idle and gives its unspent lease back; "b" can now have it.
    await return_lease(db, user, "a", 500)
    assert await acquire_lease(db, user, "b", need=500, cap=10_000) == (500, False)
    await release_leases(db, "b")
    assert await lease_of(db, user, "b") == 0


async def test_concurrent_grants_never_oversubscribe(db: Database) -> None:
    user = await _user(db, 1000)
    grants: list[int] = []

    async def grab(holder: str) -> None:
        granted, _ = await acquire_lease(db, user, holder, need=300, cap=10_000)
        grants.append(granted)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(grab, f"h{i}")
    assert sum(grants) == 1000
    assert await db.fetchval("SELECT sum(tokens) FROM quota_leases") == 1000


async def test_grants_and_usage_flushes_run_together_without_deadlock(db: Database) -> None:
    user = await _user(db, 10**9)
    granted: list[int] = []

    async def grant(holder: str) -> None:
        for _ in range(10):
            granted.append((await acquire_lease(db, user, holder, need=1000, cap=5000))[0])

    async def flush(holder: str, start: int) -> None:
        for i in range(10):
            await write_usage(db, [_record(user, f"{holder}-{start + i}", 7)], holder)

    async with trio.open_nursery() as nursery:
        for h in range(6):
            nursery.start_soon(grant, f"h{h}")
            nursery.start_soon(flush, f"h{h}", 0)
    used = await db.fetchval("SELECT token_used FROM users WHERE id = $1", user)
    assert used == 6 * 10 * 7
    leased = await db.fetchval("SELECT sum(tokens) FROM quota_leases WHERE user_id = $1", user)
    assert leased <= sum(granted)
