"""The database handle and the unit of work: one session and transaction per call.

The unit of work is the one place that commits, and the one place that turns what
the database raises (constraint violations, lost connections, a full pool) into
domain errors.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from service.config import Settings
from service.db.engine import SessionFactories, create_engine, create_session_factories
from service.errors import AlreadyExists, DomainError, FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

Mode = Literal["write", "read", "snapshot"]

# Constraint (PostgreSQL) or "table.column" (SQLite names columns) -> domain error.
_USERNAME = ("uq_users_username_live", "users.username")
_EMAIL = ("uq_users_email_normalized_live", "users.email_normalized")
_AUTHOR = ("fk_posts_author_id_users",)
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: ([\w.]+)")


class Database:
    """Engines and session factories; writes go to DATABASE_URL, reads may go to a replica."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: AsyncEngine = create_engine(settings)
        self.read_engine: AsyncEngine = (
            create_engine(settings, settings.database_read_url)
            if settings.database_read_url
            else self.engine
        )
        primary = create_session_factories(self.engine)
        replica = (
            primary
            if self.read_engine is self.engine
            else create_session_factories(self.read_engine)
        )
        self._factories = SessionFactories(
            write=primary.write, read=replica.read, snapshot=replica.snapshot
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def unit_of_work(self, mode: Mode = "write") -> AsyncIterator[AsyncSession]:
        """`async with db.unit_of_work() as session:` commits at the end, rolls back on error."""
        factory = getattr(self._factories, mode)
        try:
            async with factory() as session:
                try:
                    if mode == "read":
                        # Autocommit: nothing to commit or roll back, so no
                        # SessionTransaction ceremony on the hottest path.
                        yield session
                    else:
                        async with session.begin():
                            yield session
                except Exception as error:
                    if is_unavailable(error):
                        # A driver-level statement may have hit a dead connection that
                        # SQLAlchemy never saw fail: never give it back to the pool.
                        with contextlib.suppress(Exception):
                            await session.invalidate()
                    raise
        except DomainError:
            raise
        except sa_exc.IntegrityError as error:
            raise map_integrity_error(error) from error
        except Exception as error:
            if is_unavailable(error):
                # The server log may say what went wrong; the client gets no driver text.
                log.warning("database unavailable: %s: %.300s", type(error).__name__, error)
                raise Unavailable() from error
            raise

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()


def constraint_of(error: sa_exc.IntegrityError) -> str | None:
    """The violated constraint's name (PostgreSQL) or "table.column" (SQLite)."""
    cause = error.orig.__cause__ if error.orig is not None else None
    name = getattr(cause, "constraint_name", None)
    if isinstance(name, str):
        return name
    text = str(error.orig)
    match = _SQLITE_UNIQUE.search(text)
    if match:
        return match.group(1)
    if "FOREIGN KEY constraint failed" in text:
        return "sqlite.foreign_key"
    return None


def map_integrity_error(error: sa_exc.IntegrityError) -> DomainError | sa_exc.IntegrityError:
    constraint = constraint_of(error)
    if constraint in _USERNAME:
        return AlreadyExists("USERNAME_TAKEN", "the username is taken by a live user")
    if constraint in _EMAIL:
        return AlreadyExists("EMAIL_TAKEN", "the email is taken by a live user")
    if constraint in _AUTHOR or constraint == "sqlite.foreign_key":
        return FailedPrecondition(
            "AUTHOR_NOT_LIVE", subject="author_id", description="the author is not a live user"
        )
    return error


def is_unavailable(error: BaseException) -> bool:
    """True for a lost or unreachable database, a locked SQLite file, or a full pool."""
    if isinstance(error, sa_exc.TimeoutError):  # waiting for a pool slot
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True
        cause = error.orig.__cause__ if error.orig is not None else None
        return cause is not None and _is_connection_error(cause)
    return _is_connection_error(error)


def _is_connection_error(error: BaseException) -> bool:
    """Raw driver errors, from driver-level statements SQLAlchemy did not wrap."""
    if isinstance(error, OSError | ConnectionError | TimeoutError):
        return True
    return isinstance(
        error,
        asyncpg.exceptions.InterfaceError  # "connection is closed", "another operation..."
        | asyncpg.exceptions.PostgresConnectionError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.AdminShutdownError,
    )
