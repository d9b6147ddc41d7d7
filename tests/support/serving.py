"""`python -m service serve` as a real subprocess for the integration suite: start it on
a port, wait until it is ready, stop it with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
READINESS = ("", "blog.v1.UserService", "blog.v1.PostService")
START_TIMEOUT = 40.0  # interpreters importing grpc and SQLAlchemy on a busy machine


def clean_environment() -> dict[str, str]:
    """The caller's environment without any setting the service would read."""
    names = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


class ServeProcess:
    """`python -m service serve ARGS` with the given settings, output kept in a file."""

    def __init__(self, port: int, *args: str, **env: str) -> None:
        self.port = port
        self.args = args
        self.env = {**clean_environment(), "GRPC_LISTEN": f"127.0.0.1:{port}", **env}
        self._dir = tempfile.TemporaryDirectory(prefix="blogtest-serve-")
        self._log = Path(self._dir.name) / "serve.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        with self._log.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", *self.args],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self._log.read_text(errors="replace")

    async def wait_serving(self, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        last: object = None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.popen is not None
                if self.popen.poll() is not None:
                    raise AssertionError(f"serve exited early:\n{self.output()[-3000:]}")
                try:
                    replies = [
                        await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=1.0)
                        for s in READINESS
                    ]
                    if all(r.status == health_pb2.HealthCheckResponse.SERVING for r in replies):
                        return
                    last = [r.status for r in replies]
                except grpc.aio.AioRpcError as error:
                    last = error.code()
                await asyncio.sleep(0.1)
        raise AssertionError(f"not serving within {within}s ({last}):\n{self.output()[-3000:]}")

    async def stop(self, within: float = 20.0) -> int:
        """SIGTERM, then wait (bounded) for the exit; return the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.popen.wait, within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"serve did not stop within {within}s:\n{self.output()[-3000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the process and its workers (by pid: only what this test started)."""
        if self.popen is None or self.popen.poll() is not None:
            self._dir.cleanup()
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.popen.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
