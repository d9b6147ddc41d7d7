"""What every servicer holds, and the view check they share."""

from __future__ import annotations

from typing import ClassVar

from service.api.streams import StreamLimiter
from service.api.validation import Violations
from service.config import Settings
from service.db.uow import Database
from service.tokens import TokenCodec


class Servicer:
    """Base of the servicers: the database, token codec, stream limiter and settings."""

    VIEWS: ClassVar[frozenset[int]]
    FULL_VIEW: ClassVar[int]

    def __init__(
        self, *, db: Database, tokens: TokenCodec, streams: StreamLimiter, settings: Settings
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._streams = streams
        self._settings = settings

    @classmethod
    def _view(cls, violations: Violations, view: int) -> bool:
        """Check the request's view enum; True for the FULL view (UNSPECIFIED is BASIC)."""
        violations.enum("view", view, cls.VIEWS)
        return view == cls.FULL_VIEW
