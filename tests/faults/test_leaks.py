"""Cancelled streams and passed deadlines leak nothing; large rows stay bounded."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
from harness import Figures, served, sessions, stubs
from test_signals import seed_posts, seed_users

from blog.v1 import post_pb2, user_pb2

STREAMS = 1000
DEADLINES = 1000
CONCURRENCY = 8
RSS_BOUND_MB = 60.0  # a leak check, not a benchmark


async def settle(database: str, seconds: float = 10.0) -> dict[str, int]:
    """pg_stat_activity of the service once nothing runs: no session active or idle
    in a transaction (a checked-out connection shows as one of those)."""
    deadline = time.monotonic() + seconds
    while True:
        states = await sessions(database)
        busy = {s: n for s, n in states.items() if s not in ("idle", "")}
        if not busy or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.2)


async def test_cancelled_streams_and_passed_deadlines_leak_nothing(
    database: str, log_dir: Path, figures: Figures
) -> None:
    rng = random.Random(8)
    async with served(
        database, log_dir, stream_batch_rows="20", stream_max_concurrent="16"
    ) as server:
        await seed_users(server.target, 3000, "leak_")
        async with grpc.aio.insecure_channel(server.target) as channel:
            users, _ = stubs(channel)
            # Warm up, then take the starting RSS.
            for _ in range(20):
                await users.ListUsers(user_pb2.ListUsersRequest(page_size=1000, view=2))
            start_rss = server.rss_mb()
            codes: dict[str, int] = {}

            def count(code: str) -> None:
                codes[code] = codes.get(code, 0) + 1

            async def cancelled_stream(seed: int) -> None:
                local = random.Random(seed)
                call = users.StreamUsers(user_pb2.StreamUsersRequest(view=local.choice([1, 2])))
                try:
                    for _ in range(local.randint(0, 6)):
                        await call.read()
                        if local.random() < 0.3:
                            await asyncio.sleep(local.random() * 0.01)
                except grpc.aio.AioRpcError as error:
                    # The slot of a stream cancelled a moment ago may not be free yet.
                    count(f"stream {error.code().name}")
                    return
                finally:
                    call.cancel()
                count("stream cancelled")

            async def passed_deadline(seed: int) -> None:
                local = random.Random(seed)
                try:
                    await users.ListUsers(
                        user_pb2.ListUsersRequest(page_size=1000, view=2),
                        timeout=local.uniform(0.002, 0.15),
                    )
                    count("OK")
                except grpc.aio.AioRpcError as error:
                    count(error.code().name)

            async def worker(jobs: list[tuple[str, int]]) -> None:
                for kind, seed in jobs:
                    await (cancelled_stream(seed) if kind == "s" else passed_deadline(seed))

            jobs = [("s", rng.randrange(2**31)) for _ in range(STREAMS)]
            jobs += [("d", rng.randrange(2**31)) for _ in range(DEADLINES)]
            rng.shuffle(jobs)
            started = time.monotonic()
            await asyncio.wait_for(
                asyncio.gather(*(worker(jobs[i::CONCURRENCY]) for i in range(CONCURRENCY))), 240
            )
            elapsed = time.monotonic() - started
            states = await settle(database)
            await asyncio.sleep(1.0)
            end_rss = server.rss_mb()
            # Still serving.
            await users.ListUsers(user_pb2.ListUsersRequest(page_size=10))
    busy = {s: n for s, n in states.items() if s not in ("idle", "")}
    in_tx = states.get("idle in transaction", 0) + states.get("idle in transaction (aborted)", 0)
    growth = end_rss - start_rss
    figure = (
        f"{STREAMS} streams cancelled + {DEADLINES} deadlines ({codes.get('DEADLINE_EXCEEDED', 0)}"
        f" passed, {codes.get('OK', 0)} beat them) in {elapsed:.0f}s: connections busy "
        f"{sum(busy.values())}, idle in transaction {in_tx}, RSS {start_rss:.0f} -> "
        f"{end_rss:.0f} MB (bound +{RSS_BOUND_MB:g})"
    )
    ok = not busy and growth < RSS_BOUND_MB
    figures.record(
        "leaks",
        f"{CONCURRENCY} clients against `serve`: StreamUsers cancelled after 0-6 messages, "
        "ListUsers 1000 FULL with 2-150 ms deadlines; then pg_stat_activity and RSS",
        figure,
        passed=ok,
    )
    assert not busy, states
    assert growth < RSS_BOUND_MB, (start_rss, end_rss)
    assert set(codes) <= {
        "stream cancelled",
        "stream RESOURCE_EXHAUSTED",
        "OK",
        "DEADLINE_EXCEEDED",
    }, codes


async def test_stalled_streams_and_big_pages_of_large_rows_stay_bounded(
    database: str, log_dir: Path, figures: Figures
) -> None:
    """10 StreamPosts over 1,000 posts of 100 KB that the client does not read, and 8
    concurrent ListPosts of 1,000 of them: RSS growth under 100 MB (API.md's bound)."""
    async with served(database, log_dir, db_pool_size="12", db_max_overflow="8") as server:
        await seed_users(server.target, 1, "mem_")
        await seed_posts(database, 1000, body_chars=100_000)
        async with grpc.aio.insecure_channel(server.target) as channel:
            _, posts = stubs(channel)
            await posts.ListPosts(post_pb2.ListPostsRequest(page_size=10))
            start_rss = peak = server.rss_mb()
            stalled = [posts.StreamPosts(post_pb2.StreamPostsRequest()) for _ in range(10)]
            for call in stalled:
                await call.read()  # started; then never read again
            codes: dict[str, int] = {}

            async def page() -> None:
                try:
                    await posts.ListPosts(post_pb2.ListPostsRequest(page_size=1000), timeout=60)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] = codes.get(error.code().name, 0) + 1

            pages = asyncio.gather(*(page() for _ in range(8)))
            while not pages.done():
                peak = max(peak, server.rss_mb())
                await asyncio.sleep(0.05)
            await pages
            for call in stalled:
                call.cancel()
            await asyncio.sleep(2.0)
            after = server.rss_mb()
    growth = peak - start_rss
    figures.record(
        "memory",
        "10 stalled StreamPosts + 8 concurrent ListPosts{page_size: 1000} over 1,000 posts "
        "of 100 KB; server RSS sampled every 50 ms",
        f"RSS {start_rss:.0f} -> peak {peak:.0f} -> after {after:.0f} MB (bound +100 MB); "
        f"pages {codes}",
        passed=growth < 100 and after - start_rss < 100,
    )
    assert codes == {"OK": 8}, codes
    assert growth < 100, (start_rss, peak)
    assert after - start_rss < 100, (start_rss, after)
