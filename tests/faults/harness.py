"""The fault suite's machinery: a PostgreSQL cluster it owns, servers as real
subprocesses, and the figures each promise reports (docs/RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blog.v1 import post_pb2_grpc, user_pb2_grpc
from support.postgres import _Cluster, find_bindir, free_port, raw_dsn, with_database

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
READINESS = ("blog.v1.UserService", "blog.v1.PostService")


# -- PostgreSQL ---------------------------------------------------------------------------


class OwnedCluster:
    """A throwaway cluster the suite may stop and start (fast shutdown, start)."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("the fault suite needs PostgreSQL server binaries (pg_config)")
        self._cluster = _Cluster(bindir, user="postgres")
        self.admin_url = self._cluster.start()
        self.port = self._cluster.port
        assert self.port is not None

    def database(self, name: str) -> str:
        asyncio_run(_admin(self.admin_url, f'CREATE DATABASE "{name}"'))
        return with_database(self.admin_url, name)

    def stop(self) -> None:
        self._cluster.stop()

    def start(self) -> None:
        self._cluster.restart()

    def close(self) -> None:
        self._cluster.destroy()


def asyncio_run(coro: Any) -> Any:
    from support.postgres import _run

    return _run(coro)


async def _admin(url: str, sql: str) -> None:
    connection = await asyncpg.connect(raw_dsn(url), timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def fetch(url: str, sql: str, *args: Any) -> list[Any]:
    connection = await asyncpg.connect(raw_dsn(url), timeout=5)
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


async def sessions(url: str) -> dict[str, int]:
    """The service's sessions on this database by state (the suite's own excluded)."""
    name = url.rsplit("/", 1)[1]
    rows = await fetch(
        url,
        "SELECT coalesce(state, '') AS state, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
        "GROUP BY 1",
        name,
    )
    return {row["state"]: row["n"] for row in rows}


# -- the server as a real process -----------------------------------------------------------


@dataclass
class ServerProcess:
    """`python -m service serve` with env settings, on a loopback port."""

    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, log_dir: Path) -> ServerProcess:
        self.port = free_port()
        self.log_path = log_dir / f"server-{self.port}.log"
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "GRPC_LISTEN": f"127.0.0.1:{self.port}",
            "LOG_LEVEL": "WARNING",
            "HEALTH_CHECK_INTERVAL": "0.5",
            "HEALTH_CHECK_TIMEOUT": "1",
            **self.env,
        }
        env.pop("PAGE_TOKEN_SECRET", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--migrate"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss) / 2**20

    def log(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        async with grpc.aio.insecure_channel(self.target) as channel:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
                if await ready(channel):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server never became ready:\n{self.log()[-3000:]}")
                await asyncio.sleep(0.1)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, seconds: float) -> int | None:
        """The exit code, or None if still running after `seconds`."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


async def ready(channel: grpc.aio.Channel, service: str = READINESS[0]) -> bool:
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1.0
        )
    except grpc.aio.AioRpcError:
        return False
    return bool(response.status == SERVING)


@contextlib.asynccontextmanager
async def served(database_url: str, log_dir: Path, **env: str) -> Any:
    server = ServerProcess(database_url, {k.upper(): v for k, v in env.items()}).start(log_dir)
    try:
        await server.wait_ready()
        yield server
    finally:
        server.kill()


def stubs(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    return user_pb2_grpc.UserServiceStub(channel), post_pb2_grpc.PostServiceStub(channel)


# -- figures --------------------------------------------------------------------------------


PROMISES: dict[str, str] = {
    "writes": "Acknowledged writes survive database cuts and restarts",
    "sigterm": "SIGTERM under load with streams open",
    "sigkill": "SIGKILL inside BatchCreateUsers",
    "leaks": "Cancelled streams and passed deadlines leak nothing",
    "memory": "Large rows: stalled streams and big pages stay bounded",
    "etags": "Concurrent writers with etags",
    "fuzz": "Generated hostile requests",
    "deadlock": "Deadlock-prone batches",
}


@dataclass
class Figure:
    key: str
    how: str
    figure: str
    passed: bool
    waits_for: str = ""  # an xfail promise: the issue item whose fix makes it hold


@dataclass
class Figures:
    rows: dict[str, Figure] = field(default_factory=dict)

    def record(self, key: str, how: str, figure: str, *, passed: bool, waits_for: str = "") -> None:
        self.rows[key] = Figure(key, how, figure, passed, waits_for)
        print(f"[fault suite] {PROMISES[key]}: {figure}", flush=True)

    def lines(self) -> Iterator[str]:
        for key, row in self.rows.items():
            mark = "ok" if row.passed else f"xfail: {row.waits_for}" if row.waits_for else "FAILED"
            yield f"{PROMISES[key]}: {row.figure} ({mark})"


RELIABILITY = ROOT / "docs" / "RELIABILITY.md"
_HEADER = """# Reliability: the fault suite's promises and figures

Written by `make test-faults` (tests/faults, the `pytest_sessionfinish` hook in
tests/faults/conftest.py) at the end of each run; a promise not run keeps the
figure of its last run. Real processes and real faults on loopback: a throwaway
PostgreSQL cluster the suite owns, `python -m service serve` subprocesses,
signals, a TCP proxy that cuts connections. "xfail" marks a promise that waits
for a fix owned elsewhere (issue 8 item named) and flips to a failure once it
holds, so the marker is removed with the fix.

| promise | how it is tested | figure of the last run | result |
|---|---|---|---|
"""


def write_reliability(figures: Figures, run_at: str) -> None:
    previous: dict[str, str] = {}
    if RELIABILITY.exists():
        for line in RELIABILITY.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 4 and cells[0] in PROMISES.values():
                previous[cells[0]] = line
    out = [_HEADER.rstrip("\n")]
    for key, title in PROMISES.items():
        row = figures.rows.get(key)
        if row is not None:
            if row.passed:
                result = f"pass ({run_at})"
            elif row.waits_for:
                result = f"expected failure until {row.waits_for} ({run_at})"
            else:
                result = f"FAIL ({run_at})"
            out.append(f"| {title} | {row.how} | {row.figure} | {result} |")
        elif title in previous:
            out.append(previous[title])
        else:
            out.append(f"| {title} | (not run yet) | | |")
    RELIABILITY.write_text("\n".join(out) + "\n")
