"""``airgate migrate``: apply pending migrations and exit."""

from __future__ import annotations

from proxy.serve import open_database_for
from proxy.settings import Settings
from store.migrate import apply_migrations


async def migrate(settings: Settings) -> None:
    async with open_database_for(settings) as db:
        applied = await apply_migrations(db)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
