"""Start-up mistakes as a person makes them: each is one line that names the setting and
what to do, with no traceback, no password, and a non-zero exit (API.md, "Start-up
errors"); `migrate` on a newer schema changes nothing and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import cli.test_cli as harness
import grpc
import pytest
from alembic.script import ScriptDirectory
from cli.test_cli import (
    GRACE,
    ROOT,
    START_TIMEOUT,
    Launcher,
    Proc,
    _clean_environment,
    channel_to,
    stop_with,
    wait_serving,
)
from sqlalchemy.engine import make_url

from blog.v1 import user_pb2, user_pb2_grpc
from service.auth import CALLER_MAX_LENGTH
from service.db.migrations import alembic_config
from service.db.models import IdempotencyRecord
from support.postgres import PostgresServer, free_port, raw_dsn

PASSWORD = "hunter2-secret"

# The CLI harness's fixtures, for this module too.
launcher = harness.launcher
sqlite_url = harness.sqlite_url


def _error_lines(proc: Proc) -> list[str]:
    return [line for line in proc.output().splitlines() if line.strip()]


async def _fails_clearly(proc: Proc, setting: str, *needles: str, code: int | None = None) -> str:
    """The process exits non-zero with one line naming `setting` (and each needle)."""
    rc = await proc.wait(START_TIMEOUT)
    output = proc.output()
    assert rc != 0, proc.describe()
    if code is not None:
        assert rc == code, proc.describe()
    assert "Traceback" not in output, proc.describe()
    assert PASSWORD not in output, proc.describe()
    naming = [line for line in _error_lines(proc) if setting in line]
    assert len(naming) == 1, proc.describe()
    for needle in needles:
        assert needle in naming[0], proc.describe()
    return naming[0]


def _postgres_url(host: str, port: int, database: str = "blog") -> str:
    return f"postgresql+asyncpg://postgres:{PASSWORD}@{host}:{port}/{database}"


# ------------------------------------------------------------------------- DATABASE_URL


@pytest.mark.parametrize("command", ["serve", "migrate"])
async def test_a_database_host_that_does_not_resolve(launcher: Launcher, command: str) -> None:
    url = _postgres_url("no-such-host.invalid", 5432)
    proc = launcher.run(command, port=free_port(), DATABASE_URL=url)
    line = await _fails_clearly(proc, "DATABASE_URL", "does not resolve", "no-such-host.invalid")
    assert "***" in line  # the URL is shown, its password masked


@pytest.mark.parametrize("command", ["serve", "migrate"])
async def test_a_database_that_does_not_exist(
    launcher: Launcher, postgres: PostgresServer, command: str
) -> None:
    url = _postgres_url(postgres.host, postgres.port, "no_such_database_here")
    proc = launcher.run(command, port=free_port(), DATABASE_URL=url)
    await _fails_clearly(proc, "DATABASE_URL", "does not exist", "createdb")


@pytest.mark.parametrize("command", ["serve", "migrate"])
async def test_a_closed_database_port(launcher: Launcher, command: str) -> None:
    url = _postgres_url("127.0.0.1", free_port())
    proc = launcher.run(command, port=free_port(), DATABASE_URL=url)
    await _fails_clearly(proc, "DATABASE_URL", "nothing accepts connections")


@pytest.mark.parametrize("command", ["serve", "migrate"])
async def test_a_wrong_url_scheme_is_refused_with_the_password_masked(
    launcher: Launcher, command: str
) -> None:
    url = f"postgres://bob:{PASSWORD}@db.example.com/blog"
    proc = launcher.run(command, port=free_port(), DATABASE_URL=url)
    await _fails_clearly(proc, "DATABASE_URL", "postgresql+asyncpg://", "bob:***@", code=2)


async def test_a_missing_sqlite_directory(launcher: Launcher, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'blog.db'}"
    proc = launcher.run("migrate", DATABASE_URL=url)
    await _fails_clearly(proc, "DATABASE_URL", "does not exist")


# --------------------------------------------------------------------------- --listen


async def test_listen_nonsense_is_an_invalid_address_not_a_port_in_use(launcher: Launcher) -> None:
    proc = launcher.run("serve", "--migrate", "--listen", "nonsense")
    line = await _fails_clearly(proc, "GRPC_LISTEN", "nonsense", "HOST:PORT", code=2)
    assert "in use" not in line


async def test_listen_on_a_host_that_does_not_resolve(launcher: Launcher) -> None:
    proc = launcher.run("serve", "--migrate", "--listen", "no-such-host.invalid:50051")
    line = await _fails_clearly(proc, "GRPC_LISTEN", "does not resolve")
    assert "in use" not in line


async def test_listen_on_a_port_in_use_says_so(launcher: Launcher) -> None:
    port = free_port()
    with contextlib.closing(__import__("socket").socket()) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = launcher.run("serve", "--migrate", port=port)
        await _fails_clearly(proc, "GRPC_LISTEN", "in use", f"127.0.0.1:{port}")


# ------------------------------------------------------------------------ other settings


async def test_an_invalid_log_level_is_refused_at_start_up(launcher: Launcher) -> None:
    proc = launcher.run("serve", "--migrate", port=free_port(), LOG_LEVEL="LOUD")
    await _fails_clearly(proc, "LOG_LEVEL", "LOUD", "DEBUG, INFO", code=2)


async def test_a_short_page_token_secret_is_refused_and_not_shown(launcher: Launcher) -> None:
    secret = "short-" + PASSWORD  # 20 bytes
    proc = launcher.run("serve", port=free_port(), PAGE_TOKEN_SECRET=f"{'k' * 40},{secret}")
    line = await _fails_clearly(proc, "PAGE_TOKEN_SECRET", "secret 2", "at least 32", code=2)
    assert secret not in line


async def test_several_bad_settings_are_named_together(launcher: Launcher) -> None:
    proc = launcher.run("serve", port=free_port(), LOG_LEVEL="LOUD", SHUTDOWN_GRACE="soon")
    line = await _fails_clearly(proc, "LOG_LEVEL", "SHUTDOWN_GRACE", code=2)
    assert line.count("invalid configuration") == 1


def test_the_caller_limit_is_the_idempotency_column_width() -> None:
    assert IdempotencyRecord.__table__.c.caller.type.length == CALLER_MAX_LENGTH


async def test_a_caller_name_too_long_for_idempotency_is_refused(
    launcher: Launcher, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# callers\nok-token fine\nlong-token {'x' * (CALLER_MAX_LENGTH + 1)}\n")
    proc = launcher.run("serve", "--migrate", port=free_port(), AUTH_TOKENS_FILE=str(tokens))
    await _fails_clearly(proc, "AUTH_TOKENS_FILE", str(tokens), "line 3", "at most 200")


async def test_a_missing_tokens_file(launcher: Launcher, tmp_path: Path) -> None:
    missing = tmp_path / "no-tokens"
    proc = launcher.run("serve", "--migrate", port=free_port(), AUTH_TOKENS_FILE=str(missing))
    await _fails_clearly(proc, "AUTH_TOKENS_FILE", str(missing))


async def test_a_missing_tls_certificate(launcher: Launcher, tmp_path: Path) -> None:
    proc = launcher.run(
        "serve",
        "--migrate",
        port=free_port(),
        TLS_CERT_FILE=str(tmp_path / "server.crt"),
        TLS_KEY_FILE=str(tmp_path / "server.key"),
    )
    await _fails_clearly(proc, "TLS_CERT_FILE", "server.crt")


# --------------------------------------------------------------- messages and the CLI


async def test_schema_behind_in_plain_words(launcher: Launcher) -> None:
    proc = launcher.run("serve", port=free_port())
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    line = await _fails_clearly(proc, "schema is behind", f"revision {head}", code=2)
    message = line.partition("service: ")[2]
    assert "[" not in message, line
    assert "'" not in message, line


def _console_script() -> Path:
    return Path(sys.executable).parent / "blog-service"


def test_help_shows_defaults_and_the_command_run() -> None:
    module = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert module.startswith("usage: python -m service serve")
    for default in ("[::]:50051", "sqlite+aiosqlite:///./blog.db", "(default: 1)"):
        assert default in module
    script = subprocess.run(
        [str(_console_script()), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert script.startswith("usage: blog-service serve")


def test_hints_name_the_console_script_when_run_as_one(sqlite_url: str, tmp_path: Path) -> None:
    env = {**_clean_environment(), "DATABASE_URL": sqlite_url, "GRPC_LISTEN": "127.0.0.1:0"}
    done = subprocess.run(
        [str(_console_script()), "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "run `blog-service migrate` first" in done.stderr
    assert "python -m service" not in done.stderr


# ------------------------------------------------------------------ a newer schema


def _stamp_ahead(database: Path, revision: str = "ffffffffffff") -> None:
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def _version(database: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]


async def test_migrate_on_a_newer_schema_changes_nothing_and_exits_zero(
    launcher: Launcher, tmp_path: Path
) -> None:
    first = launcher.run("migrate")
    assert await first.wait(START_TIMEOUT) == 0, first.describe()
    _stamp_ahead(tmp_path / "blog.db")
    proc = launcher.run("migrate")
    assert await proc.wait(START_TIMEOUT) == 0, proc.describe()
    output = proc.output()
    assert "Traceback" not in output
    saying = [line for line in output.splitlines() if "newer than this release" in line]
    assert len(saying) == 1, output
    assert "changing nothing" in saying[0]
    assert _version(tmp_path / "blog.db") == ["ffffffffffff"]


async def test_serve_migrate_on_a_newer_schema_serves_with_a_warning(
    launcher: Launcher, tmp_path: Path
) -> None:
    first = launcher.run("migrate")
    assert await first.wait(START_TIMEOUT) == 0, first.describe()
    _stamp_ahead(tmp_path / "blog.db")
    proc = launcher.run("serve", "--migrate", port=free_port())
    await wait_serving(proc)
    assert "ahead of this release" in proc.output()
    await stop_with(proc, signal.SIGTERM)
    assert _version(tmp_path / "blog.db") == ["ffffffffffff"]


async def test_migrate_on_a_newer_postgres_schema_exits_zero(
    launcher: Launcher, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    try:
        first = launcher.run("migrate", DATABASE_URL=url)
        assert await first.wait(START_TIMEOUT) == 0, first.describe()
        connection = await asyncpg.connect(raw_dsn(url))
        try:
            await connection.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
        finally:
            await connection.close()
        proc = launcher.run("migrate", DATABASE_URL=url)
        assert await proc.wait(START_TIMEOUT) == 0, proc.describe()
        assert "newer than this release" in proc.output()
        assert "Traceback" not in proc.output()
    finally:
        postgres.drop_database(url)


# ------------------------------------------------------- migrate and statement_timeout

MIGRATION_LOCK_ID = 0x626C6F67  # alembic/env.py


async def test_a_waiting_migrate_outlasts_the_statement_timeout(
    launcher: Launcher, postgres: PostgresServer
) -> None:
    """A second `migrate` waits on the advisory lock as long as the first holds it, not
    DB_STATEMENT_TIMEOUT (1 s here: the lock is held for 3)."""
    url = postgres.create_database()
    try:
        holder = await asyncpg.connect(raw_dsn(url))
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            proc = launcher.run("migrate", DATABASE_URL=url, DB_STATEMENT_TIMEOUT="1")
            await asyncio.sleep(3.0)
            assert proc.popen.poll() is None, proc.describe()
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        finally:
            await holder.close()
        assert await proc.wait(START_TIMEOUT) == 0, proc.describe()
        assert "statement timeout" not in proc.output()
    finally:
        postgres.drop_database(url)


# ------------------------------------------------------------------- reload, workers


async def test_sighup_reloads_the_tokens_file(launcher: Launcher, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token old\n")
    port = free_port()
    # A long poll interval: only SIGHUP can make the change seen within this test.
    proc = launcher.run(
        "serve", "--migrate", port=port, AUTH_TOKENS_FILE=str(tokens), FILE_RELOAD_INTERVAL="600"
    )
    await wait_serving(proc)
    request = user_pb2.ListUsersRequest(page_size=1)
    async with channel_to(port) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        await stub.ListUsers(request, metadata=(("authorization", "Bearer old-token"),))
        tokens.write_text("new-token new\n")
        proc.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                await stub.ListUsers(request, metadata=(("authorization", "Bearer new-token"),))
                break
            except grpc.aio.AioRpcError as error:
                code = error.code()
            assert code is grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListUsers(request, metadata=(("authorization", "Bearer old-token"),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    await stop_with(proc, signal.SIGTERM)


async def test_sigterm_while_workers_start_is_a_clean_stop(launcher: Launcher) -> None:
    """SIGTERM just after the workers were spawned, while they still import: the parent
    forwards it before they have a handler, they die of it, and that is a clean stop."""
    for _ in range(2):
        proc = launcher.run("serve", "--migrate", "--workers", "2", port=free_port())
        deadline = time.monotonic() + START_TIMEOUT
        while "started 2 workers" not in proc.output():
            assert proc.popen.poll() is None, proc.describe()
            assert time.monotonic() < deadline, proc.describe()
            await asyncio.sleep(0.01)
        proc.popen.send_signal(signal.SIGTERM)
        assert await proc.wait(GRACE + START_TIMEOUT) == 0, proc.describe()


def test_database_url_in_messages_is_masked_even_when_unparseable() -> None:
    from service.config import mask_url

    assert PASSWORD not in mask_url(f"postgresql+asyncpg://bob:{PASSWORD}@host:port/x")
    assert make_url(mask_url(f"postgresql+asyncpg://bob:{PASSWORD}@h/x")).password == "***"
