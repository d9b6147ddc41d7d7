"""Per-process limits on concurrent streams, and batching rows into stream messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from google.protobuf.message import Message

from service.errors import ResourceExhausted

M = TypeVar("M", bound=Message)


class StreamLimiter:
    """At most `limit` streams at once; the next one is RESOURCE_EXHAUSTED, not queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise ResourceExhausted(
                f"too many concurrent streams (limit {self.limit}); retry later"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


def chunks(
    messages: Sequence[M], rows: Sequence[Any], *, max_rows: int, max_bytes: int
) -> Iterator[tuple[list[M], Any]]:
    """Split one fetched batch into messages of at most max_rows and about max_bytes,
    never empty; yields each chunk with its last row (for the resume token)."""
    chunk: list[M] = []
    size = 0
    last: Any = None
    for message, row in zip(messages, rows, strict=True):
        item = message.ByteSize() + 6  # field tag and length prefix
        if chunk and (len(chunk) >= max_rows or size + item > max_bytes):
            yield chunk, last
            chunk, size = [], 0
        chunk.append(message)
        size += item
        last = row
    if chunk:
        yield chunk, last
