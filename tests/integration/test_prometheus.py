"""A real Prometheus (Debian's `prometheus`) scrapes the service and answers a query
for grpc_server_handled_total with the calls made. The package is a real dependency of
this suite, like PostgreSQL: without it the test fails, naming it (`make
test-integration` installs it when missing, through scripts/ensure-debian-packages)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blog.v1 import user_pb2
from conftest import Backend, running_server, settings_for
from factories import create_user_request
from support.postgres import free_port

PACKAGE = "prometheus"


def _binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        pytest.fail(
            f"the `prometheus` binary is missing: install Debian's `{PACKAGE}` package "
            f"(apt-get install {PACKAGE}, or scripts/ensure-debian-packages prometheus:{PACKAGE})"
        )
    return found


def _get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


class Prometheus:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log

    def query(self, expression: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}
        )
        answer = _get(url)
        assert answer["status"] == "success", answer
        data = answer["data"]
        assert isinstance(data, dict)
        result: list[dict[str, object]] = data["result"]
        return result

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _start(tmp_path: Path, target_port: int) -> Iterator[Prometheus]:
    binary = _binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: blog\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    prometheus = Prometheus(port, process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited: {prometheus.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"prometheus not ready in 30 s: {prometheus.output()}"
                    ) from None
                time.sleep(0.2)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def test_prometheus_scrapes_the_calls_made(backend: Backend, tmp_path: Path) -> None:
    _binary()  # fail first, naming the package, if it is missing
    metrics_port = free_port()
    settings = settings_for(backend.url, metrics_listen=f"127.0.0.1:{metrics_port}")
    async with running_server(settings) as live:
        created = await live.users.CreateUser(create_user_request())
        for _ in range(7):
            await live.users.GetUser(user_pb2.GetUserRequest(id=created.id))
        health = health_pb2_grpc.HealthStub(live.channel)
        for _ in range(3):
            await health.Check(health_pb2.HealthCheckRequest(service=""))
        starting = _start(tmp_path, metrics_port)
        prometheus = await asyncio.to_thread(next, starting)
        try:
            query = (
                'sum by (grpc_method, grpc_code) (grpc_server_handled_total{job="blog", '
                'grpc_method=~"GetUser|Check"})'
            )
            seen: dict[tuple[object, object], float] = {}
            deadline = time.monotonic() + 30
            want = {("GetUser", "OK"): 7.0, ("Check", "OK"): 3.0}
            while seen != want:
                assert time.monotonic() < deadline, (
                    f"prometheus answered {seen}, not {want}: {prometheus.output()}"
                )
                await asyncio.sleep(0.5)
                result = await asyncio.to_thread(prometheus.query, query)
                seen = {}
                for series in result:
                    labels = series["metric"]
                    value = series["value"]
                    assert isinstance(labels, dict)
                    assert isinstance(value, list)
                    seen[(labels["grpc_method"], labels["grpc_code"])] = float(value[1])
            up = await asyncio.to_thread(prometheus.query, 'up{job="blog"}')
            assert [float(str(s["value"][1])) for s in up] == [1.0]  # type: ignore[index]
        finally:
            await asyncio.to_thread(lambda: next(starting, None))
