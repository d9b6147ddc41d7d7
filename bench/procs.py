"""Subprocesses of the harness: started in their own process group, killed on every exit.

Every process started here is registered; `stop_all` (run by atexit, by SIGTERM/SIGHUP
and by the run's `finally`) terminates each group, then kills what is left.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_REGISTRY: list[subprocess.Popen[bytes]] = []


class ProcessFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    stdout_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a process in a new session (its own process group), registered for cleanup."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    if stdout_pipe:
        stdout: int | object = subprocess.PIPE
        stderr: int | object = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    else:
        stdout = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        stderr = subprocess.STDOUT
    proc = subprocess.Popen(
        list(args),
        env=full_env,
        cwd=ROOT,
        stdout=stdout,  # type: ignore[arg-type]
        stderr=stderr,  # type: ignore[arg-type]
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    _REGISTRY.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, wait up to `timeout`, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # The group may outlive its leader (workers of `serve --workers N`).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
    if proc in _REGISTRY:
        _REGISTRY.remove(proc)


def stop_all() -> None:
    for proc in list(_REGISTRY):
        with contextlib.suppress(Exception):
            stop(proc, timeout=3.0)


def _on_signal(signum: int, _frame: object) -> None:
    # Turn SIGTERM/SIGHUP into SystemExit so every `finally` (drop the database) runs.
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def wait_serving(
    proc: subprocess.Popen[bytes],
    port: int,
    *,
    service: str = "blog.v1.UserService",
    timeout: float = 60.0,
    log_path: Path | None = None,
) -> float:
    """Poll grpc.health.v1 Check(service) until SERVING; raise loudly if the process
    exits or the deadline passes. Returns the seconds it took."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            code = proc.poll()
            if code is not None:
                raise ProcessFailed(
                    f"{' '.join(map(str, proc.args))} exited with {code} before serving;"  # type: ignore[arg-type]
                    f" log tail:\n{tail(log_path)}"
                )
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                response = stub.Check(request, timeout=1.0)  # type: ignore[attr-defined]
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if time.monotonic() > deadline:
                stop(proc)
                raise ProcessFailed(
                    f"server on port {port} not SERVING for {service} after {timeout:.0f}s"
                    f" (last: {last}); log tail:\n{tail(log_path)}"
                )
            time.sleep(0.1)


def python(*module_args: str) -> list[str]:
    return [sys.executable, *module_args]
