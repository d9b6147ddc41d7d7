"""Database ceilings, run as a subprocess on uvloop (like the service): what one Python
process gets out of PostgreSQL with no gRPC in the way.

    python -m bench.dbceil '{"mode": ..., "url": ..., "users": N, "concurrency": 32,
                             "warmup": 1, "duration": 5}'

Modes:
    asyncpg_pool          pool.acquire() + fetchrow(pk select) + release (default reset)
    asyncpg_pool_noreset  the same with the pool's reset replaced by a no-op
                          (`reset=` coroutine: no RESET ALL/UNLISTEN round trip on release)
    asyncpg_direct        one connection per task, no pool at all
    sa_core               SQLAlchemy Core select(*columns).where(id=...) on an AUTOCOMMIT engine
    sa_orm                ORM `async with Session() as s: await s.get(User, id)`, AUTOCOMMIT
    cursor_raw            one cursor over all posts, 1,000 rows a fetch, no gRPC (rows/s)
    copy_users            COPY of 1,000 user-like rows a statement (rows/s)

Prints JSON lines on stdout: {"event": "measure_start"}, {"event": "measure_end"},
then {"event": "result", ...}; the parent samples CPU between the two events.
"""

from __future__ import annotations

import array
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import uvloop

from bench.seed import asyncpg_dsn

PK_SQL = (
    "SELECT id, username, email, display_name, bio, create_time, update_time, delete_time,"
    " version FROM users WHERE id = $1"
)
POSTS_SQL = (
    "SELECT id, author_id, title, body, create_time, update_time, version FROM posts"
    " ORDER BY create_time DESC, id DESC"
)
COPY_COLUMNS = [
    "username",
    "email",
    "email_normalized",
    "display_name",
    "bio",
    "create_time",
    "update_time",
    "version",
]


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def closed_loop(
    tasks: list[Callable[[], Awaitable[int]]], warmup: float, duration: float
) -> dict[str, Any]:
    """Run each task function in a loop; count completions in [start+warmup, +duration)."""
    monotonic = time.monotonic
    start = monotonic()
    measure_from = start + warmup
    end = measure_from + duration
    lat: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    state: dict[str, Any] = {"ok": 0, "rows": 0, "first_error": None}

    async def loop(fn: Callable[[], Awaitable[int]]) -> None:
        while True:
            began = monotonic()
            if began >= end:
                return
            try:
                rows = await fn()
            except Exception as error:
                if measure_from <= monotonic() < end:
                    errors[type(error).__name__] += 1
                    state["first_error"] = state["first_error"] or repr(error)
                continue
            done = monotonic()
            if measure_from <= done < end:
                lat.append(done - began)
                state["ok"] += 1
                state["rows"] += rows

    async def marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - monotonic()))
        emit(event="measure_start")
        await asyncio.sleep(max(0.0, end - monotonic()))
        emit(event="measure_end")

    await asyncio.gather(marks(), *(loop(fn) for fn in tasks))
    return {
        "ok": state["ok"],
        "rows": state["rows"],
        "seconds": duration,
        # Percentiles, not the raw latencies: one short line on the pipe.
        "percentiles_ms": _percentiles(sorted(lat)),
        "errors": dict(errors),
        "first_error": state["first_error"],
    }


def _percentiles(lat: list[float]) -> dict[str, float | None]:
    from bench.metrics import percentile

    return {str(q): None if (v := percentile(lat, q)) is None else v * 1000 for q in (50, 99, 99.9)}


async def _noop_reset(_connection: asyncpg.Connection) -> None:
    return None


async def run(config: dict[str, Any]) -> dict[str, Any]:
    mode = config["mode"]
    dsn = asyncpg_dsn(config["url"])
    n_users = int(config.get("users", 1))
    concurrency = int(config.get("concurrency", 32))
    warmup = float(config.get("warmup", 1.0))
    duration = float(config.get("duration", 5.0))
    rng = random.Random(7)
    randint = rng.randint

    if mode in ("asyncpg_pool", "asyncpg_pool_noreset"):
        kwargs: dict[str, Any] = {"reset": _noop_reset} if mode.endswith("noreset") else {}
        pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency, **kwargs)

        async def pooled() -> int:
            async with pool.acquire() as con:
                await con.fetchrow(PK_SQL, randint(1, n_users))
            return 1

        try:
            return await closed_loop([pooled] * concurrency, warmup, duration)
        finally:
            await pool.close()

    if mode == "asyncpg_direct":
        connections = [await asyncpg.connect(dsn) for _ in range(concurrency)]

        def direct(con: asyncpg.Connection) -> Callable[[], Awaitable[int]]:
            async def one() -> int:
                await con.fetchrow(PK_SQL, randint(1, n_users))
                return 1

            return one

        try:
            return await closed_loop([direct(c) for c in connections], warmup, duration)
        finally:
            for con in connections:
                await con.close()

    if mode in ("sa_core", "sa_orm"):
        from sqlalchemy import bindparam, select
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        from service.db.models import User

        engine = create_async_engine(config["url"], pool_size=concurrency, max_overflow=0)
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        columns = (
            User.id,
            User.username,
            User.email,
            User.display_name,
            User.bio,
            User.create_time,
            User.update_time,
            User.delete_time,
            User.version,
        )
        stmt = select(*columns).where(User.id == bindparam("id"))
        sessions = async_sessionmaker(autocommit, expire_on_commit=False)

        async def core() -> int:
            async with autocommit.connect() as con:
                (await con.execute(stmt, {"id": randint(1, n_users)})).first()
            return 1

        async def orm() -> int:
            async with sessions() as session:
                await session.get(User, randint(1, n_users))
            return 1

        try:
            fn = core if mode == "sa_core" else orm
            return await closed_loop([fn] * concurrency, warmup, duration)
        finally:
            await engine.dispose()

    if mode == "cursor_raw":
        con = await asyncpg.connect(dsn)
        try:
            started = time.monotonic()
            emit(event="measure_start")
            rows = 0
            async with con.transaction(isolation="repeatable_read", readonly=True):
                cursor = await con.cursor(POSTS_SQL)
                while True:
                    batch = await cursor.fetch(1000)
                    if not batch:
                        break
                    rows += len(batch)
            seconds = time.monotonic() - started
            emit(event="measure_end")
            return {
                "ok": 1,
                "rows": rows,
                "seconds": seconds,
                "percentiles_ms": {},
                "errors": {},
            }
        finally:
            await con.close()

    if mode == "copy_users":
        batch = int(config.get("batch", 1000))
        prefix = config.get("prefix", "c")
        connections = [await asyncpg.connect(dsn) for _ in range(concurrency)]
        counter = [0]

        def copier(con: asyncpg.Connection) -> Callable[[], Awaitable[int]]:
            async def one() -> int:
                counter[0] += 1
                stem = f"{prefix}_{counter[0]}_"
                now = datetime.now(UTC)
                records = [
                    (
                        f"{stem}{i}",
                        f"{stem}{i}@bench.example.com",
                        f"{stem}{i}@bench.example.com",
                        f"Copy {stem}{i}",
                        "",
                        now,
                        now,
                        1,
                    )
                    for i in range(batch)
                ]
                await con.copy_records_to_table("users", records=records, columns=COPY_COLUMNS)
                return batch

            return one

        try:
            return await closed_loop([copier(c) for c in connections], warmup, duration)
        finally:
            for con in connections:
                await con.close()

    raise SystemExit(f"unknown mode {mode}")


def main() -> None:
    config = json.loads(sys.argv[1])
    result = uvloop.run(run(config))
    emit(event="result", **result)


if __name__ == "__main__":
    main()
