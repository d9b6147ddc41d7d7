"""A real PostgreSQL for the test session: an existing server, or a throwaway cluster."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url

__all__ = [
    "DEFAULT_URL",
    "Cluster",
    "PostgresServer",
    "ensure_postgres",
    "free_port",
    "raw_dsn",
    "require_bindir",
    "start_cluster",
    "start_standby",
    "with_database",
    "with_host_port",
]

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
ENV_VAR = "TEST_DATABASE_URL"
CONNECT_TIMEOUT = 3.0
STARTUP_TIMEOUT = 60.0
_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) are needed to run the tests on "
    "PostgreSQL, and no server answers at {url}. Install them (Debian/Ubuntu: "
    "`apt-get install postgresql`; Fedora: `dnf install postgresql-server`; macOS: "
    "`brew install postgresql`), or point TEST_DATABASE_URL at a running server."
)

T = TypeVar("T")


# --------------------------------------------------------------------------- URL helpers


def _parse(url: str) -> URL:
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string()}")
    return parsed


def raw_dsn(url: str) -> str:
    """Turn a ``postgresql+asyncpg://`` SQLAlchemy URL into a plain DSN for asyncpg.connect."""
    return _parse(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str, database: str) -> str:
    """Return ``url`` with only its database name replaced."""
    return _parse(url).set(database=database).render_as_string(hide_password=False)


def with_host_port(url: str, host: str, port: int) -> str:
    """Return ``url`` pointing at ``host:port`` (e.g. a TcpProxy), everything else kept."""
    return _parse(url).set(host=host, port=port).render_as_string(hide_password=False)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (callers must tolerate races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# ----------------------------------------------------------------------- async plumbing


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, even if an event loop is running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (e.g. an async test): use a private loop in a thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-support") as pool:
        return pool.submit(asyncio.run, coro).result()


async def _connect(url: str, seconds: float = CONNECT_TIMEOUT) -> Any:
    return await asyncpg.connect(raw_dsn(url), timeout=seconds)


async def _probe(url: str, seconds: float) -> None:
    conn = await _connect(url, seconds)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close(timeout=seconds)


def _probe_sync(url: str, timeout: float = CONNECT_TIMEOUT) -> BaseException | None:
    """None if a server answers ``SELECT 1`` at ``url``, else the exception it failed with."""
    try:
        _run(asyncio.wait_for(_probe(url, timeout), timeout + 1.0))
    except Exception as exc:
        return exc
    return None


# ------------------------------------------------------------------------------ server


class PostgresServer:
    """A reachable PostgreSQL server, possibly a throwaway cluster owned by this process."""

    def __init__(self, admin_url: str, cluster: _Cluster | None = None) -> None:
        self.admin_url: str = admin_url
        self._cluster = cluster
        self._closed = False
        if cluster is not None:
            atexit.register(self.close)

    def __repr__(self) -> str:
        kind = "throwaway" if self.is_throwaway else "external"
        shown = make_url(self.admin_url).render_as_string(hide_password=True)
        return f"PostgresServer({shown!r}, {kind})"

    @property
    def is_throwaway(self) -> bool:
        """True when this process started the cluster (and will remove it on close)."""
        return self._cluster is not None

    @property
    def data_dir(self) -> Path | None:
        """The throwaway cluster's directory (None for an external server)."""
        return None if self._cluster is None else self._cluster.root

    @property
    def host(self) -> str:
        return make_url(self.admin_url).host or "127.0.0.1"

    @property
    def port(self) -> int:
        return make_url(self.admin_url).port or 5432

    def create_database(self, prefix: str = "blogtest") -> str:
        """Create a fresh, uniquely named database; return its SQLAlchemy asyncpg URL."""
        name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
        _run(self._execute_admin(f"CREATE DATABASE {_quote_ident(name)}"))
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        """Drop the database named by ``url``, terminating its connections first."""
        name = _parse(url).database
        if not name:
            raise ValueError("URL names no database")
        if name == _parse(self.admin_url).database:
            raise ValueError(f"refusing to drop the maintenance database {name!r}")
        _run(self._drop(name))

    def close(self) -> None:
        """Stop and remove the throwaway cluster, if any; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
            self._cluster.destroy()

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _execute_admin(self, sql: str, *args: object) -> None:
        conn = await _connect(self.admin_url)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def _drop(self, name: str) -> None:
        conn = await _connect(self.admin_url)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            force = " WITH (FORCE)" if conn.get_server_version().major >= 13 else ""
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)}{force}")
        finally:
            await conn.close()


# ------------------------------------------------------------------- throwaway cluster


def _has_server_binaries(bindir: Path) -> bool:
    return all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))


def find_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl/postgres, or None when PostgreSQL is not installed."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))

    def version_key(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/([\d.]+)/bin$", path)
        return tuple(int(p) for p in match.group(1).split(".") if p) if match else (0,)

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    candidates.extend(Path(p) for p in debian)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    candidates.extend(Path(p) for p in ("/usr/pgsql/bin", "/usr/local/pgsql/bin"))
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    return None


class _Cluster:
    """An initdb'ed, running cluster in a temporary directory.

    `settings` are extra `-c name=value` server settings (e.g. for a replication primary).
    """

    def __init__(self, bindir: Path, user: str, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.user = user
        self.settings = dict(settings or {})
        self.as_postgres_user = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="blogtest-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._destroyed = False

    def _cmd(self, exe: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / exe), *args]
        if self.as_postgres_user:
            # initdb and postgres refuse to run as root.
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _run(self, exe: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(exe, *args),
            cwd=self.root,  # the postgres user may not be able to enter the caller's cwd
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _fail(self, what: str, proc: subprocess.CompletedProcess[str] | None) -> RuntimeError:
        detail = ""
        if proc is not None:
            detail += f"\n--- command: {shlex.join(map(str, proc.args))}"
            detail += f"\n--- stdout:\n{proc.stdout}\n--- stderr:\n{proc.stderr}"
        with contextlib.suppress(OSError):
            detail += f"\n--- server log:\n{self.log.read_text(errors='replace')[-4000:]}"
        return RuntimeError(f"throwaway PostgreSQL cluster: {what}{detail}")

    def start(self) -> str:
        """initdb + start; return the admin URL. Cleans up after itself on failure."""
        try:
            return self._start()
        except BaseException:
            self.destroy()
            raise

    def _start(self) -> str:
        self._check_runuser()
        proc = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            timeout=120,
        )
        if proc.returncode != 0:
            raise self._fail("initdb failed", proc)
        return self._launch()

    def _check_runuser(self) -> None:
        if self.as_postgres_user:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, but there is no 'postgres' OS user to run initdb/postgres "
                    "as (initdb refuses root). Create one (useradd -r postgres) or run as non-root."
                ) from None
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root, but `runuser` (util-linux) is missing")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/postgres"

    def _launch(self) -> str:
        """Start the server in self.data on a free port (kept on a restart); wait for it."""
        last: subprocess.CompletedProcess[str] | None = None
        keep_port = self.port != 0
        for _attempt in range(5):  # the free port may be taken before the server binds it
            if not keep_port:
                self.port = free_port()
            options = [
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "max_connections=300",
            ]
            for name, value in self.settings.items():
                options += ["-c", f"{name}={value}"]
            last = self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(int(STARTUP_TIMEOUT)),
                "-o",
                shlex.join(options),
                "start",
                timeout=STARTUP_TIMEOUT + 10,
            )
            if last.returncode == 0:
                break
            with contextlib.suppress(OSError):
                if "already in use" in self.log.read_text(errors="replace"):
                    self.log.write_text("")
                    continue
            raise self._fail("pg_ctl start failed", last)
        else:
            raise self._fail("could not find a free port", last)

        url = self.url
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            error = _probe_sync(url, timeout=2.0)
            if error is None:
                return url
            if time.monotonic() > deadline:
                raise self._fail(f"server never accepted connections at {url}: {error!r}", None)
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (fast shutdown), keeping its data for `restart`."""
        proc = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        if proc.returncode != 0:
            raise self._fail("pg_ctl stop failed", proc)

    def restart(self) -> str:
        """Start a stopped server again on the same port."""
        return self._launch()

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._run(
                    "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30
                )
            if _alive(pid):  # pg_ctl could not stop it: do it by hand
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


# --------------------------------------------------------------------------- entry point


def _to_stderr(line: str) -> None:
    print(line, file=sys.__stderr__, flush=True)


def ensure_postgres(
    url: str | None = None, announce: Callable[[str], None] = _to_stderr
) -> PostgresServer:
    """Use the server at ``url`` / $TEST_DATABASE_URL, else start a throwaway cluster.

    Call once per test session (from sync code) and ``close()`` the result at the end.
    A throwaway cluster is announced in one line through ``announce`` (the test
    session's terminal), so whoever expected their own server knows what happened.
    Raises RuntimeError, never skips, when no server answers and none can be started.
    """
    explicit = url is not None or bool(os.environ.get(ENV_VAR))
    target = url if url is not None else (os.environ.get(ENV_VAR) or DEFAULT_URL)
    parsed = _parse(target)
    error = _probe_sync(target)
    if error is None:
        return PostgresServer(target)
    if not isinstance(error, OSError | TimeoutError):
        # Something answered but refused us (bad password, missing database, ...).
        message = (
            f"PostgreSQL at {parsed.render_as_string(hide_password=True)} answered but the "
            f"connection failed: {error!r}"
        )
        if explicit:
            raise RuntimeError(message + f"; fix {ENV_VAR} or unset it.") from error
        warnings.warn(message + "; starting a throwaway cluster instead.", stacklevel=2)

    bindir = find_bindir()
    if bindir is None:
        hint = _INSTALL_HINT.format(url=parsed.render_as_string(hide_password=True))
        banner = "!" * 78
        raise RuntimeError(f"\n{banner}\n{hint}\n{banner}")
    cluster = _Cluster(bindir, user=parsed.username or "postgres")
    admin_url = cluster.start()
    announce(
        f"No PostgreSQL answered at {parsed.render_as_string(hide_password=True)}: started a "
        f"throwaway cluster on 127.0.0.1:{cluster.port} in {cluster.root} (from {bindir}); "
        "it is removed when the tests end. Set TEST_DATABASE_URL to use your own server."
    )
    return PostgresServer(admin_url, cluster)


# ------------------------------------------------------------- replication (integration)

_SERVER_PACKAGES = "postgresql (initdb, pg_ctl, pg_basebackup)"


def require_bindir() -> Path:
    """PostgreSQL's server binaries, or a RuntimeError naming the Debian package (the
    integration suite fails, never skips, on a machine without them)."""
    bindir = find_bindir()
    if bindir is None or not (bindir / "pg_basebackup").is_file():
        raise RuntimeError(
            f"the integration tests need PostgreSQL's server binaries: install the Debian "
            f"package {_SERVER_PACKAGES}: apt-get install postgresql"
        )
    return bindir


class _Standby(_Cluster):
    """A hot standby made by `pg_basebackup -R` from a running primary."""

    def __init__(
        self, bindir: Path, user: str, primary_port: int, settings: dict[str, str] | None
    ) -> None:
        super().__init__(bindir, user, settings)
        self.primary_port = primary_port

    def _start(self) -> str:
        self._check_runuser()
        proc = self._run(
            "pg_basebackup",
            "-D",
            str(self.data),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary_port),
            "-U",
            self.user,
            "-R",  # standby.signal + primary_conninfo: start as a streaming replica
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            timeout=120,
        )
        if proc.returncode != 0:
            raise self._fail("pg_basebackup failed", proc)
        return self._launch()


class Cluster:
    """A throwaway cluster this test owns: its URL, and stop/restart/destroy."""

    def __init__(self, cluster: _Cluster) -> None:
        self._cluster = cluster
        self.url = cluster.url
        atexit.register(self.destroy)

    @property
    def port(self) -> int:
        return self._cluster.port

    def stop(self) -> None:
        self._cluster.stop()

    def restart(self) -> None:
        self._cluster.restart()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)
        self._cluster.destroy()

    def create_database(self, prefix: str = "blogtest") -> str:
        return PostgresServer(self.url).create_database(prefix)


def start_cluster(settings: dict[str, str] | None = None, user: str = "postgres") -> Cluster:
    """A fresh primary (wal_level=replica, so a standby can follow it)."""
    merged = {"wal_level": "replica", "full_page_writes": "on", **(settings or {})}
    cluster = _Cluster(require_bindir(), user, merged)
    cluster.start()
    return Cluster(cluster)


def start_standby(primary: Cluster, settings: dict[str, str] | None = None) -> Cluster:
    """A hot standby of `primary`, streaming from it, on a free port."""
    standby = _Standby(
        require_bindir(),
        primary._cluster.user,
        primary.port,
        {"hot_standby": "on", **(settings or {})},
    )
    standby.start()
    return Cluster(standby)
