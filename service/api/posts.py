"""blog.v1.PostService."""

from __future__ import annotations

from service.api.streams import StreamLimiter
from service.config import Settings
from service.db.uow import Database
from service.tokens import TokenCodec


class PostServicer:
    def __init__(
        self, *, db: Database, tokens: TokenCodec, streams: StreamLimiter, settings: Settings
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._streams = streams
        self._settings = settings
