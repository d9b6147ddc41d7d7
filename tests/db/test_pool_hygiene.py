"""A pooled connection that comes back inside a transaction is closed, never handed out
again (db/routing.py: discard_unusable_connections).

A call cancelled while its transaction ends can leave the server in a transaction that
SQLAlchemy's asyncpg adapter no longer tracks, so the pool's reset rolls nothing back.
Seen in the fault suite: the connection sat "idle in transaction" and the next call on
it failed with "cannot use Connection.transaction() in a manually started transaction".
Here the same state is made directly: BEGIN sent on the driver, behind the adapter."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from sqlalchemy import text

from conftest import Backend, settings_for
from service.db.engine import Database
from support.postgres import raw_dsn


async def _backend_state(url: str, pid: int) -> str | None:
    connection = await asyncpg.connect(raw_dsn(url))
    try:
        state: str | None = await connection.fetchval(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", pid
        )
        return state
    finally:
        await connection.close()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_connection_returned_inside_a_transaction_is_closed(backend: Backend) -> None:
    database = Database(settings_for(backend.url, db_pool_size=1, db_max_overflow=0))
    try:
        async with database.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            pid = await driver.fetchval("SELECT pg_backend_pid()")
            await driver.execute("BEGIN")
            assert driver.is_in_transaction()
        # Back in the pool: closed, so PostgreSQL ended the transaction with the session.
        assert driver.is_closed()
        deadline = time.monotonic() + 5
        while (state := await _backend_state(backend.url, pid)) is not None:
            assert time.monotonic() < deadline, f"backend {pid} still {state!r}"
            await asyncio.sleep(0.05)
        # The pool's one slot serves the next call on a fresh connection.
        async with database.engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
            await connection.commit()
    finally:
        await database.dispose()
