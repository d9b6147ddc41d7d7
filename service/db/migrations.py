"""Run Alembic from the service: upgrade to head, and tell whether a schema is current.

On PostgreSQL a migration runs without the serving statement_timeout (a second
`migrate` waits on the advisory lock as long as the first one takes) and with a
short lock_timeout (MIGRATION_LOCK_TIMEOUT), so a DDL statement queued behind a long
transaction gives up within seconds instead of queueing every call on its table
behind it; the whole migration is then retried with backoff (alembic/env.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command
from service.startup import StartupError

log = logging.getLogger(__name__)

LOCK_ATTEMPTS = 5
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout


def script_location() -> Path:
    """alembic/ of a source checkout, or the copy packaged into the wheel (the image)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "alembic", package / "_alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"no Alembic scripts found next to {package}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class SchemaState(enum.Enum):
    CURRENT = "current"
    BEHIND = "behind"  # older than this release: run `migrate`
    AHEAD = "ahead"  # newer than this release (a rollout in progress): accepted


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    state: SchemaState
    database: tuple[str, ...]
    code: tuple[str, ...]


class MigrationLockError(StartupError):
    """A migration could not take a table lock within its lock_timeout, every attempt."""


def describe_revisions(revisions: tuple[str, ...]) -> str:
    if not revisions:
        return "no revision (an empty database)"
    return ("revision " if len(revisions) == 1 else "revisions ") + ", ".join(revisions)


async def upgrade(
    engine: AsyncEngine, *, lock_timeout: float = 5.0, attempts: int = LOCK_ATTEMPTS
) -> SchemaState:
    """Bring the schema to head (PostgreSQL: under an advisory lock, see alembic/env.py).

    Returns AHEAD, having changed nothing, when the schema is newer than this release
    (a rollback of the release); CURRENT otherwise."""
    status = await schema_status(engine)
    if status.state is SchemaState.AHEAD:
        _log_ahead(status)
        return SchemaState.AHEAD
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    config.attributes["lock_timeout_ms"] = max(1, int(lock_timeout * 1000))

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    for attempt in range(1, attempts + 1):
        try:
            async with engine.connect() as connection:
                await connection.run_sync(run)
                await connection.commit()
            return SchemaState.CURRENT
        except DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            if attempt == attempts:
                raise MigrationLockError(
                    f"the migration could not take a table lock within {lock_timeout:g}s "
                    f"in {attempts} attempts (a long transaction holds it; see "
                    "pg_stat_activity): run it again later, or raise MIGRATION_LOCK_TIMEOUT"
                ) from None
            pause = min(30.0, lock_timeout * 2 ** (attempt - 1))
            log.warning(
                "a migration waited %gs for a table lock (attempt %d of %d); "
                "rolled back, retrying in %gs",
                lock_timeout,
                attempt,
                attempts,
                pause,
            )
            await asyncio.sleep(pause)
        except CommandError:
            # Another release's `migrate` may have moved the schema past this one meanwhile.
            status = await schema_status(engine)
            if status.state is not SchemaState.AHEAD:
                raise
            _log_ahead(status)
            return SchemaState.AHEAD
    raise AssertionError("unreachable")  # pragma: no cover


def _log_ahead(status: SchemaStatus) -> None:
    log.warning(
        "the database schema (%s) is newer than this release (%s): changing nothing "
        "(a newer release migrated it; migrations are expand/contract)",
        describe_revisions(status.database),
        describe_revisions(status.code),
    )


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    heads = tuple(sorted(script.get_heads()))

    def current(connection: Connection) -> tuple[str, ...]:
        return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))

    async with engine.connect() as connection:
        revisions = await connection.run_sync(current)
    if revisions == heads:
        return SchemaStatus(SchemaState.CURRENT, revisions, heads)
    for revision in revisions:
        try:
            known = script.get_revision(revision) is not None
        except CommandError:
            known = False
        if not known:
            return SchemaStatus(SchemaState.AHEAD, revisions, heads)
    return SchemaStatus(SchemaState.BEHIND, revisions, heads)
