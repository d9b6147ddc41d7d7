"""A real PgBouncer (Debian's `pgbouncer`, 1.18) in transaction mode, in front of a test
PostgreSQL, on a free loopback port. Started and stopped by the tests themselves."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from support.postgres import free_port, with_host_port

__all__ = ["PgBouncer", "find_pgbouncer", "start_pgbouncer"]

STARTUP_TIMEOUT = 15.0
_MISSING = (
    "the integration tests need Debian's PgBouncer: install the package `pgbouncer` "
    "(apt-get install pgbouncer)"
)


def find_pgbouncer() -> Path:
    """The pgbouncer binary, or a RuntimeError naming the package (fail, never skip)."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(_MISSING)
    return Path(found)


class PgBouncer:
    """A running pgbouncer process; `url_for(direct_url)` is that database through it."""

    def __init__(self, process: subprocess.Popen[bytes], root: Path, port: int) -> None:
        self.process = process
        self.root = root
        self.port = port
        self._closed = False
        atexit.register(self.close)

    def url_for(self, direct_url: str) -> str:
        """The same database, user and password, reached through this pooler."""
        return with_host_port(direct_url, "127.0.0.1", self.port)

    @property
    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "pgbouncer.log").read_text(errors="replace")
        return ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: immediate shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_pgbouncer(
    server_url: str,
    *,
    default_pool_size: int,
    pool_mode: str = "transaction",
    max_client_conn: int = 500,
) -> PgBouncer:
    """Start pgbouncer on a free port in front of the PostgreSQL at `server_url` (any
    database on it: the `*` entry), trusting the URL's user. Waits until it accepts."""
    binary = find_pgbouncer()
    target = make_url(server_url)
    user = target.username or "postgres"
    root = Path(tempfile.mkdtemp(prefix="blogtest-pgbouncer-"))
    # pgbouncer refuses to run as root: `-u postgres` drops to that user after start-up.
    as_root = os.geteuid() == 0
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    (root / "userlist.txt").write_text(f'"{user}" ""\n')
    last_error = ""
    for _attempt in range(5):  # the free port may be taken before pgbouncer binds it
        port = free_port()
        config = root / "pgbouncer.ini"
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={target.host or '127.0.0.1'} port={target.port or 5432}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {root / 'userlist.txt'}",
                    f"admin_users = {user}",
                    f"pool_mode = {pool_mode}",
                    f"default_pool_size = {default_pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    f"max_client_conn = {max_client_conn}",
                    "max_db_connections = 0",
                    f"logfile = {root / 'pgbouncer.log'}",
                    f"pidfile = {root / 'pgbouncer.pid'}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "",
                ]
            )
        )
        for name in ("pgbouncer.ini", "userlist.txt"):
            if as_root:
                os.chown(root / name, pw.pw_uid, pw.pw_gid)
        command = [str(binary), *(["-u", "postgres"] if as_root else []), str(config)]
        process = subprocess.Popen(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        bouncer = PgBouncer(process, root, port)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return bouncer
            time.sleep(0.05)
        stderr = b""
        if process.poll() is not None and process.stderr is not None:
            stderr = process.stderr.read()
        last_error = f"{stderr.decode(errors='replace')}\n--- log:\n{bouncer.log[-3000:]}"
        bouncer._closed = True  # keep the directory for the next attempt
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if "Address already in use" not in last_error:
            break
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"pgbouncer did not start: {last_error}")
