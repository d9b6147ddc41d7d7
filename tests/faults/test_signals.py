"""SIGTERM under load with streams open (issue 8 item 6), and SIGKILL inside a batch."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
import uuid
from pathlib import Path

import grpc
from harness import Figures, fetch, served, stubs
from sqlalchemy import text

from blog.v1 import post_pb2, user_pb2
from service.config import Settings
from service.db.engine import create_engine
from support.posts import insert_posts

Code = grpc.StatusCode
RUNS = int(os.environ.get("FAULT_SIGTERM_RUNS", "4"))
GRACE = 3.0
CLIENTS = 20
STREAMS = 4


async def seed_users(target: str, count: int, prefix: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        users, _ = stubs(channel)
        for start in range(0, count, 1000):
            await users.BatchCreateUsers(
                user_pb2.BatchCreateUsersRequest(
                    requests=[
                        user_pb2.CreateUserRequest(
                            user=user_pb2.User(
                                username=f"{prefix}{i}", email=f"{prefix}{i}@example.com"
                            )
                        )
                        for i in range(start, min(count, start + 1000))
                    ]
                ),
                timeout=60,
            )


async def seed_posts(database: str, count: int, *, body_chars: int) -> None:
    """`count` posts with bodies of `body_chars`, straight into the tables."""
    engine = create_engine(Settings(database_url=database))
    try:
        async with engine.begin() as connection:
            author = await connection.scalar(text("SELECT min(id) FROM users"))
        await insert_posts(engine, author, count, body="b" * body_chars)
    finally:
        await engine.dispose()


async def one_run(database: str, log_dir: Path, run: int) -> dict[str, object]:
    """20 clients (CreateUser, ListUsers 1000 FULL) and 4 slow streams; SIGTERM after 3 s.
    Every call is recorded with its outcome; calls keep coming after the signal, as
    real clients' would, until the server is gone."""
    env = {
        "shutdown_grace": str(GRACE),
        "stream_batch_rows": "10",
        "db_pool_size": "10",
        "db_max_overflow": "10",
        "stream_max_concurrent": "8",
        "log_level": "INFO",
        "access_log": "false",
    }
    codes: collections.Counter[str] = collections.Counter()
    before_signal: collections.Counter[str] = collections.Counter()
    stream_codes: collections.Counter[str] = collections.Counter()
    events: list[tuple[float, float, int]] = []
    async with served(database, log_dir, **env) as server:
        if run == 0:
            await seed_users(server.target, 1000, f"s{uuid.uuid4().hex[:6]}_")
            await seed_posts(database, 2000, body_chars=8000)
        signalled = asyncio.Event()
        gone = asyncio.Event()
        signal_at = 0.0

        async def client(index: int) -> None:
            async with grpc.aio.insecure_channel(server.target) as channel:
                users, _ = stubs(channel)
                n = 0
                while not gone.is_set():
                    n += 1
                    started = time.monotonic()
                    try:
                        if n % 2:
                            name = f"c{uuid.uuid4().hex[:12]}"
                            await users.CreateUser(
                                user_pb2.CreateUserRequest(
                                    user=user_pb2.User(username=name, email=f"{name}@e.com"),
                                    request_id=str(uuid.uuid4()),
                                ),
                                timeout=20,
                            )
                        else:
                            await users.ListUsers(
                                user_pb2.ListUsersRequest(
                                    page_size=1000, view=user_pb2.USER_VIEW_FULL
                                ),
                                timeout=20,
                            )
                        code = "OK"
                    except grpc.aio.AioRpcError as error:
                        code = error.code().name
                    codes[code] += 1
                    if code == "CANCELLED":
                        events.append((started - signal_at, time.monotonic() - signal_at, n % 2))
                    if not signal_at or started < signal_at:
                        before_signal[code] += 1
                    if code != "OK":
                        await asyncio.sleep(0.05)

        async def stream(index: int) -> None:
            async with grpc.aio.insecure_channel(server.target) as channel:
                _, posts = stubs(channel)
                call = posts.StreamPosts(post_pb2.StreamPostsRequest(), timeout=60)
                try:
                    async for _ in call:
                        if not gone.is_set():
                            await asyncio.sleep(0.2)  # a slow reader: open past the grace
                    stream_codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    stream_codes[error.code().name] += 1

        tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        tasks += [asyncio.create_task(stream(i)) for i in range(STREAMS)]
        await asyncio.sleep(3.0)
        signal_at = time.monotonic()
        server.signal(signal.SIGTERM)
        signalled.set()
        exit_code = await server.wait_exit(GRACE + 10)
        exit_after = time.monotonic() - signal_at
        await asyncio.sleep(0.3)
        gone.set()
        done, pending = await asyncio.wait(tasks, timeout=30)
        assert not pending, (len(pending), dict(codes), dict(stream_codes), exit_code)
        for task in done:
            task.result()
        log = server.log()
    return {
        "codes": codes,
        "before": before_signal,
        "streams": stream_codes,
        "exit_code": exit_code,
        "exit_after": exit_after,
        "log": log,
        "events": events,
    }


async def test_sigterm_under_load_with_streams_open_cancels_nothing(
    database: str, log_dir: Path, figures: Figures
) -> None:
    results = [await one_run(database, log_dir, run) for run in range(RUNS)]
    cancelled = sum(r["codes"]["CANCELLED"] + r["streams"]["CANCELLED"] for r in results)  # type: ignore[index]
    calls = sum(sum(r["codes"].values()) for r in results)  # type: ignore[attr-defined]
    unexpected = collections.Counter()
    for r in results:
        for code, n in r["codes"].items():  # type: ignore[attr-defined]
            if code not in ("OK", "UNAVAILABLE"):
                unexpected[code] += n
        for code, n in r["streams"].items():  # type: ignore[attr-defined]
            if code not in ("OK", "UNAVAILABLE"):
                unexpected[f"stream {code}"] += n
    worst_exit = max(float(r["exit_after"]) for r in results)  # type: ignore[arg-type]
    exits = [r["exit_code"] for r in results]
    early = sum(1 for r in results for e in r["events"] if e[0] < 0)  # type: ignore[attr-defined]
    other = sum(n for code, n in unexpected.items() if not code.endswith("CANCELLED"))
    figure = (
        f"{RUNS} runs, {calls} unary calls + {RUNS * STREAMS} streams: CANCELLED {cancelled} "
        f"({early} sent before the signal), other codes besides OK/UNAVAILABLE {other}, "
        f"exit codes {sorted(set(exits))}, "
        f"slowest exit {worst_exit:.2f}s after SIGTERM (grace {GRACE:g}s)"
    )
    ok = cancelled == 0 and not unexpected and exits == [0] * RUNS and worst_exit <= GRACE + 1.5
    figures.record(
        "sigterm",
        f"{CLIENTS} clients (CreateUser, ListUsers 1000 FULL) and {STREAMS} slow streams "
        f"against `serve` (SHUTDOWN_GRACE={GRACE:g}); SIGTERM after 3 s; {RUNS} runs",
        figure,
        passed=ok,
    )
    assert cancelled == 0, "\n".join(
        f"run {i}: {dict(r['codes'])} cancelled (sent, ended after the signal, create?): "  # type: ignore[call-overload]
        f"{[tuple(round(x, 3) for x in e) for e in r['events']]}; "  # type: ignore[attr-defined]
        + " | ".join(
            line for line in str(r["log"]).splitlines() if "drain" in line or "grace" in line
        )
        for i, r in enumerate(results)
        if r["events"]
    )
    assert not unexpected, (unexpected, [dict(r["streams"]) for r in results])
    assert exits == [0] * RUNS, [r["log"][-2000:] for r in results if r["exit_code"] != 0]  # type: ignore[index]
    assert worst_exit <= GRACE + 1.5


async def test_sigkill_inside_a_batch_is_all_or_nothing(
    database: str, log_dir: Path, figures: Figures
) -> None:
    """SIGKILL the server while BatchCreateUsers of 1,000 runs: afterwards either all
    1,000 users exist or none; and the batch retried with its top-level request_id on a
    fresh server returns those same users (issue 8 item 9), never ALREADY_EXISTS."""
    rounds = 6
    outcomes: collections.Counter[str] = collections.Counter()
    for index in range(rounds):
        async with served(database, log_dir) as server:
            prefix = f"k{uuid.uuid4().hex[:6]}_"
            request = user_pb2.BatchCreateUsersRequest(
                requests=[
                    user_pb2.CreateUserRequest(
                        user=user_pb2.User(username=f"{prefix}{i}", email=f"{prefix}{i}@e.com")
                    )
                    for i in range(1000)
                ],
                request_id=str(uuid.uuid4()),
            )
            async with grpc.aio.insecure_channel(server.target) as channel:
                users, _ = stubs(channel)
                call = users.BatchCreateUsers(request, timeout=30)
                # Kill at a different point of the batch each round (0-150 ms in).
                await asyncio.sleep(0.03 * index)
                server.kill()
                try:
                    await call
                    client_saw = "OK"
                except grpc.aio.AioRpcError as error:
                    client_saw = error.code().name
            rows = await fetch(
                database,
                "SELECT count(*) AS n FROM users WHERE username LIKE $1",
                prefix + "%",
            )
            count = rows[0]["n"]
            assert count in (0, 1000), count
            outcomes[f"{count} rows ({client_saw})"] += 1
            assert not (client_saw == "OK" and count == 0)
        await retry_check(database, log_dir, request, prefix)
    figures.record(
        "sigkill",
        f"{rounds} SIGKILLs 0-150 ms into BatchCreateUsers of 1,000; rows counted afterwards",
        "all or nothing: " + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())),
        passed=True,
    )


async def retry_check(
    database: str, log_dir: Path, request: user_pb2.BatchCreateUsersRequest, prefix: str
) -> None:
    """The client's retry after the kill, on a fresh server, with the same request_id:
    it gets the 1,000 users, and they are exactly the rows in the database (the
    committed ones when the kill came after the commit, new ones when before)."""
    async with (
        served(database, log_dir) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        users, _ = stubs(channel)
        response = await users.BatchCreateUsers(request, timeout=60)
    rows = await fetch(
        database, "SELECT id FROM users WHERE username LIKE $1 ORDER BY id", prefix + "%"
    )
    assert sorted(user.id for user in response.users) == [row["id"] for row in rows]
    assert len(rows) == 1000
