"""The composition root: ``serve()`` builds every component and starts it in order.

Order: database (embedded cluster when no URL), migrations, first-start data, catalogue,
usage batcher, upstream client and key actors, HTTP. Shutdown (SIGINT/SIGTERM or the
``stop`` event) runs in reverse: stop accepting and give in-flight requests the grace
period, then close the batcher's inbox so it flushes every record, then the rest.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from observability.metrics import Metrics
from proxy.app import build_app
from proxy.batch_accept import install as install_batch_accept
from proxy.direct_send import configure
from proxy.gateway import Gateway
from proxy.h2_schedule import install as install_h2_schedule
from proxy.metrics_wiring import register_snapshots
from proxy.settings import Settings
from proxy.v1_door import V1Door
from store.batcher import UsageBatcher
from store.bootstrap import ensure_admin, jwt_secret
from store.db import Database
from store.errors import StoreError
from store.migrate import apply_migrations
from store.quota import release_leases
from store.runtime import open_embedded_cluster, open_store
from store.upstream_keys import disable_upstream_key, list_upstream_keys
from workers.accounts import Accounts
from workers.catalog import Catalog
from workers.dispatch import Dispatcher
from workers.events import Events
from workers.overload import Admission
from workers.passwords import hash_password
from workers.payments import Payments
from workers.pool import KeyPool
from workers.throttle import FailureThrottle
from workers.upstream import UpstreamClient
from workers.wxpay_env import merchant_config_from_env

log = logging.getLogger("airgate")


@asynccontextmanager
async def open_database_for(settings: Settings) -> AsyncIterator[Database]:
    async with AsyncExitStack() as stack:
        dsn = settings.database_url
        if not dsn:
            dsn = await stack.enter_async_context(open_embedded_cluster(settings.data_dir))
        db = await stack.enter_async_context(open_store(dsn, pool_size=settings.db_pool_size))
        yield db


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """One of several worker processes sharing a listening socket (``proxy.supervisor``)."""

    index: int
    count: int
    fd: int


def _hypercorn_config(settings: Settings, slot: WorkerSlot | None) -> Config:
    config = Config()
    config.bind = [f"fd://{slot.fd}"] if slot else [f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_s
    config.keep_alive_timeout = 75
    # A full accept queue drops SYNs and clients retry after 1 s, 3 s...: under overload
    # it is better to accept and refuse at once (429 + retry-after) than to leave them there.
    config.backlog = settings.listen_backlog
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    return config


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("shutdown requested")
            stop.set()
            return


async def serve(
    settings: Settings,
    *,
    stop: trio.Event | None = None,
    on_ready: Callable[[Gateway, list[str]], Awaitable[None]] | None = None,
    slot: WorkerSlot | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``stop`` is set (or SIGINT/SIGTERM)."""
    stop = trio.Event() if stop is None else stop
    async with open_database_for(settings) as db:
        applied = await apply_migrations(db)
        if applied:
            log.info("applied migrations %s", ", ".join(applied))
        secret = await jwt_secret(db, settings.jwt_secret)
        if settings.admin_email and await ensure_admin(
            db, settings.admin_email, await hash_password(settings.admin_password)
        ):
            log.info("created the first admin %s", settings.admin_email)
        metrics = Metrics()
        catalog = Catalog()
        await catalog.reload(db)
        client = UpstreamClient(connect_timeout_s=settings.connect_timeout_s,
                                max_connections=settings.upstream_max_connections)
        # This process's name on its quota leases (store.quota).
        holder = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        batcher = UsageBatcher(db, metrics, batch_size=settings.flush_batch_size,
                               interval_s=settings.flush_interval_s, holder=holder)

        async def on_disable(key_id: str, reason: str) -> None:
            await disable_upstream_key(db, key_id, reason)

        pool = KeyPool(client, metrics, inbox_size=settings.actor_inbox_size,
                       first_byte_timeout_s=settings.first_byte_timeout_s,
                       idle_timeout_s=settings.idle_timeout_s, on_disable=on_disable,
                       share=(slot.index, slot.count) if slot else (0, 1),
                       pump=settings.upstream_pump)
        admission = Admission(settings.overload_lag_ms / 1000,
                              hold_max_s=settings.refusal_hold_ms / 1000)
        register_snapshots(metrics, pool, db, admission)
        worker_index = str(slot.index if slot else 0)
        metrics.snapshots.add("airgate_worker", "This process's worker index", ["index"],
                              lambda: [((worker_index,), 1.0)])
        accounts = Accounts(db, holder)
        events = Events(db, accounts, pool, catalog)
        payments = Payments(
            db, events, merchant_config_from_env(os.environ),
            rebate_percent=settings.invite_rebate_percent,
            reconcile_interval_s=settings.reconcile_interval_s,
            timeout_s=10.0, connect_timeout_s=settings.connect_timeout_s,
        )
        if payments.sandbox:
            log.warning("payments run in SANDBOX mode: orders can be paid without money;"
                        " set AIRGATE_WXPAY_* for a real merchant")
        async with trio.open_nursery() as outer:
            await outer.start(batcher.run)
            dispatcher = Dispatcher(pool, accounts, catalog, batcher.sender.clone(), metrics,
                                    max_attempts=settings.max_attempts,
                                    dispatch_wait_s=settings.dispatch_wait_s,
                                    admission=admission)
            batcher.sender.close()
            async with trio.open_nursery() as inner:
                await inner.start(pool.run)
                await pool.apply(await list_upstream_keys(db))
                await inner.start(payments.run)
                await inner.start(events.run)
                await inner.start(accounts.run)
                gw = Gateway(
                    settings, db, metrics, pool, accounts, catalog, dispatcher, payments, events,
                    FailureThrottle(settings.login_failures_per_account, 900),
                    FailureThrottle(settings.login_failures_per_ip, 900), secret,
                    admission,
                )
                await inner.start(admission.run)
                inner.start_soon(_signals, stop)
                async with trio.open_nursery() as http:
                    config = _hypercorn_config(settings, slot)
                    configure(config, direct_send=settings.direct_send, door=V1Door(gw))
                    install_batch_accept()
                    install_h2_schedule()
                    binds = await http.start(_serve_http, build_app(gw), config, stop)
                    log.info("airgate listening on %s", ", ".join(binds))
                    # On an inherited socket hypercorn reports the fd, not an address.
                    own_url = f"http://{settings.host}:{settings.port}" if slot else binds[0]
                    payments.bind(settings.public_url or own_url)
                    if on_ready is not None:
                        await on_ready(gw, binds)
                    task_status.started(binds)
                # hypercorn returned: no new requests, in-flight ones finished or were cut.
                inner.cancel_scope.cancel()
            # HTTP is down and in-flight requests have billed: flush everything.
            await dispatcher.close()
        # Every record is written: what this process leased and did not spend goes back.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await release_leases(db, holder)
            except StoreError as exc:  # they lapse on their own (store.quota.LEASE_TTL)
                log.warning("could not release quota leases: %s", exc)
        with trio.CancelScope(shield=True):
            await client.aclose()
            await payments.aclose()


async def _serve_http(
    app: object, config: Config, stop: trio.Event,
    *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait,  # type: ignore[arg-type]
                          task_status=task_status)
