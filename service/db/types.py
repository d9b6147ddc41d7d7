"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Dialect, Integer, Text
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid); PostgreSQL gets bigint.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite an ISO string. Always tz-aware UTC in Python.

    SQLite stores what it is given as text with microseconds, which sorts correctly,
    so keyset comparisons on timestamps work alike on both databases.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        # asyncpg takes aware datetimes as they are: no Python call per value.
        if dialect.name == "postgresql":
            return None
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        # asyncpg returns timestamptz as aware UTC datetimes already; streams read two
        # per row, so skipping the per-value call matters there.
        if dialect.name == "postgresql":
            return None
        return super().result_processor(dialect, coltype)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw text from SQLite (e.g. a MAX() over the column)
            value = datetime.fromisoformat(value)
        result: datetime = value
        if result.tzinfo is None:
            return result.replace(tzinfo=UTC)
        return result.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class TagList(TypeDecorator[list[str]]):
    """A post's tag names gathered by a correlated subquery: a text[] on PostgreSQL
    (`array(SELECT ... ORDER BY name)`), a comma-joined string on SQLite
    (`group_concat`, whose order is not promised: sorted here). Tags hold no commas."""

    impl = Text
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return sorted(value.split(",")) if value else []
        return list(value)
