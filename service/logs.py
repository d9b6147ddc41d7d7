"""Logging set-up: plain text for people, one JSON object a line for collectors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# One encoder for every line: `json.dumps` builds a new one per call unless called with
# defaults only, and the circular-reference check is for nested data a line never has.
_encode = json.JSONEncoder(check_circular=False).encode


class _Clock:
    """ISO 8601 UTC times, the date and seconds formatted once a second (every access-log
    line needs one; `datetime.isoformat` per line was a sixth of the line's cost)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        micro = min(round((created - second) * 1e6), 999_999)
        return f"{self._prefix}.{micro:06d}+00:00"


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self._clock.iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        fields = getattr(record, "access", None)
        if fields is not None:  # an access-log line: its fields are top-level keys
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry)


def configure(level: str, fmt: str, *, access_log: bool = False) -> None:
    """The root handler and level; with `access_log` the access log (logger
    `service.access`, one INFO line per call) is on whatever LOG_LEVEL says, so
    LOG_LEVEL=WARNING quiets the rest without losing it."""
    # Nothing reads a record's thread, process or task name (the formats use the process
    # id only): skip looking them up for every line.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # 3.12+
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic announces each of its plugins at INFO on every migrate; keep the rest.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("service.access").setLevel(logging.INFO if access_log else logging.WARNING)
