"""Alembic environment: async engines, batch mode on SQLite, an advisory lock on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging.config
import time

from sqlalchemy import Connection, text

from alembic import context
from service.config import Settings
from service.db.engine import create_engine
from service.db.models import Base

config = context.config
target_metadata = Base.metadata

# Any constant will do; every migrator of one database takes the same lock.
MIGRATION_LOCK_ID = 0x626C6F67  # "blog"
# How long a second `migrate` waits for the first before giving up.
MIGRATION_LOCK_WAIT = 600.0


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or Settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _take_migration_lock(connection: Connection) -> None:
    """Concurrent `migrate` runs queue here; the second then finds the first's work done.

    A session lock, not a transaction one: a revision that builds an index CONCURRENTLY
    commits the migration transaction in Alembic's autocommit_block, which would end a
    transaction-scoped lock midway and let a second runner in. And the waiting is a poll
    from outside any transaction: CREATE INDEX CONCURRENTLY waits for every transaction
    that holds a snapshot, so a runner blocked in `pg_advisory_lock` inside one would
    deadlock with the runner holding the lock. Released after the final commit, or with
    the connection if the process dies.
    """
    level = connection.get_isolation_level()
    if connection.in_transaction():
        connection.commit()
    connection.execution_options(isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + MIGRATION_LOCK_WAIT
        while not connection.scalar(
            text("SELECT pg_try_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID}
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"another `migrate` has held the migration lock for over "
                    f"{MIGRATION_LOCK_WAIT:g}s; is one stuck? (pg_locks, objid {MIGRATION_LOCK_ID})"
                )
            time.sleep(0.2)
    finally:
        connection.commit()
        connection.execution_options(isolation_level=level)


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transaction_per_migration=False,
    )
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        _take_migration_lock(connection)
    try:
        with context.begin_transaction():
            if postgres:
                # The serving statement_timeout does not apply: a migration takes as
                # long as it takes. (SET LOCAL ends with this transaction: a revision's
                # autocommit_block sets its own, see docs/SCALING.md.)
                connection.execute(text("SET LOCAL statement_timeout = 0"))
                # A DDL statement waiting for a table lock queues every later statement
                # on that table behind it: give up soon; service.db.migrations retries.
                lock_timeout_ms = int(config.attributes.get("lock_timeout_ms", 5000))
                connection.execute(text(f"SET LOCAL lock_timeout = {lock_timeout_ms}"))
            context.run_migrations()
    finally:
        if postgres and not connection.invalidated:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})


async def run_async_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    engine = create_engine(Settings(database_url=url), url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed in by service.db.migrations
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if config.config_file_name is not None and not config.attributes.get("connection"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
