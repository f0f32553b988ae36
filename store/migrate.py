"""Schema migrations: apply ``store/migrations/NNNN_*.sql`` in order, exactly once.

This module owns the ``schema_migrations`` table and the order and atomicity of schema
changes. Each migration runs in its own transaction together with the row recording it,
under a transaction-level advisory lock, so several processes starting at once apply each
file once and never see a half-applied one. It talks to the database only through
`store.db.Database`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from store.db import Connection, Database

# An arbitrary constant shared by every airgate process: the advisory lock key.
MIGRATION_LOCK_KEY = 0x41495247  # "AIRG"
_FILE_NAME = re.compile(r"(\d{4})_[A-Za-z0-9_]+\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: str  # the file name without ".sql", e.g. "0001_init"
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged migration files, in version order."""
    directory = resources.files("store") / "migrations"
    found: dict[str, Migration] = {}
    for entry in directory.iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            continue
        number = match.group(1)
        if number in found:
            raise ValueError(f"two migrations numbered {number}: {found[number].version}, "
                             f"{entry.name}")
        found[number] = Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8"))
    return [found[number] for number in sorted(found)]


async def _lock(conn: Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)


async def apply_migrations(db: Database) -> list[str]:
    """Apply the pending migrations; return the versions applied (empty when up to date)."""
    migrations = load_migrations()
    async with db.transaction() as conn:
        await _lock(conn)
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version FROM schema_migrations")
    done = {row["version"] for row in rows}
    applied: list[str] = []
    for migration in migrations:
        if migration.version in done:
            continue
        async with db.transaction() as conn:
            await _lock(conn)
            # Another process may have applied it while we waited for the lock.
            if await conn.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
            ):
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
            )
        applied.append(migration.version)
    return applied
