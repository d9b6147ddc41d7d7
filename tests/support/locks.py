"""Holding a user's row from a second connection, so a call on it waits."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.engine import make_url

from support.postgres import raw_dsn


@asynccontextmanager
async def row_locked(url: str, user_id: int) -> AsyncIterator[None]:
    """PostgreSQL: `SELECT ... FOR UPDATE` of the row; SQLite: the whole database
    (BEGIN IMMEDIATE), which is what SQLite's writers queue on."""
    if make_url(url).get_backend_name() == "postgresql":
        connection = await asyncpg.connect(raw_dsn(url))
        try:
            transaction = connection.transaction()
            await transaction.start()
            await connection.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
            try:
                yield
            finally:
                await transaction.rollback()
        finally:
            await connection.close()
    else:
        path = make_url(url).database
        assert path is not None
        lite = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(lite.execute, "BEGIN IMMEDIATE")
            try:
                yield
            finally:
                lite.execute("ROLLBACK")
        finally:
            lite.close()


async def waiting_statements(url: str) -> list[str]:
    """The service's statements PostgreSQL still runs or waits on (pg_stat_activity)."""
    connection = await asyncpg.connect(raw_dsn(url))
    try:
        rows = await connection.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'blog-service' AND state = 'active' "
            "AND pid <> pg_backend_pid()"
        )
        return [str(row["query"]) for row in rows]
    finally:
        await connection.close()
