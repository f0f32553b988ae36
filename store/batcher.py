"""The usage batcher: an actor that flushes usage records to Postgres in batches.

Owns the queue of records not yet written. Producers hold a clone of ``sender``; a record
handed over is never dropped: a failed flush is retried (the write is idempotent by
request id), and when every sender is closed the batcher drains and flushes what is left,
shielded from cancellation, before ``run`` returns. Imports ``store.usage`` and
``observability``.
"""

from __future__ import annotations

import logging

import trio

from observability.metrics import Metrics
from store.db import Database
from store.errors import ConnectionLost, StoreError
from store.usage import UsageRecord, write_usage

log = logging.getLogger("airgate.batcher")


class UsageBatcher:
    """Collects ``UsageRecord`` s and writes them on size or interval, whichever first."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        batch_size: int = 500,
        interval_s: float = 1.0,
        inbox_size: int = 100_000,
        final_flush_timeout_s: float = 30.0,
        holder: str = "",
    ) -> None:
        self._db = db
        self._holder = holder
        self._metrics = metrics
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._final_timeout_s = final_flush_timeout_s
        self.sender, self._inbox = trio.open_memory_channel[UsageRecord](inbox_size)
        self._pending: list[UsageRecord] = []
        self.written = 0
        self.rejected: list[UsageRecord] = []  # records the database refused outright

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush until every sender is closed, then flush the rest and return."""
        task_status.started()
        try:
            async with self._inbox:
                await self._loop()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._final_timeout_s):
                self._drain_nowait()
                while self._pending:
                    if not await self._flush():
                        await trio.sleep(0.2)
            if self._pending:
                log.error("usage batcher stopped with %d records unwritten", len(self._pending))

    async def _loop(self) -> None:
        next_flush = trio.current_time() + self._interval_s
        failures = 0
        while True:
            with trio.move_on_at(next_flush):
                while len(self._pending) < self._batch_size:
                    try:
                        record = await self._inbox.receive()
                    except trio.EndOfChannel:
                        return
                    self._pending.append(record)
                    self._metrics.batch_pending.set(len(self._pending))
            if self._pending:
                if await self._flush():
                    failures = 0
                else:
                    failures += 1
            # After a failure back off exponentially; the records stay pending.
            backoff = min(2**failures, 30) if failures else 1
            next_flush = trio.current_time() + self._interval_s * backoff

    def _drain_nowait(self) -> None:
        while True:
            try:
                self._pending.append(self._inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def _write_singly(self, batch: list[UsageRecord]) -> int:
        inserted = 0
        for record in batch:
            try:
                inserted += await write_usage(self._db, [record], self._holder)
            except ConnectionLost:
                raise
            except StoreError as exc:
                self.rejected.append(record)
                self._metrics.batch_rejected.inc()
                log.error("usage record refused by the database, kept in the log: %r (%s)",
                          record, exc)
        return inserted

    async def _flush(self) -> bool:
        """Write up to one batch; return False (and keep the records) on failure."""
        batch = self._pending[: self._batch_size]
        started = trio.current_time()
        try:
            inserted = await write_usage(self._db, batch, self._holder)
        except ConnectionLost as exc:
            self._metrics.batch_failures.inc()
            log.warning("usage flush of %d records failed: %s", len(batch), exc)
            return False
        except StoreError as exc:
            # The database refused the batch itself: find the record(s) it refuses so one
            # bad record cannot hold back every other bill forever.
            log.warning("usage batch refused (%s); writing its records one by one", exc)
            try:
                inserted = await self._write_singly(batch)
            except ConnectionLost:
                self._metrics.batch_failures.inc()
                return False  # those written already are skipped on retry (request id)
        del self._pending[: len(batch)]
        self.written += inserted
        self._metrics.batch_written.inc(inserted)
        self._metrics.batch_flush.observe(max(trio.current_time() - started, 0.0))
        self._metrics.batch_pending.set(len(self._pending))
        return True

