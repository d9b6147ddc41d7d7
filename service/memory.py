"""Give freed memory back to the system after large responses and streams.

glibc's malloc keeps what a large page or stream freed in its heaps (values between
128 KiB-ish and the dynamic mmap threshold are not mmapped), so RSS stays at its peak
long after the call ended: 10 streams of 100 KB rows left a server at 1.1 GB. After a
call that moved a lot of bytes, `release_memory_soon()` schedules one `malloc_trim(0)`,
which returns free pages of every arena to the system. It runs in a worker thread (it
walks the heaps, a few ms) and at most once per `MIN_INTERVAL` seconds per process; a
request during that interval is served once it has passed, so the last large call is
always followed by a trim. Elsewhere than on glibc this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()
_last = 0.0
_scheduled = False


def release_memory_soon() -> None:
    """Ask for one malloc_trim(0) in a worker thread: now, or once MIN_INTERVAL has passed
    since the last one. Call it from the event loop, after a large call."""
    global _scheduled
    if _malloc_trim is None or _scheduled:
        return
    loop = asyncio.get_running_loop()
    _scheduled = True
    loop.call_later(max(0.0, _last + MIN_INTERVAL - time.monotonic()), _trim, loop)


def _trim(loop: asyncio.AbstractEventLoop) -> None:
    global _last, _scheduled
    _scheduled = False
    _last = time.monotonic()
    if _malloc_trim is not None and not loop.is_closed():
        loop.run_in_executor(None, _malloc_trim, 0)
