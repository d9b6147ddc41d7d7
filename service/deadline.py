"""A call's deadline as the database layer sees it.

The handler wrapper opens a `CallScope` for each unary call (`CURRENT_CALL`); the
engine (db/cancel.py) registers in it, for each connection the call checks out, how
to cancel that connection's running statement on the server. When the deadline
passes, the wrapper asks the scope to cancel: the statement ends with PostgreSQL's
query_canceled error, which rolls back like any error, so the connection goes back
to the pool clean (a task cancellation instead would make SQLAlchemy discard it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar


class CallScope:
    """The cancel callbacks of the connections one call holds, by pool record."""

    __slots__ = ("busy", "expired")

    def __init__(self) -> None:
        self.busy: dict[int, Callable[[], None]] = {}
        self.expired = False

    def cancel_statements(self) -> bool:
        """Ask the database to cancel the call's statements; False if it holds none."""
        cancels = list(self.busy.values())
        for cancel in cancels:
            cancel()
        return bool(cancels)


CURRENT_CALL: ContextVar[CallScope | None] = ContextVar("blog_call_scope", default=None)
