"""What the database raises, as domain errors: unique clashes by constraint name, the
post's author foreign key, and a lost or unreachable database as UNAVAILABLE."""

from __future__ import annotations

import logging
import re

import asyncpg
from sqlalchemy import exc as sa_exc

from service.errors import DomainError, Unavailable, author_not_live, taken

log = logging.getLogger(__name__)

# Constraint (PostgreSQL) or "table.column" (SQLite names columns) -> domain error.
_USERNAME = ("uq_users_username_live", "users.username")
_EMAIL = ("uq_users_email_normalized_live", "users.email_normalized")
_AUTHOR = ("fk_posts_author_id_users", "sqlite.foreign_key")
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: ([\w.]+)")


def translate(error: Exception) -> DomainError | None:
    """The domain error for what the database raised, or None to let it through as it is."""
    if isinstance(error, DomainError):
        return None
    if isinstance(error, sa_exc.IntegrityError):
        return _integrity_error(error)
    if is_unavailable(error):
        # The server log may say what went wrong; the client gets no driver text.
        log.warning("database unavailable: %s: %.300s", type(error).__name__, error)
        return Unavailable()
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
