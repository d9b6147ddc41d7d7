"""The bench database: create `blogbench_<random>`, migrate it, COPY-seed it, drop it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy.engine import make_url

from bench.procs import ROOT

SPAN = timedelta(days=3 * 365)
EPOCH = datetime(2023, 1, 1, tzinfo=UTC)
USER_COLUMNS = (
    "id",
    "username",
    "email",
    "email_normalized",
    "display_name",
    "bio",
    "create_time",
    "update_time",
    "delete_time",
    "version",
)
POST_COLUMNS = ("id", "author_id", "title", "body", "create_time", "update_time", "version")
_WORDS = [
    "grpc",
    "postgres",
    "python",
    "async",
    "stream",
    "batch",
    "keyset",
    "index",
    "cursor",
    "latency",
    "throughput",
    "pool",
    "session",
    "commit",
    "rollback",
    "snapshot",
    "replica",
    "tag",
    "author",
    "title",
    "body",
    "release",
    "protocol",
    "buffer",
    "channel",
    "deadline",
    "health",
    "probe",
    "worker",
    "process",
    "kernel",
    "socket",
    "memory",
    "budget",
    "profile",
    "sample",
    "flame",
    "query",
    "planner",
    "vacuum",
    "analyze",
    "tuple",
    "page",
]


@dataclass(frozen=True)
class BenchDatabase:
    name: str
    admin_url: str  # SQLAlchemy URL of the maintenance database
    url: str  # SQLAlchemy URL (postgresql+asyncpg) of the bench database

    @property
    def dsn(self) -> str:
        return asyncpg_dsn(self.url)


@dataclass
class SeedInfo:
    users: int
    posts: int
    tags: int
    post_tags: int
    seconds: float
    sizes_mb: dict[str, float]


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str) -> BenchDatabase:
    name = f"blogbench_{secrets.token_hex(4)}"

    async def run() -> None:
        con = await asyncpg.connect(asyncpg_dsn(admin_url), timeout=10)
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()

    asyncio.run(run())
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return BenchDatabase(name=name, admin_url=admin_url, url=url)


def drop_database(db: BenchDatabase) -> None:
    async def run() -> None:
        con = await asyncpg.connect(asyncpg_dsn(db.admin_url), timeout=10)
        try:
            await con.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        finally:
            await con.close()

    asyncio.run(run())


def migrate(db: BenchDatabase) -> None:
    """`python -m service migrate` against the bench database (the service's own path)."""
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        env={**_env(), "DATABASE_URL": db.url, "LOG_LEVEL": "WARNING"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed ({result.returncode}):\n{result.stderr[-3000:]}")


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


# -- data ---------------------------------------------------------------------------------


def _text(rng: random.Random, low: int, high: int) -> str:
    target = rng.randint(low, high)
    words: list[str] = []
    length = 0
    while length < target:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:high]


def tag_names(count: int) -> list[str]:
    return [f"{_WORDS[i % len(_WORDS)]}-{i}" for i in range(count)]


def users(count: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    bios = [_text(rng, 0, 160) for _ in range(256)]
    step = SPAN / max(count, 1)
    for i in range(1, count + 1):
        created = EPOCH + step * i
        yield (
            i,
            f"user{i}",
            f"user{i}@example.com",
            f"user{i}@example.com",
            f"User {i}",
            bios[i & 255],
            created,
            created,
            None,
            1,
        )


def posts(count: int, user_count: int, rng: random.Random) -> Iterator[tuple[object, ...]]:
    """Posts spread over authors (skewed: low ids write more) and over three years."""
    titles = [_text(rng, 20, 90).capitalize() for _ in range(2048)]
    bodies = [_text(rng, 150, 650) for _ in range(1024)]
    step = SPAN.total_seconds() / max(count, 1)
    jitter = min(86400.0, step * 50)
    rand = rng.random
    for i in range(1, count + 1):
        created = EPOCH + timedelta(seconds=i * step + (rand() - 0.5) * jitter)
        author = int(user_count * rand() ** 1.5) + 1
        yield (i, author, titles[i & 2047], bodies[(i * 7) & 1023], created, created, 1)


def _tag_combos(tag_count: int, rng: random.Random) -> list[tuple[int, ...]]:
    combos = []
    for _ in range(4096):
        k = rng.choice((0, 1, 1, 2, 2, 2, 3, 3, 4))
        combos.append(tuple(sorted(rng.sample(range(1, tag_count + 1), k))))
    return combos


def post_tags(count: int, tag_count: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    combos = _tag_combos(tag_count, rng)
    for i in range(1, count + 1):
        for tag_id in combos[(i * 2654435761) & 4095]:
            yield (i, tag_id)


# -- seeding ------------------------------------------------------------------------------


async def _seed(dsn: str, n_users: int, n_posts: int, n_tags: int) -> tuple[int, dict[str, float]]:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        # Superuser only: skip the FK triggers during the load (the data is valid by
        # construction); otherwise seed with them, more slowly.
        with contextlib.suppress(asyncpg.PostgresError):
            await con.execute("SET session_replication_role = replica")
        tables = ["users", "posts", "tags", "post_tags"]
        indexes = await con.fetch(
            """
            SELECT indexname, indexdef FROM pg_indexes i
            WHERE schemaname = current_schema() AND tablename = ANY($1::text[])
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)
            """,
            tables,
        )
        for row in indexes:  # rebuilt after the load: faster, and compact
            await con.execute(f'DROP INDEX "{row["indexname"]}"')
        rng = random.Random(20240601)
        await con.copy_records_to_table(
            "users", records=users(n_users, rng), columns=list(USER_COLUMNS)
        )
        await con.copy_records_to_table(
            "tags",
            records=[(i + 1, n) for i, n in enumerate(tag_names(n_tags))],
            columns=["id", "name"],
        )
        await con.copy_records_to_table(
            "posts", records=posts(n_posts, n_users, rng), columns=list(POST_COLUMNS)
        )
        await con.copy_records_to_table(
            "post_tags", records=post_tags(n_posts, n_tags, rng), columns=["post_id", "tag_id"]
        )
        n_links = await con.fetchval("SELECT count(*) FROM post_tags")
        for table in ("users", "posts", "tags"):
            await con.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" (SELECT max(id) FROM {table}))"
            )
    finally:
        await con.close()

    async def build(statements: list[str]) -> None:
        c = await asyncpg.connect(dsn, timeout=10)
        try:
            await c.execute("SET maintenance_work_mem = '256MB'")
            for statement in statements:
                await c.execute(statement)
        finally:
            await c.close()

    defs = [row["indexdef"] for row in indexes]
    await asyncio.gather(build(defs[0::2]), build(defs[1::2]))
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        await con.execute("VACUUM (ANALYZE)")
        sizes = {
            row["name"]: row["bytes"] / 1e6
            for row in await con.fetch(
                "SELECT relname AS name, pg_total_relation_size(oid) AS bytes FROM pg_class"
                " WHERE relname = ANY($1::text[])",
                tables,
            )
        }
    finally:
        await con.close()
    return int(n_links), sizes


def seed(db: BenchDatabase, *, n_users: int, n_posts: int, n_tags: int) -> SeedInfo:
    started = time.monotonic()
    links, sizes = asyncio.run(_seed(db.dsn, n_users, n_posts, n_tags))
    return SeedInfo(
        users=n_users,
        posts=n_posts,
        tags=n_tags,
        post_tags=links,
        seconds=time.monotonic() - started,
        sizes_mb=sizes,
    )
