"""Readiness: a periodic database check on its own short-timeout connection feeds health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config import Settings
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        # AUTOCOMMIT: the probe is one statement, so no BEGIN/ROLLBACK round trips and
        # never a session seen "idle in transaction" between its SELECT and ROLLBACK.
        self._engine: AsyncEngine = create_async_engine(
            settings.database_url,
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            max_overflow=0,
            pool_timeout=settings.health_check_timeout,
            connect_args={"timeout": settings.health_check_timeout},
        )
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
