"""Purges of tables that only grow: idempotency records past their TTL (with the responses
they store), and (when USER_RETENTION_DAYS is set) users soft-deleted longer ago than
that, with their posts. In small batches, one replica at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from service.config import Settings
from service.db.types import utcnow
from service.errors import Unavailable
from service.repositories.uow import Store, UnitOfWork
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)


# Rows per purge transaction: a batch takes milliseconds, so a purge never holds
# SQLite's write lock anywhere near busy_timeout, and on PostgreSQL never piles up locks
# or WAL in one transaction.
BATCH_ROWS = 500
# Batches per table per run (a million rows); what is left waits for the next interval.
MAX_BATCHES = 2000
# After each batch the purge pauses at least as long as the batch took (and at least
# this): other writers, which on SQLite queue on the write lock, get their turn.
MIN_PAUSE = 0.02


@dataclass(frozen=True, slots=True)
class PurgeReport:
    records: int = 0
    users: int = 0
    transactions: int = 0
    skipped: bool = False  # another replica holds the purge lock


class Purger:
    """Deletes what is due in batches of BATCH_ROWS, one short transaction each, from one
    replica at a time (an advisory lock on PostgreSQL; the others skip the run)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._task: asyncio.Task[None] | None = None

    async def purge_once(self) -> PurgeReport:
        settings = self._settings
        now = utcnow()
        async with self._store.exclusive("purge") as mine:
            if not mine:
                log.info("purge skipped: another replica is purging")
                return PurgeReport(skipped=True)
            records_before = now - timedelta(hours=settings.idempotency_ttl_hours)

            async def records(uow: UnitOfWork) -> tuple[int, bool]:
                count = await uow.idempotency.purge(records_before, limit=BATCH_ROWS)
                return count, count >= BATCH_ROWS

            purged, transactions = await self._in_batches(records)
            users = 0
            if settings.user_retention_days is not None:
                users_before = now - timedelta(days=settings.user_retention_days)

                async def deleted_users(uow: UnitOfWork) -> tuple[int, bool]:
                    gone, posts = await uow.users.purge_deleted(users_before, limit=BATCH_ROWS)
                    return gone, bool(gone or posts)

                users, user_transactions = await self._in_batches(deleted_users)
                transactions += user_transactions
        if purged or users:
            log.info(
                "purged %d idempotency records and %d deleted users in %d transactions",
                purged,
                users,
                transactions,
            )
        return PurgeReport(purged, users, transactions)

    async def _in_batches(
        self, batch: Callable[[UnitOfWork], Awaitable[tuple[int, bool]]]
    ) -> tuple[int, int]:
        """Run `batch` (rows deleted, whether more may be due) in one transaction each
        until nothing more is due or MAX_BATCHES ran; (rows, transactions)."""
        total = 0
        for transactions in range(1, MAX_BATCHES + 1):
            started = time.monotonic()
            # A batch that meets a deadlock or serialization failure runs again.
            count, more = await self._store.run(batch)
            total += count
            if not more:
                return total, transactions
            await asyncio.sleep(max(MIN_PAUSE, time.monotonic() - started))
        log.info("purge stopped after %d batches; the rest waits for the next run", MAX_BATCHES)
        return total, MAX_BATCHES

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="purger")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.purge_interval)
            try:
                await self.purge_once()
            except Unavailable:
                log.warning("purge skipped: database unavailable")
            except Exception:
                log.exception("purge failed")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
