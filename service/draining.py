"""Graceful shutdown without CANCELLED: track calls in flight, refuse new ones, drain.

grpc.aio's `server.stop(grace)` cancels every call that reached the server but was not
yet taken by a handler (grpc/grpc#41785: core kills its queue of unmatched calls the
moment shutdown starts, and they end CANCELLED with no handler ever run), and at the
end of the grace it cancels whatever still runs, streams included (CANCELLED too).
So the server does not call `stop` until nothing is left for it to cancel:
`Drain.begin` makes the handler wrapper refuse every new call while gRPC keeps
handing queued calls to handlers; `wait_quiet` waits for the unary calls in flight
to finish and for arrivals to pause; at the grace deadline `end_all` ends what still
runs (streams) with UNAVAILABLE, and only then may `stop` cancel.

A refused call is parked before it is answered UNAVAILABLE: a client that sends its
next call as soon as the last one failed would otherwise keep gRPC's queue full
until `stop` cancels what is in it. Parked, such clients fall silent; the server then
calls `stop` (GOAWAY: their retries go to another replica) and `release` answers the
parked calls UNAVAILABLE. A call is parked at most PARK_MAX seconds, and never past
its own deadline.
"""

from __future__ import annotations

import asyncio
import time

from service.errors import Unavailable

POLL = 0.02
PARK_MAX = 2.0


class Drain:
    """The calls in flight of one server, and whether it still takes new ones."""

    def __init__(self) -> None:
        self.draining = False
        self.refused = 0  # calls answered UNAVAILABLE because shutdown had begun
        self.ended = 0  # calls ended UNAVAILABLE at the grace deadline
        self._calls: dict[asyncio.Task[object], bool] = {}  # task -> streaming
        self._unary = 0
        self._last_arrival = 0.0
        self._ending: set[asyncio.Task[object]] = set()
        self._released = asyncio.Event()
        self.parked = 0

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def refuse(self, time_remaining: float | None) -> None:
        """Answer a call that arrived after shutdown began: park it (see the module
        docstring), then UNAVAILABLE."""
        self._last_arrival = time.monotonic()
        self.refused += 1
        wait = PARK_MAX if time_remaining is None else min(PARK_MAX, time_remaining - 0.2)
        if wait > 0 and not self._released.is_set():
            self.parked += 1
            try:
                await asyncio.wait_for(self._released.wait(), wait)
            except TimeoutError:
                pass
            finally:
                self.parked -= 1
        raise Unavailable("the server is shutting down; retry (another replica answers)")

    def release(self) -> None:
        """Answer the parked calls (once `stop` has begun: no more arrivals)."""
        self._released.set()

    def enter(self, streaming: bool) -> asyncio.Task[object]:
        """Register the current call (the wrapper calls `refuse` instead once draining)."""
        self._last_arrival = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = streaming
        if not streaming:
            self._unary += 1
        return task

    def leave(self, task: asyncio.Task[object]) -> None:
        streaming = self._calls.pop(task, None)
        if streaming is False:
            self._unary -= 1
        self._ending.discard(task)

    def ended_by_shutdown(self, task: asyncio.Task[object] | None) -> bool:
        return task is not None and task in self._ending

    def begin(self) -> None:
        self.draining = True

    async def wait_quiet(self, *, quiet: float, quiet_max: float, until: float) -> bool:
        """Wait until no unary call is in flight and none arrived for `quiet` seconds
        (gRPC's queue of not yet handled calls is then empty). Once the unary calls are
        done, wait at most `quiet_max` more for that pause (clients that keep retrying
        never pause: what they send now arrived after the signal). Give up at `until`
        (monotonic). True when the pause was seen."""
        drained_at: float | None = None
        while True:
            now = time.monotonic()
            if self._unary == 0:
                if now - self._last_arrival >= quiet:
                    return True
                if drained_at is None:
                    drained_at = now
                elif now - drained_at >= quiet_max:
                    return False
            else:
                drained_at = None
            if now >= until:
                return False
            await asyncio.sleep(POLL)

    def end_all(self) -> None:
        """End every call still running (streams, slow unary calls) with UNAVAILABLE:
        the wrapper sees the cancellation, knows it came from here, and aborts."""
        for task in list(self._calls):
            if task not in self._ending and not task.done():
                self._ending.add(task)
                self.ended += 1
                task.cancel()
