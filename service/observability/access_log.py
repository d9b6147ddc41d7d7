"""The access log: one line per finished call, on the logger `service.access`.

Fields: method, code, reason, duration_ms, caller, peer, request_id, trace_id.
With LOG_FORMAT=json they are top-level keys of the line (service/logs.py reads
them from the record's `access` attribute); in text they follow the message as
`key=value`. Never a request body, a token or a password: the fields above are
all a line holds, and `caller` is the name the token file gives a token.
"""

from __future__ import annotations

import logging
import re

access_log = logging.getLogger("service.access")

ACCESS_FIELDS = (
    "method",
    "code",
    "reason",
    "duration_ms",
    "caller",
    "peer",
    "request_id",
    "trace_id",
)
REQUEST_ID_HEADER = "x-request-id"
# A caller's request id is echoed and logged: printable ASCII without spaces or quotes,
# at most 128 characters, or the service makes a new one.
_REQUEST_ID = re.compile(r"[!#-~]{1,128}")


_MESSAGE = "%s %s reason=%s duration_ms=%.3f caller=%s peer=%s request_id=%s trace_id=%s"


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def log_call(
    level: int,
    method: str,
    code: str,
    reason: str,
    duration_ms: float,
    caller: str,
    peer: str,
    request_id: str,
    trace_id: str,
) -> None:
    """Emit the line (the caller checked `access_log.isEnabledFor(level)`)."""
    fields = {
        "method": method,
        "code": code,
        "reason": reason,
        "duration_ms": round(duration_ms, 3),
        "caller": caller,
        "peer": peer,
        "request_id": request_id,
        "trace_id": trace_id,
    }
    # makeRecord + handle is Logger.log without its stack walk for the caller's file and
    # line (findCaller), which would always name this function anyway.
    record = access_log.makeRecord(
        access_log.name,
        level,
        __file__,
        0,
        _MESSAGE,
        (method, code, reason or "-", duration_ms, caller, peer, request_id, trace_id or "-"),
        None,
        extra={"access": fields},
    )
    access_log.handle(record)
