"""A user's limits reloaded while requests are in flight: the same Account is updated, so
the in-flight requests' reservations and usage still settle on it (real Postgres)."""

from __future__ import annotations

from store.db import Database
from store.users import create_user
from workers.accounts import Accounts


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
