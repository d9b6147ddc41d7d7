"""Readiness: a periodic database check on its own short-timeout connection feeds health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from grpc_health.v1 import health, health_pb2
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config import Settings
from service.db.engine import pooler_connect_args
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _probe_engine(settings: Settings) -> AsyncEngine:
    """The probe's own engine on DATABASE_URL (readiness follows the primary).

    AUTOCOMMIT: the probe is one statement, so no BEGIN/ROLLBACK round trips and never a
    session seen "idle in transaction" between its SELECT and ROLLBACK. Behind a
    transaction-mode pooler (DB_PGBOUNCER) a statement outside a transaction may be
    prepared on one server connection and executed on another, so there the probe runs
    in a transaction, with the pooler's asyncpg recipe and no startup parameters.
    """
    connect_args: dict[str, Any] = {"timeout": settings.health_check_timeout}
    pooled = (
        settings.db_pgbouncer and make_url(settings.database_url).get_backend_name() == "postgresql"
    )
    if pooled:
        connect_args.update(pooler_connect_args())
    return create_async_engine(
        settings.database_url,
        isolation_level="READ COMMITTED" if pooled else "AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
        pool_timeout=settings.health_check_timeout,
        connect_args=connect_args,
    )


class ReadinessMonitor:
    """Flips the readiness services between SERVING and NOT_SERVING with the database.

    The probe has a connection of its own (never a slot of the service's pool: an
    exhausted pool is not a lost database), kept between probes and dropped when a
    probe fails, so the next one reconnects. Each probe runs every
    HEALTH_CHECK_INTERVAL with a timeout of HEALTH_CHECK_TIMEOUT; both are capped
    so a change shows within 5 seconds.
    """

    def __init__(
        self,
        settings: Settings,
        servicer: health.aio.HealthServicer,
        services: Sequence[str],
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_change = on_change
        self._servicer = servicer
        self._services = tuple(services)
        self._engine: AsyncEngine = _probe_engine(settings)
        self._task: asyncio.Task[None] | None = None
        self.ready: bool | None = None

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self._settings.health_check_timeout + 0.5):
                async with self._engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
            return True
        except Exception as error:  # any failure means "not ready"
            log.debug("readiness check failed: %r", error)
            await self._engine.dispose()
            return False

    async def update(self) -> bool:
        ready = await self.check()
        if ready != self.ready:
            if self.ready is not None:
                log.warning("database %s", "reachable again" if ready else "unreachable")
            self.ready = ready
            for name in self._services:
                await self._servicer.set(name, SERVING if ready else NOT_SERVING)
                if self._on_change is not None:
                    self._on_change(name, ready)
        return ready

    async def start(self) -> None:
        await self.update()
        self._task = asyncio.create_task(self._run(), name="readiness-monitor")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.health_check_interval)
            await self.update()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._engine.dispose()
