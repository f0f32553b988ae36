"""Store-level exceptions: the only database errors the rest of the gateway sees.

This module owns the `StoreError` hierarchy. `store.db` translates driver (asyncpg)
exceptions into these at one boundary, always with ``raise ... from exc``, so callers never
import or catch driver types. It must not import asyncpg, trio_asyncio or anything outside
the standard library.
"""

from __future__ import annotations


class StoreError(Exception):
    """A database operation failed.

    `sqlstate` is the five-character SQLSTATE code when the server reported one, and
    `constraint` the name of the violated constraint for integrity errors.
    """

    def __init__(
        self, message: str, *, sqlstate: str | None = None, constraint: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class UniqueViolation(StoreError):
    """A UNIQUE or PRIMARY KEY constraint rejected the row (SQLSTATE 23505)."""


class CheckViolation(StoreError):
    """A CHECK constraint rejected the row (SQLSTATE 23514)."""


class ForeignKeyViolation(StoreError):
    """A FOREIGN KEY constraint rejected the change (SQLSTATE 23503)."""


class ConnectionLost(StoreError):
    """The server could not be reached, or the connection broke mid-operation.

    The outcome of a statement that was in flight is unknown; retrying is safe only for
    idempotent work.
    """
