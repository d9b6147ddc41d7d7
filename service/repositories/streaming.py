"""Rows of a statement in batches from a server-side cursor, for streams, and those batches
bounded by bytes when their large values were withheld."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


async def stream_partitions(
    session: AsyncSession,
    stmt: Any,
    *,
    batch_size: int,
    params: Mapping[str, Any] | None = None,
) -> AsyncGenerator[Sequence[Any]]:
    """`AsyncSession.stream` with `yield_per` (a server-side cursor on PostgreSQL), by
    `partitions()`. Close it with `contextlib.aclosing`: its `finally` closes the cursor
    when the consumer stops early (a cancelled call)."""
    result = await session.stream(stmt.execution_options(yield_per=batch_size), params)
    try:
        async for partition in result.partitions():
            yield partition
    finally:
        await result.close()


async def byte_bounded(
    partitions: AsyncGenerator[Sequence[Any]],
    *,
    max_bytes: int,
    size_of: Callable[[Any], int],
    incomplete: Callable[[Any], bool],
    complete: Callable[[Sequence[Any]], Awaitable[Sequence[Any]]],
) -> AsyncGenerator[Sequence[Any]]:
    """Fetches whose rows were read without their large values (`incomplete` rows), cut
    into batches of about `max_bytes` (by `size_of`), each completed (`complete`, which
    reads what was withheld) just before it is yielded: a stream of large rows holds one
    such batch at a time, not a whole fetch of them. A fetch with no incomplete row goes
    on as it came. Closing this closes `partitions` (and so the cursor)."""
    async with aclosing(partitions):
        async for rows in partitions:
            if not any(map(incomplete, rows)):
                yield rows
                continue
            start = total = 0
            for index, row in enumerate(rows):
                size = size_of(row)
                if index > start and total + size > max_bytes:
                    yield await complete(rows[start:index])
                    start, total = index, 0
                total += size
            yield await complete(rows[start:])
