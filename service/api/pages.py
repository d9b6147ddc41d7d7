"""List pages are bounded by bytes as well as rows (API.md, "Details that callers rely
on"): a page stops before its encoded response reaches 4 MiB, the most a gRPC client
left at its defaults receives, and hands back a next_page_token like any other page."""

from __future__ import annotations

# 4 MiB less room for the page token, gRPC's framing and slack; the sizes summed against
# it are convert.py's estimates, which are above the encoded sizes.
MAX_PAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024
# A response at least this large asks for freed memory to go back to the system once it
# has gone out (service/memory.py).
LARGE_RESPONSE_BYTES = 1024 * 1024
