"""A user's limits reloaded while requests are in flight: the same Account is updated, so
the in-flight requests' reservations and usage still settle on it (real Postgres)."""

from __future__ import annotations

import secrets

import pytest
import trio
from trio.testing import MockClock

from store.db import Database
from store.quota import lease_of
from store.usage import UsageRecord, write_usage
from store.users import create_user
from workers.accounts import Account, Accounts
from workers.errors import QuotaExceeded


async def test_reload_updates_the_cached_account_in_place(db: Database) -> None:
    user = await create_user(db, email="reload@airgate.test", password_hash="x",
                             token_limit=100_000)
    accounts = Accounts(db, "holder-a")
    account = await accounts.account(user.id)
    in_flight = [await accounts.check(account, "any", 10, 1000) for _ in range(3)]
    assert all(budget > 0 for budget in in_flight)
    assert account.reserved == 30

    await db.execute("UPDATE users SET token_limit = 50000 WHERE id = $1", user.id)
    await accounts.reload(user.id)  # e.g. an admin edit or a payment, mid-flight

    assert await accounts.account(user.id) is account
    assert account.token_limit == 50_000
    assert account.lease_left == 0  # the unspent lease went back to the database
    for _ in in_flight:  # the in-flight requests end and settle on the same object
        accounts.settle(account, 10, 40)
    assert account.reserved == 0
    assert account.token_used == 120
    # The next request is granted against the new limit, from a fresh lease.
    budget = await accounts.check(account, "any", 10, 1000)
    assert 1000 <= budget <= 50_000 - 120
    accounts.settle(account, 10, 5)
    assert account.reserved == 0


async def test_a_deleted_user_drops_out_of_the_cache(db: Database) -> None:
    user = await create_user(db, email="gone@airgate.test", password_hash="x",
                             token_limit=1000)
    accounts = Accounts(db, "holder-a")
    await accounts.account(user.id)
    await db.execute("DELETE FROM users WHERE id = $1", user.id)
    await accounts.reload(user.id)
    assert user.id not in accounts._users


async def test_concurrent_first_requests_share_one_account_and_one_lease(db: Database) -> None:
    """A burst of first requests for an uncached user: every one gets the same Account,
    so the lease the database granted is the lease the process spends from (before,
    each built its own Account and lease; the cache kept one, the database held them
    all, and the user was refused with quota left)."""
    user = await create_user(db, email="burst@airgate.test", password_hash="x",
                             token_limit=100_000)
    accounts = Accounts(db, "holder-a")
    seen: list[Account] = []

    async def first_request() -> None:
        account = await accounts.account(user.id)
        await accounts.check(account, "any", 10, 1000)
        seen.append(account)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(first_request)
    assert len(seen) == 20
    assert all(account is seen[0] for account in seen)
    account = seen[0]
    assert account.reserved == 200
    assert await lease_of(db, user.id, "holder-a") == account.lease_left


async def _spend(db: Database, accounts: Accounts, account: Account, tokens: int) -> None:
    """A request ends having used ``tokens``: charged in memory, then flushed as the
    usage batcher does."""
    accounts.settle(account, 10, tokens)
    record = UsageRecord(
        request_id=f"r-{secrets.token_hex(6)}", user_id=account.user_id,
        api_key_id=None, upstream_key_id=None, model="m", endpoint="chat", prompt_tokens=10,
        cached_tokens=0, completion_tokens=tokens - 10, cost_micro=0, latency_ms=1,
        ttft_ms=None, status=200, usage_source="upstream")
    assert await write_usage(db, [record], accounts.holder) == 1


async def test_an_exhausted_user_is_refused_from_memory_until_a_reload(
    db: Database, mock_clock: MockClock
) -> None:
    """Past the limit, refusals cost no database round trip for a second (a raise of the
    limit behind the gateway's back is not seen yet), then the database is asked again;
    a reload (payment, coupon, admin edit) is seen at once."""
    user = await create_user(db, email="dry@airgate.test", password_hash="x",
                             token_limit=1000)
    accounts = Accounts(db, "holder-a")
    account = await accounts.account(user.id)
    await _spend(db, accounts, account, await accounts.check(account, "any", 10, 1000))
    with pytest.raises(QuotaExceeded):
        await accounts.check(account, "any", 10, 1000)

    await db.execute("UPDATE users SET token_limit = 2000 WHERE id = $1", user.id)
    mock_clock.jump(0.5)
    with pytest.raises(QuotaExceeded):  # answered from memory: the raise is not seen
        await accounts.check(account, "any", 10, 1000)
    mock_clock.jump(0.6)
    budget = await accounts.check(account, "any", 10, 1000)  # the database is asked again
    assert budget == 1000
    await _spend(db, accounts, account, budget)
    with pytest.raises(QuotaExceeded):
        await accounts.check(account, "any", 10, 1000)

    await db.execute("UPDATE users SET token_limit = 9000 WHERE id = $1", user.id)
    with pytest.raises(QuotaExceeded):
        await accounts.check(account, "any", 10, 1000)
    await accounts.reload(user.id)  # e.g. a coupon redeemed: seen at once
    assert await accounts.check(account, "any", 10, 1000) >= 1000
