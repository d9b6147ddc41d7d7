"""Pool metrics: size, checked out, overflow, waits and wait time, set when they change.

The gauges are set as connections leave and return (multi-process mode has no
collect-time callbacks), and the time to get a connection is measured, around the
pool's own `_do_get` and `_return_conn`, the two places every checkout and return
pass. (`engine.dispose()` makes a new pool without them: the server disposes only
at shutdown.)
"""

from __future__ import annotations

import time
from typing import Any

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

    def update() -> None:
        checked_out.set(pool.checkedout())
        overflow.set(max(0, pool.overflow()))

    update()
    # Pool events fire before the pool's own bookkeeping (a "checkin" listener still
    # sees the connection checked out), so the gauges are set after the two methods
    # every checkout and return pass through.
    do_get = pool._do_get
    return_conn = pool._return_conn

    def timed_do_get() -> Any:
        if pool.checkedout() >= limit:
            waits.inc()
        started = time.perf_counter()
        try:
            return do_get()
        finally:
            wait_seconds.observe(time.perf_counter() - started)
            update()

    def counted_return_conn(record: Any) -> None:
        try:
            return_conn(record)
        finally:
            update()

    pool._do_get = timed_do_get  # type: ignore[method-assign]
    pool._return_conn = counted_return_conn  # type: ignore[method-assign]
