"""The unit of work: one session and transaction per call, handing out the repositories.

`async with store.unit_of_work("read") as uow: row = await uow.users.require(user_id)`.
It is the one place that commits (at the end of the block; any exception rolls back),
and the one place what the database raised becomes a domain error (`db/errors.py`).
Servicers never see its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from service.db.engine import Database, Mode, is_pooled
from service.db.errors import is_unavailable, translate
from service.db.routing import strong_reads
from service.errors import TransactionConflict
from service.repositories.idempotency import IdempotencyRepository
from service.repositories.locks import exclusive
from service.repositories.posts import PostRepository
from service.repositories.token_keys import TokenKeyRepository
from service.repositories.users import UserRepository

T = TypeVar("T")
log = logging.getLogger(__name__)

# Store.run: attempts at a unit of work that hits a serialization failure or deadlock,
# and the jittered ("full jitter") backoff between them.
RUN_ATTEMPTS = 4
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 0.25


def read_from_primary(strong: bool) -> None:
    """For the rest of this call (its task): reads go to the primary when `strong`, so a
    caller reads its own writes despite replica lag (`x-read-consistency: strong`)."""
    strong_reads.set(strong)


class Store:
    """Where units of work come from: the servicers' one way down to the database.

    `on_error` sees every exception a unit of work ends with, before it is translated
    (the metrics count database errors by SQLSTATE class there)."""

    __slots__ = ("_database", "_finish", "_on_error")

    def __init__(
        self, database: Database, *, on_error: Callable[[BaseException], None] | None = None
    ) -> None:
        self._database = database
        self._on_error = on_error
        # How a unit of work that ended well finishes its session in one step, by mode:
        # on PostgreSQL only (see UnitOfWork.__aexit__); None is a commit, then
        # AsyncSession's shielded close.
        postgres = database.engine.dialect.name == "postgresql"
        transaction = _commit_and_close if postgres else None
        read = Session.close if postgres and not is_pooled(database.read_engine) else transaction
        self._finish: dict[Mode, Callable[[Session], None] | None] = {
            "write": transaction,
            "read": read,
            "snapshot": transaction,
        }

    def unit_of_work(self, mode: Mode = "write") -> UnitOfWork:
        """A unit of work in one of three modes (db/engine.py: SessionFactories): `write`
        (a read-write transaction), `read` (autocommit: single-statement reads, nothing
        to commit), `snapshot` (several reads that see one snapshot)."""
        database = self._database
        return UnitOfWork(
            lambda: database.open_session(mode),
            transaction=mode != "read",
            on_error=self._on_error,
            finish=self._finish[mode],
        )

    async def run(
        self,
        work: Callable[[UnitOfWork], Awaitable[T]],
        *,
        mode: Mode = "write",
        time_left: float | None = None,
    ) -> T:
        """`await work(uow)` in a unit of work, run again from the start in a new one
        when the database rolled it back for a serialization failure or deadlock.

        The whole body is `work`, so a retry repeats every statement, and `work` must
        not have done anything outside the database that a retry would repeat (a stream
        never comes here: it opens its unit of work itself, and is never retried once
        rows went out). Up to RUN_ATTEMPTS attempts, with jittered backoff, and none
        that would start after `time_left` seconds (the call's deadline) ran out; then
        ABORTED TRANSACTION_CONFLICT with RetryInfo. Every other error passes through.
        """
        loop = asyncio.get_running_loop()
        deadline = None if time_left is None else loop.time() + time_left
        attempt = 1
        while True:
            try:
                async with self.unit_of_work(mode) as uow:
                    return await work(uow)
            except TransactionConflict:
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                if attempt >= RUN_ATTEMPTS or (
                    deadline is not None and loop.time() + delay >= deadline
                ):
                    raise
                log.info("transaction conflict; attempt %d of %d", attempt + 1, RUN_ATTEMPTS)
            attempt += 1
            await asyncio.sleep(delay)

    def exclusive(self, name: str) -> AbstractAsyncContextManager[bool]:
        """`async with store.exclusive("purge") as mine:` True in one process across all
        replicas of the primary at a time (repositories/locks.py)."""
        return exclusive(self._database.session_factory("write"), name)


def _commit_and_close(session: Session) -> None:
    session.commit()
    session.close()


class UnitOfWork:
    """One call's session and transaction; its repositories are made on first use."""

    __slots__ = (
        "_finish",
        "_idempotency",
        "_on_error",
        "_open",
        "_posts",
        "_session",
        "_token_keys",
        "_users",
        "_wants_transaction",
    )

    def __init__(
        self,
        open_session: Callable[[], Awaitable[AsyncSession]],
        *,
        transaction: bool,
        on_error: Callable[[BaseException], None] | None = None,
        finish: Callable[[Session], None] | None = None,
    ) -> None:
        self._open = open_session
        self._on_error = on_error
        self._wants_transaction = transaction
        self._finish = finish
        self._users: UserRepository | None = None
        self._posts: PostRepository | None = None
        self._idempotency: IdempotencyRepository | None = None
        self._token_keys: TokenKeyRepository | None = None

    async def __aenter__(self) -> UnitOfWork:
        # The session begins its transaction with the first statement (autobegin; an
        # explicit `session.begin()` would reach the database no sooner and cost a trip
        # through SQLAlchemy's greenlet and a SessionTransaction context a call).
        # Autocommit ("read"): nothing to commit or roll back at all.
        self._session = await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session = self._session
        failure = exc if isinstance(exc, Exception) else None
        closed = False
        try:
            try:
                # COMMIT when the block ended well; otherwise closing rolls back.
                if exc is None and self._finish is not None:
                    # PostgreSQL: commit and close in one pass through SQLAlchemy's
                    # greenlet. Once the adapter has committed it holds no transaction
                    # (nor does an autocommit read's), so the close only hands the
                    # connection back to the pool and never waits: it needs no
                    # shielding task (AsyncSession.__aexit__ makes one a call). Behind
                    # a transaction-mode pooler a read is a transaction, so it commits.
                    await session.run_sync(self._finish)
                    closed = True
                elif self._wants_transaction and exc is None:
                    await session.commit()
            except Exception as error:
                failure = error
                raise
            finally:
                if not closed:
                    if failure is not None and is_unavailable(failure):
                        # A driver-level statement may have hit a dead connection that
                        # SQLAlchemy never saw fail: never give it back to the pool.
                        with contextlib.suppress(Exception):
                            await session.invalidate()
                    await session.__aexit__(exc_type, exc, traceback)  # close, shielded
        except Exception as error:
            if self._on_error is not None:
                self._on_error(error)
            domain = translate(error)
            if domain is None:
                raise
            raise domain from error
        if failure is not None:
            if self._on_error is not None:
                self._on_error(failure)
            domain = translate(failure)
            if domain is not None:
                raise domain from failure

    @property
    def users(self) -> UserRepository:
        if self._users is None:
            self._users = UserRepository(self._session)
        return self._users

    @property
    def posts(self) -> PostRepository:
        if self._posts is None:
            self._posts = PostRepository(self._session)
        return self._posts

    @property
    def idempotency(self) -> IdempotencyRepository:
        if self._idempotency is None:
            self._idempotency = IdempotencyRepository(self._session)
        return self._idempotency

    @property
    def token_keys(self) -> TokenKeyRepository:
        if self._token_keys is None:
            self._token_keys = TokenKeyRepository(self._session)
        return self._token_keys
