"""Engines and session factories for PostgreSQL (asyncpg) and SQLite (aiosqlite), and
which engine each kind of session goes to (writes to the primary, reads to a replica)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from service.config import Settings
from service.db.cancel import cancel_on_invalidate

# Execution options our SQLite "begin" hook reads; see _install_sqlite_hooks.
_SQLITE_BEGIN = "blog_sqlite_begin"

Mode = Literal["write", "read", "snapshot"]


@dataclass(frozen=True, slots=True)
class SessionFactories:
    """Three ways to open a session over one pool.

    write: a read-write transaction (BEGIN IMMEDIATE on SQLite, so writers queue on
    the busy timeout instead of failing to upgrade a read lock).
    read: single-statement reads without an explicit transaction (autocommit),
    saving the BEGIN and COMMIT round trips.
    snapshot: several reads that must see one snapshot (a FULL page and its
    aggregate, a stream): REPEATABLE READ READ ONLY on PostgreSQL.
    """

    write: async_sessionmaker[AsyncSession]
    read: async_sessionmaker[AsyncSession]
    snapshot: async_sessionmaker[AsyncSession]


def create_engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    url = url or settings.database_url
    if make_url(url).get_backend_name() == "sqlite":
        return _create_sqlite_engine(settings, url)
    return _create_postgres_engine(settings, url)


def _create_postgres_engine(settings: Settings, url: str) -> AsyncEngine:
    # A paused stream holds a transaction; the server ends it if it idles far longer
    # than STREAM_IDLE_TIMEOUT, as the last backstop against a leaked connection.
    idle_ms = int((settings.stream_idle_timeout * 2 + 30) * 1000)
    server_settings = {
        "application_name": "blog-service",
        "idle_in_transaction_session_timeout": str(idle_ms),
    }
    if settings.db_statement_timeout:
        server_settings["statement_timeout"] = str(int(settings.db_statement_timeout * 1000))
    connect_args: dict[str, Any] = {"server_settings": server_settings, "timeout": 5}
    if settings.db_pgbouncer:
        # PgBouncer in transaction mode may run each transaction on another server
        # connection: asyncpg's statement cache is off and every prepared statement gets
        # a unique name, so one never clashes with a name prepared elsewhere (SQLAlchemy's
        # documented recipe). Prepared statements still live on the server connection
        # until PgBouncer's server_reset_query (DISCARD ALL) clears them. PgBouncer
        # refuses startup parameters, so none are sent.
        connect_args.pop("server_settings")
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid.uuid4()}__"
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        pool_recycle=settings.db_pool_recycle,
        pool_pre_ping=False,
        connect_args=connect_args,
    )


def _create_sqlite_engine(settings: Settings, url: str) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        connect_args={"timeout": settings.sqlite_busy_timeout},
    )
    _install_sqlite_hooks(engine, settings)
    return engine


def _install_sqlite_hooks(engine: AsyncEngine, settings: Settings) -> None:
    """SQLAlchemy's recipe: the driver never begins on its own; we emit BEGIN ourselves."""
    busy_ms = int(settings.sqlite_busy_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            f"PRAGMA busy_timeout={busy_ms}",
            "PRAGMA foreign_keys=ON",
            "PRAGMA synchronous=NORMAL",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        if mode is not None:
            connection.exec_driver_sql(f"BEGIN {mode}")


def create_session_factories(engine: AsyncEngine) -> SessionFactories:
    if engine.dialect.name == "sqlite":
        write = engine.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
        read = engine.execution_options(**{_SQLITE_BEGIN: None})
        snapshot = engine.execution_options(**{_SQLITE_BEGIN: "DEFERRED"})
    else:
        write = engine
        read = engine.execution_options(isolation_level="AUTOCOMMIT")
        snapshot = engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
    return SessionFactories(
        write=async_sessionmaker(write, expire_on_commit=False, autoflush=False),
        read=async_sessionmaker(read, expire_on_commit=False, autoflush=False),
        snapshot=async_sessionmaker(snapshot, expire_on_commit=False, autoflush=False),
    )


class Database:
    """The engines and the session factory of each mode: writes go to DATABASE_URL, reads
    and snapshots to DATABASE_READ_URL when it is set (a replica), else to the primary."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: AsyncEngine = create_engine(settings)
        self.read_engine: AsyncEngine = (
            create_engine(settings, settings.database_read_url)
            if settings.database_read_url
            else self.engine
        )
        # A cancelled call's statement is cancelled on the server too (db/cancel.py).
        cancel_on_invalidate(self.engine)
        if self.read_engine is not self.engine:
            cancel_on_invalidate(self.read_engine)
        primary = create_session_factories(self.engine)
        replica = (
            primary
            if self.read_engine is self.engine
            else create_session_factories(self.read_engine)
        )
        self.sessions = SessionFactories(
            write=primary.write, read=replica.read, snapshot=replica.snapshot
        )

    def session_factory(self, mode: Mode) -> async_sessionmaker[AsyncSession]:
        factory: async_sessionmaker[AsyncSession] = getattr(self.sessions, mode)
        return factory

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
