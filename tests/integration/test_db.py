"""store.db and store.migrate against a real PostgreSQL server (see tests/conftest.py)."""

from __future__ import annotations

import pytest
import trio
import trio_asyncio

from store.db import Database, open_database
from store.errors import (
    CheckViolation,
    ConnectionLost,
    ForeignKeyViolation,
    StoreError,
    UniqueViolation,
)
from store.migrate import apply_migrations, load_migrations

_ITEMS = """
CREATE TABLE items (
    id     integer PRIMARY KEY,
    name   text NOT NULL CHECK (name <> ''),
    parent integer REFERENCES items (id)
)
"""


async def _make_items(db: Database) -> None:
    await db.execute(_ITEMS)


async def test_query_methods(db: Database) -> None:
    await _make_items(db)
    assert await db.execute("INSERT INTO items VALUES ($1, $2)", 1, "one") == "INSERT 0 1"
    await db.executemany("INSERT INTO items VALUES ($1, $2)", [(2, "two"), (3, "three")])
    await db.copy_records_to_table("items", [(4, "four", 1), (5, "five", None)],
                                   ["id", "name", "parent"])

    rows = await db.fetch("SELECT id, name, parent FROM items ORDER BY id")
    assert [(r["id"], r["name"], r["parent"]) for r in rows] == [
        (1, "one", None), (2, "two", None), (3, "three", None), (4, "four", 1), (5, "five", None)
    ]
    row = await db.fetchrow("SELECT name FROM items WHERE id = $1", 4)
    assert row is not None
    assert row["name"] == "four"
    assert await db.fetchrow("SELECT name FROM items WHERE id = $1", 99) is None
    assert await db.fetchval("SELECT count(*) FROM items") == 5


async def test_transaction_commits_on_success(db: Database) -> None:
    await _make_items(db)
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO items VALUES (1, 'one')")
        await conn.executemany("INSERT INTO items VALUES ($1, $2)", [(2, "two")])
        await conn.copy_records_to_table("items", [(3, "three")], ["id", "name"])
        assert await conn.fetchval("SELECT count(*) FROM items") == 3
        # Not visible outside the transaction before commit.
        assert await db.fetchval("SELECT count(*) FROM items") == 0
    assert await db.fetchval("SELECT count(*) FROM items") == 3


async def test_transaction_rolls_back_on_error(db: Database) -> None:
    await _make_items(db)

    async def insert_then_fail() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO items VALUES (1, 'one')")
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await insert_then_fail()
    assert await db.fetchval("SELECT count(*) FROM items") == 0


async def test_transaction_rolls_back_when_cancelled(db: Database) -> None:
    await _make_items(db)
    with trio.move_on_after(0.5) as scope:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO items VALUES (1, 'one')")
            await conn.execute("SELECT pg_sleep(30)")
    assert scope.cancelled_caught
    assert await db.fetchval("SELECT count(*) FROM items") == 0
    idle_in_transaction = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
    )
    assert idle_in_transaction == 0


async def test_constraint_errors_are_translated(db: Database) -> None:
    await _make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 'one')")

    with pytest.raises(UniqueViolation) as unique:
        await db.execute("INSERT INTO items VALUES (1, 'again')")
    assert unique.value.sqlstate == "23505"
    assert unique.value.constraint == "items_pkey"
    assert type(unique.value.__cause__).__module__.startswith("asyncpg")

    with pytest.raises(CheckViolation) as check:
        await db.execute("INSERT INTO items VALUES (2, '')")
    assert check.value.constraint == "items_name_check"

    with pytest.raises(ForeignKeyViolation):
        await db.execute("INSERT INTO items VALUES (3, 'three', 42)")

    with pytest.raises(StoreError) as syntax:
        await db.fetch("SELEC 1")
    assert type(syntax.value) is StoreError
    assert syntax.value.sqlstate == "42601"

    async def insert_good_then_duplicate() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO items VALUES (5, 'five')")
            await conn.execute("INSERT INTO items VALUES (1, 'dup')")

    # A failed statement inside a transaction rolls the whole transaction back.
    with pytest.raises(UniqueViolation):
        await insert_good_then_duplicate()
    assert await db.fetchval("SELECT count(*) FROM items") == 1


async def test_killed_backend_is_connection_lost_and_pool_recovers(db: Database) -> None:
    async def query_after_backend_killed() -> None:
        async with db.transaction() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid) is True
            await conn.fetchval("SELECT 1")

    with pytest.raises(ConnectionLost):
        await query_after_backend_killed()
    for _ in range(20):  # more than the pool size: every pooled connection works
        assert await db.fetchval("SELECT 1") == 1


async def test_unreachable_server_is_connection_lost() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        async with trio_asyncio.open_loop():
            with pytest.raises(ConnectionLost):
                async with open_database(f"postgresql://airgate@127.0.0.1:{port}/airgate"):
                    pass


async def test_open_database_outside_open_loop_is_refused(pg_dsn: str) -> None:
    with pytest.raises(StoreError, match="open_loop"):
        async with open_database(pg_dsn):
            pass


async def test_cancelled_query_raises_cancelled_and_pool_stays_usable(pg_dsn: str) -> None:
    async with trio_asyncio.open_loop(), open_database(pg_dsn, min_size=1, max_size=1) as db:
        saw_cancelled = False
        with trio.move_on_after(0.3) as scope:
            try:
                await db.fetchval("SELECT pg_sleep(30)")
            except trio.Cancelled:
                saw_cancelled = True
                raise
        assert scope.cancelled_caught
        assert saw_cancelled
        # The single pooled connection is usable again, and the server stopped sleeping.
        assert await db.fetchval("SELECT 2") == 2
        sleeping = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
            " AND pid <> pg_backend_pid()"
        )
        assert sleeping == 0


async def test_listen_notify(db: Database) -> None:
    async with db.listen("events") as received:
        await db.notify("events", "hello")
        await db.notify("other", "ignored")
        await db.notify("events", "world")
        with trio.fail_after(5):
            assert await received.receive() == "hello"
            assert await received.receive() == "world"


async def test_listen_channel_ends_when_consumer_falls_behind(db: Database) -> None:
    async with db.listen("events", max_buffered=2) as received:
        for i in range(5):
            await db.notify("events", str(i))
        with trio.fail_after(5):
            # Receiving now would hand payloads straight to us and never overflow, so wait
            # for the listener to give up first; it signals nothing else we could await.
            while received.statistics().open_send_channels:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert [payload async for payload in received] == ["0", "1"]
    assert await db.fetchval("SELECT 1") == 1


async def test_database_is_usable_from_a_task_outside_open_loop(pg_dsn: str) -> None:
    async def owner(task_status: trio.TaskStatus[Database]) -> None:
        async with trio_asyncio.open_loop(), open_database(pg_dsn) as database:
            task_status.started(database)
            await trio.sleep_forever()

    results: list[int] = []

    async def sibling(database: Database) -> None:
        assert trio_asyncio.current_loop.get() is None  # really outside the loop's context
        results.append(await database.fetchval("SELECT 41 + 1"))
        async with database.transaction() as conn:
            results.append(await conn.fetchval("SELECT 7"))

    async with trio.open_nursery() as nursery:
        database = await nursery.start(owner)
        async with trio.open_nursery() as siblings:
            for _ in range(3):
                siblings.start_soon(sibling, database)
        nursery.cancel_scope.cancel()
    assert sorted(results) == [7, 7, 7, 42, 42, 42]


async def test_migrations_already_applied_in_template(db: Database) -> None:
    assert await apply_migrations(db) == []
    versions = await db.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in versions] == [m.version for m in load_migrations()]


async def test_migrations_apply_once_even_when_raced(empty_pg_dsn: str) -> None:
    applied: list[list[str]] = []

    async def migrate() -> None:
        async with open_database(empty_pg_dsn, max_size=2) as database:
            applied.append(await apply_migrations(database))

    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(migrate)
            nursery.start_soon(migrate)
        expected = [m.version for m in load_migrations()]
        assert expected[0] == "0001_init"
        # Each file is applied exactly once, in order, whichever process got to it first.
        assert sorted(v for versions in applied for v in versions) == expected
        assert all(versions == sorted(versions) for versions in applied)

        async with open_database(empty_pg_dsn) as database:
            assert await apply_migrations(database) == []
            count = await database.fetchval("SELECT count(*) FROM schema_migrations")
            assert count == len(expected)
            assert await database.fetchval("SELECT to_regclass('users')::text") == "users"
