"""Logging set-up: plain text for people, one JSON object a line for collectors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
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
        return json.dumps(entry)


def configure(level: str, fmt: str, *, access_log: bool = False) -> None:
    """The root handler and level; with `access_log` the access log (logger
    `service.access`, one INFO line per call) is on whatever LOG_LEVEL says, so
    LOG_LEVEL=WARNING quiets the rest without losing it."""
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
