"""The few statements whose spelling differs between PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING in the session's dialect (no check-then-insert)."""
    if is_postgres(session):
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def is_postgres(session: AsyncSession) -> bool:
    return bool(session.get_bind().dialect.name == "postgresql")


def one_of(session: AsyncSession, column: Any, values: Sequence[Any], item_type: Any) -> Any:
    """`column IN (...)`; on PostgreSQL `column = ANY(:array)`: one bound parameter, so
    one prepared statement serves every list length instead of one per length."""
    if is_postgres(session):
        return column == any_(bindparam(None, list(values), type_=ARRAY(item_type)))
    return column.in_(values)


async def driver_of(session: AsyncSession) -> Any | None:
    """The asyncpg connection under the session, for driver-level SQL on hot paths, or
    None where the caller must go through SQLAlchemy: on SQLite, and in a transaction
    that has not begun on the server yet (SQLAlchemy's asyncpg adapter sends BEGIN
    with the first statement, so a driver query before it would run outside the
    transaction). Autocommit sessions (reads of one statement) always qualify."""
    if not is_postgres(session):
        return None
    connection = (await session.connection()).sync_connection
    if connection is None:
        return None
    driver = connection.connection.driver_connection
    if driver is None:
        return None
    if driver.is_in_transaction():
        return driver
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return driver
    return None


class RecordRow:
    """Attribute access over an asyncpg Record, so converters take it like a Core Row."""

    __slots__ = ("_record",)

    def __init__(self, record: Any) -> None:
        self._record = record

    def __getattr__(self, name: str) -> Any:
        try:
            return self._record[name]
        except KeyError:
            raise AttributeError(name) from None
