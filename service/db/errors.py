"""What the database raises, as domain errors: unique clashes by constraint name, the
post's author foreign key, PostgreSQL's transient errors by SQLSTATE, and a lost or
unreachable database as UNAVAILABLE."""

from __future__ import annotations

import logging
import re

import asyncpg
from sqlalchemy import exc as sa_exc

from service.errors import (
    DatabaseTimeout,
    DomainError,
    TransactionConflict,
    Unavailable,
    author_not_live,
    taken,
)

log = logging.getLogger(__name__)

# Constraint (PostgreSQL) or "table.column" (SQLite names columns) -> domain error.
_USERNAME = ("uq_users_username_live", "users.username")
_EMAIL = ("uq_users_email_normalized_live", "users.email_normalized")
_AUTHOR = ("fk_posts_author_id_users", "sqlite.foreign_key")
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: ([\w.]+)")

# SQLSTATEs (PostgreSQL appendix A) of transient failures. Retried inside the service
# (Store.run): the unit of work was rolled back and may simply run again.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# The database cannot serve this call now; the client retries later (DECISIONS.md 22).
UNAVAILABLE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, or shutting down)
        "53300",  # too_many_connections
        "25006",  # read_only_sql_transaction: a primary that is a standby after failover
        "55P03",  # lock_not_available (lock_timeout): see DECISIONS.md 22
    }
)
# The connection itself is no good for another call: drop it rather than pool it.
_DROP_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "25006"})
_STATEMENT_TIMEOUT = "57014"  # query_canceled: statement_timeout (or pg_cancel_backend)
# Failures of one statement or transaction on a healthy connection.
_CONNECTION_STAYS_GOOD = CONFLICT_SQLSTATES | {_STATEMENT_TIMEOUT, "55P03"}


def translate(error: Exception) -> DomainError | None:
    """The domain error for what the database raised, or None to let it through as it is."""
    if isinstance(error, DomainError):
        return None
    if isinstance(error, sa_exc.IntegrityError):
        return _integrity_error(error)
    state = sqlstate_of(error)
    if state is not None:
        if state in CONFLICT_SQLSTATES:
            return TransactionConflict()
        if state == _STATEMENT_TIMEOUT:
            return DatabaseTimeout()
        if state in UNAVAILABLE_SQLSTATES or state.startswith("08"):  # 08: connection
            log.warning("database unavailable: SQLSTATE %s: %.300s", state, error)
            return Unavailable()
    if is_unavailable(error):
        # The server log may say what went wrong; the client gets no driver text.
        log.warning("database unavailable: %s: %.300s", type(error).__name__, error)
        return Unavailable()
    return None


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE PostgreSQL reported: on SQLAlchemy's DBAPIError (its `.orig`, the
    asyncpg adapter's error, and that error's cause, asyncpg's own) or on a raw asyncpg
    error from a driver-level statement. None for anything else (SQLite, Python errors)."""
    candidates: list[object] = [error]
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        candidates += [error.orig, error.orig.__cause__]
    for candidate in candidates:
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state
    return None


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


def _integrity_error(error: sa_exc.IntegrityError) -> DomainError | None:
    constraint = constraint_of(error)
    if constraint in _USERNAME:
        return taken("USERNAME_TAKEN")
    if constraint in _EMAIL:
        return taken("EMAIL_TAKEN")
    if constraint in _AUTHOR:
        return author_not_live(None)
    return None


def is_unavailable(error: BaseException) -> bool:
    """True for a lost or unreachable database, a locked SQLite file, a full pool, or a
    server that cannot take this connection's work any more (shutting down, read-only):
    the unit of work drops the connection instead of giving it back to the pool."""
    if isinstance(error, sa_exc.TimeoutError):  # waiting for a pool slot
        return True
    state = sqlstate_of(error)
    if state is not None and (state in _DROP_CONNECTION_SQLSTATES or state.startswith("08")):
        return True
    if state in _CONNECTION_STAYS_GOOD:
        return False
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
