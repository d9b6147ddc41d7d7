"""Cancel on the server what a cancelled call leaves running there.

When a call's deadline passes (or its client goes away), its task is cancelled.
SQLAlchemy treats a cancellation inside a statement as an "exit exception": it
invalidates the connection, and asyncpg's `terminate()` closes the socket and
also cancels asyncpg's own CancelRequest task before it has connected. PostgreSQL
notices a closed socket only when it next talks to the client, so a statement
waiting on a lock would keep waiting (and holding its locks) until it got the lock.

So when an asyncpg connection is invalidated, a CancelRequest for its backend is
sent on a task of its own, which terminate() cannot reach: the statement ends on
the server within a round trip, the backend sees its client gone and exits, and the
pool opens a fresh connection for the next checkout (an invalidated connection is
never given back dirty). Invalidations are rare (errors, cancellations), so this
costs nothing per call. A CancelRequest reaching an idle backend does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from asyncpg import connect_utils
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

_pending: set[asyncio.Task[None]] = set()


def cancel_on_invalidate(engine: AsyncEngine) -> None:
    """Install the hook on a PostgreSQL (asyncpg) engine's pool."""
    if engine.dialect.driver != "asyncpg":
        return
    event.listen(engine.sync_engine, "invalidate", _on_invalidate)


def _on_invalidate(dbapi_connection: Any, _record: Any, _exception: BaseException | None) -> None:
    raw = getattr(dbapi_connection, "driver_connection", None)
    protocol = getattr(raw, "_protocol", None)
    if raw is None or protocol is None or raw.is_closed():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # invalidated outside the event loop (dispose at exit)
        return
    task = loop.create_task(
        _send_cancel(loop, raw._addr, raw._params, protocol.backend_pid, protocol.backend_secret),
        name="cancel-statement",
    )
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _send_cancel(
    loop: asyncio.AbstractEventLoop, addr: Any, params: Any, pid: int, secret: int
) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await connect_utils._cancel(
                loop=loop, addr=addr, params=params, backend_pid=pid, backend_secret=secret
            )
        log.debug("sent a CancelRequest for backend %d", pid)
