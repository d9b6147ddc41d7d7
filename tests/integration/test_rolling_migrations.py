"""Rolling migrations: test-only Alembic revisions applied while a server serves a steady
load. An expand step (a nullable column and an index built CONCURRENTLY, two `migrate`
runs at once) and a type change of a selected column (widening `display_name`, which
invalidates asyncpg's cached statements): no call fails."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest
from alembic.script import ScriptDirectory

from blog.v1 import user_pb2
from conftest import Running, _migrate, running_server, settings_for
from factories import create_user_request
from service.db.migrations import alembic_config
from support.postgres import PostgresServer, raw_dsn

pytestmark = pytest.mark.usefixtures("integration_binaries")

ROOT = Path(__file__).resolve().parents[2]

EXPAND = '''
"""Test only: expand. A nullable column (no rewrite, no default) and its index, built
CONCURRENTLY outside the migration transaction so writers are never blocked."""
from alembic import op
import sqlalchemy as sa

revision = "t_expand"
down_revision = "{head}"


def upgrade() -> None:
    op.add_column("users", sa.Column("nickname", sa.Text(), nullable=True))
    with op.get_context().autocommit_block():
        # Outside the migration transaction its SET LOCALs are gone: no statement
        # timeout for the build, reset afterwards (the connection may be pooled).
        op.execute("SET statement_timeout = 0")
        # A failed CONCURRENTLY build leaves an INVALID index: drop it first, so a
        # re-run of this revision repairs it.
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_users_nickname")
        op.create_index(
            "ix_users_nickname", "users", ["nickname"], postgresql_concurrently=True
        )
        op.execute("RESET statement_timeout")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_users_nickname", "users", postgresql_concurrently=True)
    op.drop_column("users", "nickname")
'''

WIDEN = '''
"""Test only: widen a column every user read selects (no table rewrite for varchar
widening, but every cached statement that returns the column is now invalid)."""
from alembic import op
import sqlalchemy as sa

revision = "t_widen"
down_revision = "t_expand"


def upgrade() -> None:
    op.alter_column(
        "users", "display_name", type_=sa.String(200), existing_type=sa.String(100)
    )


def downgrade() -> None:
    op.alter_column(
        "users", "display_name", type_=sa.String(100), existing_type=sa.String(200)
    )
'''


_UPGRADE = """
import sys
from alembic import command
from service.db.migrations import alembic_config, script_location
url, extra, target = sys.argv[1:]
config = alembic_config(url)
config.set_main_option("version_locations", f"{script_location() / 'versions'} {extra}")
command.upgrade(config, target)
"""


async def upgrade(url: str, extra: Path, target: str) -> None:
    """`alembic upgrade target` in its own process, as a migration Job runs it (Alembic's
    context is process-global: two runs in one process would share it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _UPGRADE,
        url,
        str(extra),
        target,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]


def _head() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    (head,) = script.get_heads()
    return head


class Load:
    """A steady mix of reads, creates, updates and short streams, counting outcomes."""

    def __init__(self, live: Running, seeds: list[int]) -> None:
        self.live = live
        self.ids = list(seeds)
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        users = self.live.users
        deadline = time.monotonic() + 120  # bounded even if nobody stops it
        while not self.stop.is_set() and time.monotonic() < deadline:
            kind = rng.choice(("get", "get", "list", "create", "update", "stream"))
            try:
                if kind == "get":
                    await users.GetUser(
                        user_pb2.GetUserRequest(id=rng.choice(self.ids)), timeout=10
                    )
                elif kind == "list":
                    await users.ListUsers(user_pb2.ListUsersRequest(page_size=20), timeout=10)
                elif kind == "create":
                    made = await users.CreateUser(create_user_request(), timeout=10)
                    self.ids.append(made.id)
                elif kind == "update":
                    await users.UpdateUser(
                        user_pb2.UpdateUserRequest(
                            user=user_pb2.User(
                                id=rng.choice(self.ids), display_name=f"n{rng.random()}"
                            ),
                            update_mask={"paths": ["display_name"]},
                        ),
                        timeout=10,
                    )
                else:
                    async for _ in users.StreamUsers(
                        user_pb2.StreamUsersRequest(filter=f"id <= {self.ids[20]}"), timeout=10
                    ):
                        pass
                self.outcomes[kind] += 1
            except grpc.aio.AioRpcError as error:
                self.failures.append(f"{kind}: {error.code().name} {error.details()}")
            await asyncio.sleep(0.005)


async def test_expand_and_widen_under_load(
    postgres: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    (tmp_path / "t_expand.py").write_text(textwrap.dedent(EXPAND).format(head=_head()))
    (tmp_path / "t_widen.py").write_text(textwrap.dedent(WIDEN))
    url = postgres.create_database()
    try:
        await _migrate(url)
        # A small pool: the same connections (and their cached statements) serve the load.
        async with running_server(
            settings_for(url, db_pool_size=4, db_max_overflow=0, stream_max_concurrent=4)
        ) as live:
            seeds = [(await live.users.CreateUser(create_user_request())).id for _ in range(25)]
            load = Load(live, seeds)
            workers = [asyncio.create_task(load.worker(i)) for i in range(4)]
            try:
                await asyncio.sleep(1.5)  # every statement prepared and cached
                # Two `migrate` runs at once: the lock lets one build, the other finds
                # the work done (a second CONCURRENTLY build would fail on the name).
                await asyncio.gather(
                    upgrade(url, tmp_path, "t_expand"), upgrade(url, tmp_path, "t_expand")
                )
                await asyncio.sleep(1.0)
                before = sum(load.outcomes.values())
                await upgrade(url, tmp_path, "t_widen")
                await asyncio.sleep(2.0)  # the load runs on over the changed column
            finally:
                load.stop.set()
                await asyncio.gather(*workers)
        assert load.failures == []
        assert sum(load.outcomes.values()) > before + 20, load.outcomes
        assert set(load.outcomes) == {"get", "list", "create", "update", "stream"}
        connection = await asyncpg.connect(raw_dsn(url))
        try:
            valid = await connection.fetchval(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_users_nickname'::regclass"
            )
            width = await connection.fetchval(
                "SELECT character_maximum_length FROM information_schema.columns "
                "WHERE table_name = 'users' AND column_name = 'display_name'"
            )
        finally:
            await connection.close()
        assert valid is True
        assert width == 200
        # The stale statements were met and retried, not surfaced.
        retried = [r for r in caplog.records if "stale cached statement" in r.getMessage()]
        assert retried, "no call met a stale cached statement: the test proved nothing"
    finally:
        postgres.drop_database(url)
