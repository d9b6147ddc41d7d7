"""Driver-level SQL for the hottest statements: the asyncpg connection under a session,
when it may be used, and rows from it that read like Core rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.repositories.dialect import is_postgres


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
