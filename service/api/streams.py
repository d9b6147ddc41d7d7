"""Per-process limits on concurrent streams, and batching rows into stream messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar, cast

from google.protobuf.message import Message
from prometheus_client import Gauge

from service.api.rpc import Call
from service.errors import ResourceExhausted
from service.memory import release_memory_soon

M = TypeVar("M", bound=Message)
T = TypeVar("T")
# A stream that sent at least this much asks for freed memory to go back to the system
# when it ends (service/memory.py).
LARGE_STREAM_BYTES = 1024 * 1024


class StreamLimiter:
    """At most `limit` streams at once; the next one is RESOURCE_EXHAUSTED, not queued.

    `gauge` (blog_active_streams) is set as the count changes."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.active = 0
        self._gauge = gauge

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise ResourceExhausted(
                f"too many concurrent streams (limit {self.limit}); retry later"
            )
        self.active += 1
        if self._gauge is not None:
            self._gauge.set(self.active)
        try:
            yield
        finally:
            self.active -= 1
            if self._gauge is not None:
                self._gauge.set(self.active)


async def send_batches(
    call: Call,
    batches: AsyncGenerator[Sequence[Any]],
    *,
    prepare: Callable[[Sequence[Any]], Awaitable[Iterable[Any]]],
    new_message: Callable[[], M],
    rows_field: str,
    add: Callable[[Callable[..., Any], Any, Any], int],
    token_of: Callable[[Any], str],
    max_rows: int,
    max_bytes: int,
) -> None:
    """Send each fetched batch as one or more messages of at most `max_rows` rows and
    about `max_bytes` (a single larger row goes alone), never empty, each with the
    resume token of its last row.

    `prepare` runs once per batch (the batch's tag or count query) and gives one value
    per row, in the batch's order; `add` puts one row and its value into the message
    through the `add` of its repeated `rows_field` and returns about how many bytes it
    added; a row that would overflow the message is taken back out and starts the next
    one.
    After a full batch (`max_rows` rows) the next one is fetched and prepared while this
    one is built and sent (`read_ahead`): the database and the cursor's decoding work
    beside the building of messages instead of in turns. A batch cut short by bytes
    (large rows) is not read ahead of, so a stream of large rows still holds one such
    batch at a time; small rows hold two fetches.
    `aclosing` matters: when the client cancels or its deadline passes, the
    CancelledError lands here, and the generator's `finally` must close the cursor at
    once so the connection goes back to the pool.
    """

    async def prepared() -> AsyncGenerator[tuple[Sequence[Any], Iterable[Any]]]:
        async with aclosing(batches):
            async for rows in batches:
                yield rows, await prepare(rows)

    built = 0  # bytes of messages built, sent or not (a stalled stream sends little)

    async def flush(message: M, last: Any, size: int) -> None:
        nonlocal built
        built += size
        message.resume_token = token_of(last)  # type: ignore[attr-defined]
        await call.send(message, rows=len(getattr(message, rows_field)))

    def full(batch: tuple[Sequence[Any], Iterable[Any]]) -> bool:
        return len(batch[0]) >= max_rows

    try:
        async with aclosing(read_ahead(prepared(), eager=full)) as ahead:
            async for rows, extras in ahead:
                message = new_message()
                put = getattr(message, rows_field).add
                count = size = 0
                last: Any = None
                for row, extra in zip(rows, extras, strict=False):
                    item = add(put, row, extra)
                    if count and size + item > max_bytes:
                        del getattr(message, rows_field)[-1]
                        await flush(message, last, size)
                        message = new_message()
                        put = getattr(message, rows_field).add
                        item = add(put, row, extra)
                        count = size = 0
                    count += 1
                    size += item
                    last = row
                    if count >= max_rows:
                        await flush(message, last, size)
                        message = new_message()
                        put = getattr(message, rows_field).add
                        count = size = 0
                if count:
                    await flush(message, last, size)
    finally:
        # The rows and messages of a large stream were freed; give the pages back.
        if built >= LARGE_STREAM_BYTES:
            release_memory_soon()


_END = object()


async def _next(source: AsyncGenerator[T]) -> T | object:
    try:
        return await anext(source)
    except StopAsyncIteration:
        return _END  # a task ending in StopAsyncIteration would be an error


async def read_ahead(source: AsyncGenerator[T], *, eager: Callable[[T], bool]) -> AsyncGenerator[T]:
    """The items of `source`; after an item `eager` accepts, the next one is already
    being produced, in a task of its own, while the consumer works on this one (after
    any other, it is produced when asked for). `source` still runs one step at a time,
    so a database session it uses is never used by two tasks at once, provided the
    consumer does not use it. Closing this (or cancelling its consumer) cancels the
    step in flight, waits for it, then closes `source`, whose `finally` closes a cursor."""
    step: asyncio.Task[T | object] | None = None
    async with aclosing(source):
        try:
            while True:
                if step is None:
                    step = asyncio.create_task(_next(source))
                item = await step
                step = None
                if item is _END:
                    return
                if eager(cast(T, item)):
                    step = asyncio.create_task(_next(source))
                yield cast(T, item)
        finally:
            if step is not None:
                if not step.done():
                    # A consumer cancelled while awaiting the step has cancelled it already:
                    # a second cancel would cut short the cleanup it is running.
                    if not step.cancelling():
                        step.cancel()
                    await asyncio.wait([step])
                if not step.cancelled():
                    step.exception()  # retrieved: the consumer's own error is the one raised
