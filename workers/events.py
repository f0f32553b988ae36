"""Change events between gateway processes, over Postgres LISTEN/NOTIFY.

Owns how a change made through one process (a revoked key, a user's new plan or status,
an upstream key edited by an admin, a new price) reaches every process's in-memory state.
``publish_*`` applies the change locally at once and NOTIFYs the others; ``run`` listens
and applies what the others publish. Applying is idempotent, so a process also applying
its own notification does no harm. When the listening connection is lost, everything
cached is reloaded before listening again, so a missed notification is not lost.
"""

from __future__ import annotations

import logging

import trio

from store.db import Database
from store.errors import StoreError
from store.upstream_keys import get_upstream_key, list_upstream_keys
from workers.accounts import Accounts
from workers.catalog import Catalog
from workers.pool import KeyPool

log = logging.getLogger("airgate.events")

CHANNEL = "airgate_changes"


class Events:
    def __init__(self, db: Database, accounts: Accounts, pool: KeyPool, catalog: Catalog):
        self._db = db
        self._accounts = accounts
        self._pool = pool
        self._catalog = catalog

    # -- publishing (local first, then everyone else) ------------------------------------

    async def key_revoked(self, digest: bytes) -> None:
        await self._publish(f"apikey:{digest.hex()}")

    async def user_changed(self, user_id: str) -> None:
        await self._publish(f"user:{user_id}")

    async def upstream_key_changed(self, key_id: str) -> None:
        await self._publish(f"upstream:{key_id}")

    async def catalog_changed(self) -> None:
        await self._publish("catalog")

    async def _publish(self, payload: str) -> None:
        await self._apply(payload)
        try:
            await self._db.notify(CHANNEL, payload)
        except StoreError as exc:  # the others reload on their next reconnect
            log.warning("could not notify other processes of %s: %s", payload, exc)

    # -- applying -------------------------------------------------------------------------

    async def _apply(self, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        if kind == "apikey":
            try:
                self._accounts.forget_key(bytes.fromhex(ident))
            except ValueError:
                log.warning("malformed change event %r", payload)
        elif kind == "user":
            await self._accounts.reload(ident)
        elif kind == "upstream":
            key = await get_upstream_key(self._db, ident)
            if key is None:
                self._pool.remove(ident)
            else:
                await self._pool.put_if_changed(key)
        elif kind == "catalog":
            await self._catalog.reload(self._db)
        else:
            log.warning("unknown change event %r", payload)

    async def _reload_everything(self) -> None:
        await self._accounts.reload_all()
        await self._catalog.reload(self._db)
        await self._pool.apply(await list_upstream_keys(self._db))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                async with self._db.listen(CHANNEL) as changes:
                    if not started:
                        started = True
                        task_status.started()
                    else:
                        await self._reload_everything()
                    async for payload in changes:
                        await self._apply(payload)
            except StoreError as exc:
                log.warning("change listener lost its connection: %s", exc)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(1.0)  # reconnect (then reload) after a short pause
