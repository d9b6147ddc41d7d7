"""Purges of tables that only grow: idempotency records past their TTL, and (when
USER_RETENTION_DAYS is set) users soft-deleted longer ago than that."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from service.config import Settings
from service.db.types import utcnow
from service.errors import Unavailable
from service.repositories.uow import Store
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Purger:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._task: asyncio.Task[None] | None = None

    async def purge_once(self) -> tuple[int, int]:
        settings = self._settings
        now = utcnow()
        async with self._store.unit_of_work() as uow:
            records = await uow.idempotency.purge(
                now - timedelta(hours=settings.idempotency_ttl_hours)
            )
            users = 0
            if settings.user_retention_days is not None:
                users = await uow.users.purge_deleted(
                    now - timedelta(days=settings.user_retention_days)
                )
        if records or users:
            log.info("purged %d idempotency records and %d deleted users", records, users)
        return records, users

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
