"""The life of a ceiling or naive-twin server process: listen, report ready, stop on a signal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve_until_signalled(server: grpc.aio.Server, port: int, ready: Iterable[str]) -> None:
    """Add health to `server`, listen on 127.0.0.1:`port`, mark `ready` SERVING (the
    harness waits on that), and return after SIGTERM or SIGINT has stopped the server."""
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on {port}")
    await server.start()
    for name in ready:
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0.5)
