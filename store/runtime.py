"""Opening the store for a process: the trio-asyncio loop, the pool and the cluster.

Owns the one place where the asyncio bridge is entered, so nothing above ``store``
imports trio_asyncio, and the choice between ``database_url`` and an embedded cluster.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio_asyncio

from store.cluster import EmbeddedCluster
from store.db import Database, open_database

log = logging.getLogger("airgate.store")


@asynccontextmanager
async def open_embedded_cluster(data_dir: str) -> AsyncIterator[str]:
    """Start (or reuse) the private cluster in ``data_dir``; yield its DSN; stop it on
    the way out unless another process still uses it."""
    cluster = EmbeddedCluster(Path(data_dir) / "pgdata")
    dsn = await trio.to_thread.run_sync(cluster.start)
    try:
        yield dsn
    finally:
        with trio.CancelScope(shield=True):
            if not await trio.to_thread.run_sync(cluster.stop_unless_in_use):
                log.warning("the embedded database in %s is still used by another process;"
                            " left running", data_dir)


@asynccontextmanager
async def open_store(dsn: str, *, pool_size: int) -> AsyncIterator[Database]:
    """A connection pool usable from every trio task of this run."""
    async with trio_asyncio.open_loop(), open_database(
        dsn, min_size=1, max_size=pool_size
    ) as db:
        yield db
