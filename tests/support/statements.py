"""Count what reaches the database, however it is issued.

`count_statements(engine)` records every round trip the engine's connections make while
the block runs:

- PostgreSQL: at asyncpg's protocol, the one door every path goes through (SQLAlchemy's
  prepared statements, driver-level `fetch`/`fetchrow` on the raw connection, server-side
  cursors, the simple-query protocol that sends BEGIN, COMMIT and ROLLBACK). asyncpg's
  Python layer (Connection, PreparedStatement, Cursor) reaches the protocol only through
  `connection._protocol`; for the block, that attribute hands a recording proxy to the
  connections the engine checks out. SQLAlchemy's `before_cursor_execute` sees neither
  driver-level SQL nor cursor fetches nor BEGIN/COMMIT.
- SQLite: `before_cursor_execute` (the service's BEGIN goes through it) plus the
  engine's commit and rollback events; pysqlite has no other path.

Kinds of round trip: `prepare` (parse and describe: once per statement and connection
while asyncpg's cache holds it), `introspect` (asyncpg looking up a type new to the
connection, such as BIGINT[]: once per type and connection), `execute` (bind and run
a prepared statement, all rows), `query` (simple protocol: BEGIN, COMMIT, ROLLBACK,
SET, MOVE), `bind` (open a cursor's portal), `fetch` (one batch from an open cursor),
`close` (a portal or statement), `copy`, and on SQLite `commit` / `rollback`.

    with count_statements(engine) as log:
        await stub.GetUser(...)
    print(log.summary())          # "3 round trips: query 2, execute 1 | BEGIN ..."
    assert log.round_trips() == 3  # prepares excluded: they depend on cache warmth
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg.connection
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Statement", "StatementLog", "count_statements"]

_PROTOCOL_KINDS = {
    "prepare": "prepare",
    "bind_execute": "execute",
    "bind_execute_many": "execute",
    "query": "query",
    "bind": "bind",
    "execute": "fetch",
    "close_portal": "close",
    "close_statement": "close",
    "copy_in": "copy",
    "copy_out": "copy",
}


# Round trips a connection makes once, while its caches warm up (and, behind a pooler,
# the close of each statement after use).
_CACHE_WARMTH = ("prepare", "introspect", "close")


def _is_introspection(sql: str) -> bool:
    """asyncpg's lookup of a type it has not seen on this connection: the typeinfo
    query, wrapped in turning JIT off and back on."""
    return "typeinfo_tree" in sql or sql.startswith(
        ("SELECT current_setting('jit')", "SELECT set_config('jit'")
    )


@dataclass(frozen=True)
class Statement:
    kind: str
    sql: str
    args: tuple[Any, ...] = ()  # the bound values of an `execute` or a cursor's `bind`

    def __str__(self) -> str:
        return f"{self.kind}: {self.sql[:200]}"


@dataclass
class StatementLog:
    entries: list[Statement] = field(default_factory=list)

    def add(self, kind: str, sql: Any, args: Any = ()) -> None:
        text = " ".join(str(sql).split()) if sql is not None else ""
        if kind == "execute" and _is_introspection(text):
            kind = "introspect"
        self.entries.append(Statement(kind, text, tuple(args)))

    def round_trips(self, *, prepares: bool = False) -> int:
        """Round trips to the database. Left out unless `prepares`: what depends on which
        pooled connection ran the call rather than on the call: prepares, asyncpg's
        one-time type introspection on a connection that has not met a type yet (e.g.
        `bigint[]`), and closes of statements asyncpg let go of (behind a pooler, every
        statement is closed after use)."""
        return sum(1 for e in self.entries if prepares or e.kind not in _CACHE_WARMTH)

    def kinds(self) -> Counter[str]:
        return Counter(e.kind for e in self.entries)

    def sql(self, kind: str | None = None) -> list[str]:
        return [e.sql for e in self.entries if kind is None or e.kind == kind]

    def find(self, *kinds: str, containing: str = "") -> list[Statement]:
        """Entries of these kinds whose SQL contains `containing` (case-insensitive)."""
        needle = containing.lower()
        return [e for e in self.entries if e.kind in kinds and needle in e.sql.lower()]

    def clear(self) -> None:
        self.entries.clear()

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds().items()))
        lines = " | ".join(str(e) for e in self.entries)
        return f"{self.round_trips()} round trips ({kinds}): {lines}"

    def __len__(self) -> int:
        return self.round_trips()


class _RecordingProtocol:
    """Delegates to asyncpg's protocol, recording each coroutine that talks to the server."""

    __slots__ = ("_log", "_protocol")

    def __init__(self, protocol: Any, log: StatementLog) -> None:
        self._protocol = protocol
        self._log = log

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._protocol, name)
        kind = _PROTOCOL_KINDS.get(name)
        if kind is None:
            return target
        log = self._log

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            bound = args[1] if name in ("bind_execute", "bind") and len(args) > 1 else ()
            log.add(kind, _sql_of(name, args, kwargs), bound)
            return await target(*args, **kwargs)

        return recorded


def _sql_of(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if name == "prepare":
        return args[1] if len(args) > 1 else kwargs.get("query")
    if name in ("query", "copy_in", "copy_out"):
        return args[0] if args else None
    state = args[0] if args else kwargs.get("state")
    return getattr(state, "query", name)


@contextmanager
def _patched_protocol(watched: weakref.WeakSet[Any], log: StatementLog) -> Iterator[None]:
    cls = asyncpg.connection.Connection
    slot = cls.__dict__["_protocol"]  # the __slots__ member descriptor

    def get(connection: Any) -> Any:
        protocol = slot.__get__(connection, cls)
        return _RecordingProtocol(protocol, log) if connection in watched else protocol

    cls._protocol = property(get, slot.__set__)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        cls._protocol = slot  # type: ignore[attr-defined]


@contextmanager
def count_statements(engine: AsyncEngine) -> Iterator[StatementLog]:
    """Record the round trips of `engine`'s connections checked out while the block runs
    (connections another engine or a health check uses are not counted)."""
    log = StatementLog()
    sync_engine = engine.sync_engine
    if engine.dialect.name == "postgresql":
        watched: weakref.WeakSet[Any] = weakref.WeakSet()

        def on_checkout(dbapi_connection: Any, *_: Any) -> None:
            watched.add(dbapi_connection.driver_connection)

        event.listen(sync_engine, "checkout", on_checkout)
        try:
            with _patched_protocol(watched, log):
                yield log
        finally:
            event.remove(sync_engine, "checkout", on_checkout)
        return

    listeners: list[tuple[str, Callable[..., None]]] = [
        ("before_cursor_execute", lambda _c, _cur, sql, *_a: log.add("execute", sql)),
        ("commit", lambda _c: log.add("commit", "COMMIT")),
        ("rollback", lambda _c: log.add("rollback", "ROLLBACK")),
    ]
    for name, listener in listeners:
        event.listen(sync_engine, name, listener)
    try:
        yield log
    finally:
        for name, listener in listeners:
            event.remove(sync_engine, name, listener)


def pooled_extra(backend_name: str, *, autocommit: bool) -> int:
    """Round trips a call adds behind a transaction-mode pooler (DB_PGBOUNCER): the
    per-transaction SET LOCAL of the timeouts, and for a read that is autocommit when
    direct, its BEGIN and ROLLBACK (docs/SCALING.md)."""
    if backend_name != "pgbouncer":
        return 0
    return 3 if autocommit else 1
