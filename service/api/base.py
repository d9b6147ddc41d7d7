"""What every servicer holds, and the view check and idempotency key they share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

from service.api.rpc import Call
from service.api.streams import StreamLimiter
from service.api.validation import Violations
from service.config import Settings
from service.repositories.idempotency import IdempotencyKey
from service.repositories.uow import Store, UnitOfWork
from service.tokens import TokenCodec

T = TypeVar("T")


class Servicer:
    """Base of the servicers: the store, token codec, stream limiter and settings."""

    VIEWS: ClassVar[frozenset[int]]
    FULL_VIEW: ClassVar[int]

    def __init__(
        self, *, store: Store, tokens: TokenCodec, streams: StreamLimiter, settings: Settings
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._streams = streams
        self._settings = settings

    @classmethod
    def _view(cls, violations: Violations, view: int) -> bool:
        """Check the request's view enum; True for the FULL view (UNSPECIFIED is BASIC)."""
        violations.enum("view", view, cls.VIEWS)
        return view == cls.FULL_VIEW

    @staticmethod
    def _idempotency_key(call: Call, request_id: str) -> IdempotencyKey | None:
        """Creates are idempotent per caller, method and request_id; None without one."""
        return IdempotencyKey(call.caller, call.method, request_id) if request_id else None

    async def _write(self, call: Call, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Every write: `work(uow)` in a write unit of work on the primary, run again if
        the database rolls it back for a serialization failure or deadlock, within the
        call's deadline (Store.run). `work` holds the whole body, since a retry must
        repeat all of it; reads keep their own `unit_of_work`."""
        return await self._store.run(work, time_left=call.context.time_remaining())
