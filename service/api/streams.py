"""Per-process limits on concurrent streams, and batching rows into stream messages."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

from google.protobuf.message import Message

from service.api.rpc import Call
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


async def send_batches(
    call: Call,
    batches: AsyncGenerator[Sequence[Any]],
    *,
    render: Callable[[Sequence[Any]], Awaitable[list[M]]],
    respond: Callable[[list[M], str], Message],
    token_of: Callable[[Any], str],
    max_rows: int,
    max_bytes: int,
) -> None:
    """Send each fetched batch as one or more messages, each with its resume token.

    `aclosing` matters: when the client cancels or its deadline passes, the
    CancelledError lands here, and the generator's `finally` must close the cursor
    at once so the connection goes back to the pool.
    """
    async with aclosing(batches):
        async for rows in batches:
            messages = await render(rows)
            for chunk, last in chunks(messages, rows, max_rows=max_rows, max_bytes=max_bytes):
                token = token_of(last)
                await call.send(respond(chunk, token))
