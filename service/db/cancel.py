"""Cancel on the server the statements of a call whose deadline passed.

At a call's deadline the handler wrapper asks the call's scope (service/deadline.py)
to cancel: each connection the call holds registered there, at checkout, how to send
PostgreSQL a CancelRequest for its backend. The statement then fails with
query_canceled, the transaction rolls back like after any error, and the connection
goes back to the pool clean, ready for the next call.

The backstop is the invalidation hook. When a task is cancelled inside a statement
(the client went away, or a statement outlived the grace the wrapper gives it),
SQLAlchemy treats the cancellation as an "exit exception" and invalidates the
connection, and asyncpg's `terminate()` also cancels asyncpg's own CancelRequest
task before it has connected. PostgreSQL notices a closed socket only when it next
talks to the client, so a statement waiting on a lock would keep waiting (and
holding its locks). So an invalidated asyncpg connection's backend gets a
CancelRequest too, from a task of its own that terminate() cannot reach, and the
pool opens a fresh connection for the next checkout.

A CancelRequest reaching an idle backend does nothing. Per call this costs a
context-variable read and a dict entry at checkout and checkin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import Any

from asyncpg import connect_utils
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from service.deadline import CURRENT_CALL

log = logging.getLogger(__name__)

_pending: set[asyncio.Task[None]] = set()
_SCOPE = "blog_call_scope"


def cancel_on_invalidate(engine: AsyncEngine) -> None:
    """Install the hooks on a PostgreSQL (asyncpg) engine's pool: a connection checked
    out inside a call registers how to cancel its statement in the call's scope
    (service/deadline.py), and an invalidated connection's statement is cancelled."""
    if engine.dialect.driver != "asyncpg":
        return
    event.listen(engine.sync_engine, "checkout", _on_checkout)
    event.listen(engine.sync_engine, "checkin", _on_checkin)
    event.listen(engine.sync_engine, "invalidate", _on_invalidate)


def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    scope = CURRENT_CALL.get()
    if scope is not None:
        scope.busy[id(record)] = partial(_cancel_statement, dbapi_connection)
        record.info[_SCOPE] = scope


def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
    if record is None:
        return
    scope = record.info.pop(_SCOPE, None)
    if scope is not None:
        scope.busy.pop(id(record), None)


def _on_invalidate(dbapi_connection: Any, _record: Any, _exception: BaseException | None) -> None:
    _cancel_statement(dbapi_connection)


def _cancel_statement(dbapi_connection: Any) -> None:
    """Send a CancelRequest for the connection's backend, on a task of its own."""
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
