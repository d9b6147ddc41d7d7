"""Where a session goes: writes to the primary; reads to the replica (DATABASE_READ_URL)
unless the caller asked for a strong read or the replica is unreachable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from service.db.engine import Mode, SessionFactories

log = logging.getLogger(__name__)

# Set per call (the handler wrapper, from `x-read-consistency: strong` metadata): this
# call's reads go to the primary, so a caller reads its own writes despite replica lag.
strong_reads: ContextVar[bool] = ContextVar("strong_reads", default=False)

# After the replica failed, reads go to the primary for this long before one read tries
# the replica again.
REPLICA_RETRY_INTERVAL = 2.0


class ReadRouter:
    """Picks the session of each unit of work.

    A replica that cannot be reached (its connection refused or lost when a read starts)
    sends reads to the primary, with one log line, until a read reaches it again after
    REPLICA_RETRY_INTERVAL (with another log line). A read that fails midway is not
    moved: it fails UNAVAILABLE and the client retries it. Readiness follows the primary
    only (health.py), so a lost replica never takes the pods out of service.
    """

    def __init__(
        self,
        primary: SessionFactories,
        replica: SessionFactories | None = None,
        replica_engine: AsyncEngine | None = None,
    ) -> None:
        self._primary = primary
        self._replica = replica
        self._replica_engine = replica_engine
        self._down_until: float | None = None

    @property
    def replica_down(self) -> bool:
        return self._down_until is not None

    def _use_replica(self, mode: Mode) -> bool:
        if self._replica is None or mode == "write" or strong_reads.get():
            return False
        return self._down_until is None or time.monotonic() >= self._down_until

    async def open(
        self, mode: Mode, is_unavailable: Callable[[BaseException], bool]
    ) -> AsyncSession:
        """A new session for `mode`. Before a replica read, a connection is checked out of
        the replica's pool and back (a new one connects; one the server closed is
        replaced), so an unreachable replica is noticed here and the primary used."""
        if self._replica is None or self._replica_engine is None or not self._use_replica(mode):
            primary: AsyncSession = getattr(self._primary, mode)()
            return primary
        retrying = self._down_until is not None
        if retrying:  # only this read tries the replica; the others stay on the primary
            self._down_until = time.monotonic() + REPLICA_RETRY_INTERVAL
        try:
            async with self._replica_engine.connect():
                pass
        except Exception as error:
            if not is_unavailable(error):
                raise
            if not retrying:
                log.warning(
                    "read replica unreachable (%s); reads go to the primary until it answers",
                    type(error).__name__,
                )
            self._down_until = time.monotonic() + REPLICA_RETRY_INTERVAL
            fallback: AsyncSession = getattr(self._primary, mode)()
            return fallback
        if retrying:
            log.warning("read replica reachable again; reads go to it")
            self._down_until = None
        session: AsyncSession = getattr(self._replica, mode)()
        return session


def discard_unusable_connections(engine: AsyncEngine) -> None:
    """Pooled asyncpg connections that cannot serve the next call are dropped, not
    handed out:

    - at checkout, one whose server went away (a replica restarted): a free pre-ping,
      so the read that gets it is not the one to fail;
    - at checkin and at checkout, one still inside a transaction. A call cancelled in
      the middle of ending its transaction (a deadline, a client gone) can leave the
      server in a transaction that SQLAlchemy's adapter no longer tracks, so the
      reset on return rolls nothing back. Kept, the connection would sit "idle in
      transaction" (holding its snapshot and locks) and fail the next call that
      begins on it ("cannot use Connection.transaction() in a manually started
      transaction"). It is terminated at once (PostgreSQL rolls back), and replaced
      at its next checkout.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(
        dbapi_connection: object, _record: ConnectionPoolEntry, _proxy: object
    ) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        is_closed = getattr(driver, "is_closed", None)  # asyncpg's; aiosqlite has none
        if is_closed is None:
            return
        if is_closed():
            raise DisconnectionError("the server closed this connection")
        if driver.is_in_transaction():  # type: ignore[union-attr]
            driver.terminate()  # type: ignore[union-attr]
            raise DisconnectionError("a connection came back inside a transaction")

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(dbapi_connection: object, _record: ConnectionPoolEntry) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        is_closed = getattr(driver, "is_closed", None)
        if is_closed is None or is_closed():
            return
        if driver.is_in_transaction():  # type: ignore[union-attr]
            log.warning("a connection came back inside a transaction; closing it")
            driver.terminate()  # type: ignore[union-attr]
