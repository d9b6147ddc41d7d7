"""`python -m service serve` as a real subprocess, for promises about the server process
itself (its memory, measured from outside with psutil), not about a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings
from support.postgres import free_port

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


@dataclass
class ServerProcess:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.popen.pid)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _environment(**settings: str) -> dict[str, str]:
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", **settings)
    return env


@contextlib.asynccontextmanager
async def serve(log_dir: Path, **settings: str) -> AsyncIterator[ServerProcess]:
    """A server on a free loopback port with these settings (environment names), ready
    (readiness SERVING) when the block starts, killed when it ends."""
    server = _spawn(log_dir, settings)
    popen = server.popen
    try:
        await _ready(server)
        yield server
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)


def _spawn(log_dir: Path, settings: dict[str, str]) -> ServerProcess:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT,
            env=_environment(GRPC_LISTEN=f"127.0.0.1:{port}", **settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(popen, port, log)


async def _ready(server: ServerProcess, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.popen.poll() is not None:
                raise AssertionError(f"the server exited:\n{server.output()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="blog.v1.PostService"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready in {within}s:\n{server.output()}")
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def peak_rss(process: psutil.Process, every: float = 0.02) -> Iterator[list[int]]:
    """Sample the process's RSS in a thread while the block runs; the list holds one
    number, the highest RSS seen, once the block has ended."""
    peak = [int(process.memory_info().rss)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], int(process.memory_info().rss))
            done.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


async def settled_rss(server: ServerProcess, *, within: float = 10.0) -> int:
    """The server's RSS once it stops falling (freed memory may go back with a delay)."""
    deadline = time.monotonic() + within
    last = server.rss()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = server.rss()
        if now >= last - MB // 2:
            return now
        last = now
    return last
