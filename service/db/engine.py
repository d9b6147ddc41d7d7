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
from service.db.errors import is_unavailable
from service.db.routing import ReadRouter, discard_unusable_connections

# Execution options our SQLite "begin" hook reads; see _install_sqlite_hooks.
_SQLITE_BEGIN = "blog_sqlite_begin"
# Execution option that marks an engine made for a transaction-mode pooler.
_POOLED = "blog_pooled"

Mode = Literal["write", "read", "snapshot"]


@dataclass(frozen=True, slots=True)
class SessionFactories:
    """Three ways to open a session over one pool.

    write: a read-write transaction (BEGIN IMMEDIATE on SQLite, so writers queue on
    the busy timeout instead of failing to upgrade a read lock).
    read: single-statement reads without an explicit transaction (autocommit),
    saving the BEGIN and COMMIT round trips; behind a transaction-mode pooler
    (DB_PGBOUNCER) a READ COMMITTED transaction instead.
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


def pooler_connect_args() -> dict[str, Any]:
    """asyncpg arguments for a transaction-mode pooler (SQLAlchemy's documented recipe).

    PgBouncer may run each transaction on another server connection, so no prepared
    statement may be reused across transactions: asyncpg's own statement cache and
    SQLAlchemy's adapter cache are off, and every statement SQLAlchemy prepares gets a
    unique name, so it never clashes with a name another client prepared on the same
    server connection. Driver-level statements (asyncpg's fetch with the cache off) use
    the unnamed statement, which lives only until the next Parse on that connection:
    safe inside a transaction, which is why every statement behind the pooler runs in
    one. No startup parameters: PgBouncer refuses them.
    """
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
    }


def idle_in_transaction_ms(settings: Settings) -> int:
    """The idle-in-transaction backstop: far above STREAM_IDLE_TIMEOUT, so it ends only a
    leaked transaction, never a stream the service itself would end."""
    return int((settings.stream_idle_timeout * 2 + 30) * 1000)


def _create_postgres_engine(settings: Settings, url: str) -> AsyncEngine:
    idle_ms = idle_in_transaction_ms(settings)
    statement_ms = int(settings.db_statement_timeout * 1000)
    if settings.db_pgbouncer:
        connect_args: dict[str, Any] = {**pooler_connect_args(), "timeout": 5}
    else:
        # A paused stream holds a transaction; the server ends it if it idles far longer
        # than STREAM_IDLE_TIMEOUT, as the last backstop against a leaked connection.
        server_settings = {
            "application_name": "blog-service",
            "idle_in_transaction_session_timeout": str(idle_ms),
        }
        if statement_ms:
            server_settings["statement_timeout"] = str(statement_ms)
        connect_args = {"server_settings": server_settings, "timeout": 5}
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        pool_recycle=settings.db_pool_recycle,
        pool_pre_ping=False,
        connect_args=connect_args,
        execution_options={_POOLED: settings.db_pgbouncer},
    )
    if settings.db_pgbouncer:
        _install_pooler_hooks(engine, statement_ms=statement_ms, idle_ms=idle_ms)
    return engine


def _install_pooler_hooks(engine: AsyncEngine, *, statement_ms: int, idle_ms: int) -> None:
    """Behind a transaction-mode pooler the session settings that a direct connection
    gets as startup parameters are set per transaction instead (`set_config(..., true)`
    is SET LOCAL): the statement timeout, the idle-in-transaction backstop and the
    application name, in one round trip at the start of every transaction. SET LOCAL
    ends with the transaction, so nothing leaks to the next client of that server
    connection."""
    settings = [
        ("application_name", "blog-service"),
        ("idle_in_transaction_session_timeout", str(idle_ms)),
        ("statement_timeout", str(statement_ms)),
    ]
    sql = "SELECT " + ", ".join(
        f"set_config('{name}', '{value}', true)" for name, value in settings
    )

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(sql)


def is_pooled(engine: AsyncEngine) -> bool:
    """True for an engine made for a transaction-mode pooler (DB_PGBOUNCER)."""
    return bool(engine.get_execution_options().get(_POOLED, False))


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
    elif is_pooled(engine):
        # Behind a transaction-mode pooler even a one-statement read runs in a
        # transaction: outside one, asyncpg's prepare and execute may reach different
        # server connections (SQLAlchemy issue 12836).
        write = engine
        read = engine.execution_options(isolation_level="READ COMMITTED")
        snapshot = engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
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
        discard_unusable_connections(self.engine)
        if self.read_engine is not self.engine:
            cancel_on_invalidate(self.read_engine)
            discard_unusable_connections(self.read_engine)
        primary = create_session_factories(self.engine)
        replica = None
        if self.read_engine is not self.engine:
            replica = create_session_factories(self.read_engine)
        self.sessions = SessionFactories(
            write=primary.write,
            read=(replica or primary).read,
            snapshot=(replica or primary).snapshot,
        )
        self.router = ReadRouter(primary, replica, self.read_engine if replica else None)

    def session_factory(self, mode: Mode) -> async_sessionmaker[AsyncSession]:
        factory: async_sessionmaker[AsyncSession] = getattr(self.sessions, mode)
        return factory

    async def open_session(self, mode: Mode) -> AsyncSession:
        """A new session for `mode`, routed (db/routing.py): reads to the replica unless
        the call asked for strong reads or the replica is unreachable."""
        return await self.router.open(mode, is_unavailable)

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
