"""Rows of a statement in batches from a server-side cursor, for streams."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession


async def stream_partitions(
    session: AsyncSession, stmt: Any, *, batch_size: int
) -> AsyncGenerator[Sequence[Any]]:
    """`AsyncSession.stream` with `yield_per` (a server-side cursor on PostgreSQL), by
    `partitions()`. Close it with `contextlib.aclosing`: its `finally` closes the cursor
    when the consumer stops early (a cancelled call)."""
    result = await session.stream(stmt.execution_options(yield_per=batch_size))
    try:
        async for partition in result.partitions():
            yield partition
    finally:
        await result.close()
