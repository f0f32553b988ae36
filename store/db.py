"""The database handle for trio code: asyncpg run through trio-asyncio.

This module owns the connection pool and the one boundary where driver exceptions become
`store.errors` exceptions. Together with `store.migrate` it is the only place that may
import asyncpg or trio_asyncio; nothing outside `store` may.

trio-asyncio keeps its loop in a contextvar that only tasks spawned inside
``trio_asyncio.open_loop()`` can see. A `Database` therefore captures the loop when it is
opened and hands every asyncpg coroutine to ``loop.run_aio_coroutine``, so it works from any
task of the same trio run (hypercorn request tasks, pytest-trio tests, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio

from store.errors import (
    CheckViolation,
    ConnectionLost,
    ForeignKeyViolation,
    StoreError,
    UniqueViolation,
)

T = TypeVar("T")
Row = Mapping[str, Any]

# Must-finish cleanup (commit, rollback, release, unlisten) is shielded from the caller's
# cancellation but bounded by this deadline so a dead server cannot hang shutdown.
CLEANUP_TIMEOUT_S = 10.0
_AIO_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    OSError,
)


def translate(exc: Exception) -> StoreError:
    """Map a driver exception to the matching `StoreError` (the caller raises it)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate
        constraint = getattr(exc, "constraint_name", None)
        error_type: type[StoreError] = StoreError
        if isinstance(exc, asyncpg.UniqueViolationError):
            error_type = UniqueViolation
        elif isinstance(exc, asyncpg.CheckViolationError):
            error_type = CheckViolation
        elif isinstance(exc, asyncpg.ForeignKeyViolationError):
            error_type = ForeignKeyViolation
        elif isinstance(exc, _AIO_CONNECTION_ERRORS):
            error_type = ConnectionLost
        return error_type(message, sqlstate=sqlstate, constraint=constraint)
    if isinstance(exc, OSError | asyncpg.InternalClientError):
        # InternalClientError: the protocol is in a state it cannot leave (seen after the
        # server killed the backend mid-transaction); the connection is unusable.
        return ConnectionLost(message)
    return StoreError(message)


class _Runner:
    """Runs asyncpg coroutine functions on a captured trio-asyncio loop, translating errors."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async def in_asyncio() -> T:
            return await fn(*args, **kwargs)

        try:
            result: T = await self._loop.run_aio_coroutine(in_asyncio())
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError) as exc:
            raise translate(exc) from exc
        return result

    async def finish(self, fn: Callable[..., Awaitable[object]], *args: Any) -> bool:
        """Run must-finish cleanup shielded and bounded; False if it failed or timed out."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLEANUP_TIMEOUT_S
            try:
                await self.call(fn, *args)
            except StoreError:
                return False
        return not scope.cancelled_caught


class Connection:
    """One pooled connection, as handed out by `Database.transaction`."""

    def __init__(self, raw: asyncpg.pool.PoolConnectionProxy[Any], runner: _Runner) -> None:
        self._raw = raw
        self._run = runner
        self._lost = False
        raw.add_termination_listener(self._on_terminate)

    def _on_terminate(self, _conn: object) -> None:
        self._lost = True

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            return await self._run.call(fn, *args, **kwargs)
        except StoreError as exc:
            # asyncpg hands a dead connection back to its pool and then reports "released
            # back to the pool" (an InterfaceError) to whoever still holds it.
            if self._lost and not isinstance(exc, ConnectionLost):
                raise ConnectionLost(f"connection lost: {exc}") from exc
            raise

    def _forget(self) -> None:
        with contextlib.suppress(asyncpg.InterfaceError):  # already back in the pool
            self._raw.remove_termination_listener(self._on_terminate)

    def _terminate(self) -> None:
        with contextlib.suppress(asyncpg.InterfaceError):  # already back in the pool
            self._raw.terminate()

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._call(self._raw.execute, sql, *args)

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        await self._call(self._raw.executemany, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._call(self._raw.fetch, sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self._call(self._raw.fetchrow, sql, *args)
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call(self._raw.fetchval, sql, *args)

    async def copy_records_to_table(
        self, table: str, records: Iterable[Sequence[Any]], columns: Sequence[str]
    ) -> None:
        await self._call(
            self._raw.copy_records_to_table, table, records=records, columns=list(columns)
        )


class Database:
    """A pool of connections usable from any trio task of the run that opened it.

    Single statements run on whichever pooled connection is free and are autocommitted;
    use `transaction()` to group statements.
    """

    def __init__(self, pool: asyncpg.Pool[Any], runner: _Runner) -> None:
        self._pool = pool
        self._run = runner

    def pool_stats(self) -> tuple[int, int, int]:
        """(open connections, idle connections, maximum size) of the pool, for metrics."""
        return self._pool.get_size(), self._pool.get_idle_size(), self._pool.get_max_size()

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._run.call(self._pool.execute, sql, *args)

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        await self._run.call(self._pool.executemany, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._run.call(self._pool.fetch, sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self._run.call(self._pool.fetchrow, sql, *args)
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run.call(self._pool.fetchval, sql, *args)

    async def copy_records_to_table(
        self, table: str, records: Iterable[Sequence[Any]], columns: Sequence[str]
    ) -> None:
        await self._run.call(
            self._pool.copy_records_to_table, table, records=records, columns=list(columns)
        )

    async def notify(self, channel: str, payload: str) -> None:
        await self.execute("SELECT pg_notify($1, $2)", channel, payload)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Yield a connection inside a transaction: commit on success, roll back on error.

        Commit and rollback are shielded from cancellation (bounded by
        `CLEANUP_TIMEOUT_S`), so a cancelled caller never leaves a transaction open on a
        pooled connection. If a commit cannot finish, `ConnectionLost` is raised: its
        outcome is unknown.
        """
        async with self._acquire() as conn:
            tx = conn._raw.transaction()
            await conn._call(tx.start)
            try:
                yield conn
            except BaseException:
                if not await self._run.finish(tx.rollback):
                    conn._terminate()  # the server rolls back when the session ends
                raise
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_TIMEOUT_S
                await conn._call(tx.commit)
            if scope.cancelled_caught:
                conn._terminate()
                raise ConnectionLost("commit did not finish in time; its outcome is unknown")

    @contextlib.asynccontextmanager
    async def listen(
        self, channel: str, *, max_buffered: int = 1000
    ) -> AsyncIterator[trio.MemoryReceiveChannel[str]]:
        """Yield a channel of the payloads NOTIFYed on `channel` while the block runs.

        The listening connection is held for the whole block. The receive channel ends
        (``EndOfChannel``) if the consumer falls more than `max_buffered` notifications
        behind or the connection is lost; payloads may then have been missed, so callers
        should reload whatever the notifications describe and listen again.
        """
        send, receive = trio.open_memory_channel[str](max_buffered)

        def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            try:
                send.send_nowait(payload)
            except trio.WouldBlock:
                send.close()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        def on_terminate(_conn: object) -> None:
            send.close()

        async with self._acquire() as conn:
            await conn._call(conn._raw.add_listener, channel, on_notify)
            conn._raw.add_termination_listener(on_terminate)
            try:
                with receive:
                    yield receive
            finally:
                send.close()
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn._raw.remove_termination_listener(on_terminate)
                if not await self._run.finish(conn._raw.remove_listener, channel, on_notify):
                    conn._terminate()  # the pool replaces a broken connection

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Connection]:
        raw = await self._run.call(self._pool.acquire)
        conn = Connection(raw, self._run)
        try:
            yield conn
        finally:
            conn._forget()
            if not await self._run.finish(self._pool.release, raw):
                conn._terminate()


@contextlib.asynccontextmanager
async def open_database(dsn: str, *, min_size: int = 1, max_size: int = 10) -> AsyncIterator[
    Database
]:
    """Open a connection pool on `dsn`; close it (gracefully, bounded) on exit.

    Must be entered from a task inside ``async with trio_asyncio.open_loop()``; the
    `Database` may then be used from any task of the same trio run until this block exits.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise StoreError("open_database() must run inside `async with trio_asyncio.open_loop()`")
    runner = _Runner(loop)

    async def create() -> asyncpg.Pool[Any]:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size
        )
        return pool

    pool = await runner.call(create)
    try:
        yield Database(pool, runner)
    finally:
        if not await runner.finish(pool.close):
            pool.terminate()
