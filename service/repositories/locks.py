"""One process at a time across replicas: a PostgreSQL session-level advisory lock, tried
and never waited for, so a background job that another replica is already running is
skipped rather than run twice."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.repositories.dialect import is_postgres


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a job's name."""
    return int.from_bytes(hashlib.sha256(f"blog.{name}".encode()).digest()[:8], "big", signed=True)


@asynccontextmanager
async def exclusive(factory: async_sessionmaker[AsyncSession], name: str) -> AsyncIterator[bool]:
    """True while this process holds the job's lock, False when another holds it.

    PostgreSQL: `pg_try_advisory_lock` on a connection of its own in autocommit, held for
    the block (no transaction stays open, so the idle-in-transaction backstop never ends
    it) and released at the end; if the process dies, its session ends and the lock with
    it. SQLite has one writer at a time anyway: always True."""
    session = factory()
    try:
        if not is_postgres(session):
            yield True
            return
        key = lock_key(name)
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        held = bool(
            (
                await session.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
            ).scalar_one()
        )
        try:
            yield held
        finally:
            if held:
                await session.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        await session.close()
