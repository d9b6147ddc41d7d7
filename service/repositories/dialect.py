"""The few statements whose spelling differs between PostgreSQL and SQLite, and the one
way repositories ask which of the two a session is on (`is_postgres`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import LargeBinary, any_, bindparam, cast, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession


def is_postgres(session: AsyncSession) -> bool:
    return bool(session.get_bind().dialect.name == "postgresql")


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING in the session's dialect (no check-then-insert)."""
    if is_postgres(session):
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def one_of(session: AsyncSession, column: Any, values: Sequence[Any], item_type: Any) -> Any:
    """`column IN (...)`; on PostgreSQL `column = ANY(:array)`: one bound parameter, so
    one prepared statement serves every list length instead of one per length."""
    if is_postgres(session):
        return column == any_(bindparam(None, list(values), type_=ARRAY(item_type)))
    return column.in_(values)


def byte_length(column: Any, *, postgres: bool) -> Any:
    """The UTF-8 length of a text column in bytes, read without the value itself where
    the database can (PostgreSQL's `octet_length` reads a TOASTed value's header only;
    SQLite before 3.43 has no `octet_length`, so its text is cast to a blob)."""
    if postgres:
        return func.octet_length(column)
    return func.length(cast(column, LargeBinary))
