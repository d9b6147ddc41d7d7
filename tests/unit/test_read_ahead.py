"""service.api.streams.read_ahead: the next batch is produced while this one is used, only
after batches `eager` accepts, and closing it cancels the step in flight and closes the
source (whose `finally` is where a stream's cursor closes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest

from service.api.streams import read_ahead


class Source:
    """An async generator of 0..n-1 that records when each step starts and whether its
    `finally` ran; `stall` makes a step wait until released."""

    def __init__(self, n: int, stall: int | None = None) -> None:
        self.n = n
        self.stall = stall
        self.started: list[int] = []
        self.closed = False
        self.release = asyncio.Event()

    async def items(self) -> AsyncGenerator[int]:
        try:
            for i in range(self.n):
                self.started.append(i)
                if i == self.stall:
                    await self.release.wait()
                await asyncio.sleep(0)
                yield i
        finally:
            self.closed = True


async def test_yields_every_item_in_order_and_closes_the_source() -> None:
    source = Source(5)
    async with aclosing(read_ahead(source.items(), eager=lambda _: True)) as ahead:
        assert [i async for i in ahead] == [0, 1, 2, 3, 4]
    assert source.closed


async def test_the_next_item_is_produced_while_the_consumer_works_after_an_eager_one() -> None:
    source = Source(3)
    async with aclosing(read_ahead(source.items(), eager=lambda i: i == 0)) as ahead:
        assert await anext(ahead) == 0
        await asyncio.sleep(0.01)  # the consumer "works"; the step for item 1 runs
        assert source.started == [0, 1]
        assert await anext(ahead) == 1
        await asyncio.sleep(0.01)  # item 1 was not eager: nothing is produced meanwhile
        assert source.started == [0, 1]
        assert await anext(ahead) == 2


async def test_closing_cancels_the_step_in_flight_and_closes_the_source() -> None:
    source = Source(5, stall=1)
    ahead = read_ahead(source.items(), eager=lambda _: True)
    assert await anext(ahead) == 0
    await asyncio.sleep(0.01)
    assert source.started == [0, 1]  # item 1's step waits in flight
    await ahead.aclose()
    assert source.closed


async def test_a_consumer_cancelled_while_waiting_leaves_the_source_closed() -> None:
    source = Source(5, stall=1)

    async def consume() -> None:
        async with aclosing(read_ahead(source.items(), eager=lambda _: True)) as ahead:
            async for _ in ahead:
                pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)  # the consumer awaits item 1, which stalls
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed


async def test_an_error_in_the_source_reaches_the_consumer() -> None:
    async def failing() -> AsyncGenerator[int]:
        yield 0
        raise RuntimeError("fetch failed")

    async with aclosing(read_ahead(failing(), eager=lambda _: True)) as ahead:
        assert await anext(ahead) == 0
        with pytest.raises(RuntimeError, match="fetch failed"):
            await anext(ahead)
