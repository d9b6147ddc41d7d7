"""Database errors by SQLSTATE (db/errors.py) and the unit of work's retry (Store.run)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import exc as sa_exc

from service.config import Settings
from service.db.engine import Database
from service.db.errors import is_unavailable, translate
from service.errors import (
    DatabaseTimeout,
    TransactionConflict,
    Unavailable,
    to_grpc_status,
)
from service.repositories import uow as uow_module
from service.repositories.uow import Store, UnitOfWork


def _wrapped(error: Exception) -> sa_exc.DBAPIError:
    """What SQLAlchemy's asyncpg adapter raises for a PostgreSQL error it does not map
    (a generic DBAPIError whose `.orig` carries the SQLSTATE, caused by asyncpg's)."""

    class AdaptedError(Exception):
        def __init__(self, cause: Exception) -> None:
            super().__init__(str(cause))
            self.sqlstate = self.pgcode = getattr(cause, "sqlstate", None)
            self.__cause__ = cause

    return sa_exc.DBAPIError("UPDATE users ...", {}, AdaptedError(error))


CASES = [
    (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), TransactionConflict),
    (asyncpg.exceptions.SerializationError("could not serialize"), TransactionConflict),
    (asyncpg.exceptions.QueryCanceledError("statement timeout"), DatabaseTimeout),
    (asyncpg.exceptions.LockNotAvailableError("lock timeout"), Unavailable),
    (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"), Unavailable),
    (asyncpg.exceptions.AdminShutdownError("terminating connection"), Unavailable),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), Unavailable),
    (asyncpg.exceptions.TooManyConnectionsError("too many clients"), Unavailable),
]


@pytest.mark.parametrize(("error", "expected"), CASES, ids=lambda v: getattr(v, "sqlstate", ""))
def test_sqlstates_translate_raw_and_wrapped(error: Exception, expected: type) -> None:
    for raised in (error, _wrapped(error)):
        assert type(translate(raised)) is expected, raised


def test_only_a_broken_connection_is_dropped() -> None:
    assert is_unavailable(_wrapped(asyncpg.exceptions.ReadOnlySQLTransactionError("ro")))
    assert is_unavailable(asyncpg.exceptions.AdminShutdownError("bye"))
    for healthy in (
        asyncpg.exceptions.DeadlockDetectedError("deadlock"),
        asyncpg.exceptions.QueryCanceledError("timeout"),
        asyncpg.exceptions.LockNotAvailableError("lock"),
    ):
        assert not is_unavailable(_wrapped(healthy))


def test_an_unknown_postgres_error_stays_unknown() -> None:
    assert translate(_wrapped(asyncpg.exceptions.DivisionByZeroError("x"))) is None


def test_statuses_carry_their_reason_and_retry_info() -> None:
    for error, code, reason in (
        (TransactionConflict(), grpc.StatusCode.ABORTED, "TRANSACTION_CONFLICT"),
        (DatabaseTimeout(), grpc.StatusCode.DEADLINE_EXCEEDED, "DATABASE_TIMEOUT"),
    ):
        status = to_grpc_status(error)
        assert status.code is code
        details = status_pb2.Status.FromString(
            dict(status.trailing_metadata)["grpc-status-details-bin"]
        ).details
        info = error_details_pb2.ErrorInfo()
        details[0].Unpack(info)
        assert info.reason == reason
        if isinstance(error, TransactionConflict):
            assert details[1].Is(error_details_pb2.RetryInfo.DESCRIPTOR)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    database = Database(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"))
    try:
        yield Store(database)
    finally:
        await database.dispose()


async def test_run_retries_a_deadlock_with_a_fresh_unit_of_work(store: Store) -> None:
    seen: list[UnitOfWork] = []

    async def work(uow: UnitOfWork) -> str:
        seen.append(uow)
        if len(seen) < 3:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return "done"

    assert await store.run(work) == "done"
    assert len(seen) == 3
    assert len({id(u) for u in seen}) == 3


@pytest.mark.parametrize(
    ("error", "time_left", "expected", "attempts"),
    [
        # A conflict that never goes away: every attempt, then TRANSACTION_CONFLICT.
        (
            _wrapped(asyncpg.exceptions.SerializationError("could not serialize")),
            None,
            TransactionConflict,
            uow_module.RUN_ATTEMPTS,
        ),
        # No time left before the call's deadline: no second attempt.
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), 0.0, TransactionConflict, 1),
        # Anything else is not retried.
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), None, DatabaseTimeout, 1),
    ],
    ids=["gives-up", "deadline", "not-a-conflict"],
)
async def test_run_stops_retrying(
    store: Store, error: Exception, time_left: float | None, expected: type, attempts: int
) -> None:
    seen = 0

    async def work(uow: UnitOfWork) -> None:
        nonlocal seen
        seen += 1
        raise error

    with pytest.raises(expected):
        await store.run(work, time_left=time_left)
    assert seen == attempts
