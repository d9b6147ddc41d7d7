"""Pool metrics: size, checked out, overflow, waits and wait time, set when they change.

Pool events keep the gauges current (multi-process mode has no collect-time
callbacks); the time to get a connection is measured around the pool's own
`_do_get`, the one place every checkout passes.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from service.observability.metrics import Metrics


def instrument_pool(engine: AsyncEngine, metrics: Metrics, name: str, max_overflow: int) -> None:
    pool = engine.sync_engine.pool
    if not isinstance(pool, QueuePool):
        return
    size = pool.size()
    limit = size + max_overflow
    metrics.pool_size.labels(name).set(size)
    metrics.pool_limit.labels(name).set(limit)
    checked_out = metrics.pool_checked_out.labels(name)
    overflow = metrics.pool_overflow.labels(name)
    waits = metrics.pool_waits.labels(name)
    wait_seconds = metrics.pool_wait_seconds.labels(name)

    def update(*_: Any) -> None:
        checked_out.set(pool.checkedout())
        overflow.set(max(0, pool.overflow()))

    for name_of_event in ("checkout", "checkin", "close", "close_detached", "invalidate"):
        event.listen(pool, name_of_event, update)
    update()

    do_get = pool._do_get

    def timed_do_get() -> Any:
        if pool.checkedout() >= limit:
            waits.inc()
        started = time.perf_counter()
        try:
            return do_get()
        finally:
            wait_seconds.observe(time.perf_counter() - started)

    pool._do_get = timed_do_get  # type: ignore[method-assign]
