"""Files re-read without a restart: AUTH_TOKENS_FILE and the TLS certificate and key.

Each is reloaded on SIGHUP and when one of its files changes (polled every
FILE_RELOAD_INTERVAL seconds: size, mtime and inode, so a Kubernetes Secret's
symlink swap counts). A file that does not load (half written, a key that does not
match its certificate) is logged and the previous contents stay in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from service.startup import StartupError

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int] | None, ...]


def _signature(paths: Sequence[Path]) -> Signature:
    def one(path: Path) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    return tuple(one(path) for path in paths)


class TlsCertificates:
    """The server's certificate, key and client CA, for gRPC's dynamic credentials:
    gRPC asks `fetch` before each new handshake; it hands over a new configuration once
    after a reload and None (no change) otherwise, so established connections keep
    theirs and new ones get the new certificate."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._current = self._load()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        extra = (self.client_ca_file,) if self.client_ca_file is not None else ()
        return (self.cert_file, self.key_file, *extra)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        try:
            # Refuses a key that does not match the certificate, or files that are not PEM.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.cert_file, self.key_file
            )
            if self.client_ca_file is not None:
                ssl.create_default_context(cafile=self.client_ca_file)
            certificate = self.cert_file.read_bytes()
            key = self.key_file.read_bytes()
            client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        except (ssl.SSLError, OSError) as error:
            raise StartupError(
                f"TLS_CERT_FILE {self.cert_file} / TLS_KEY_FILE {self.key_file}"
                + (f" / TLS_CLIENT_CA_FILE {self.client_ca_file}" if self.client_ca_file else "")
                + f": cannot be used ({error}): they must be PEM files, the key matching "
                "the certificate"
            ) from None
        return grpc.ssl_server_certificate_configuration([(key, certificate)], client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current,
            self.fetch,  # type: ignore[arg-type]  # the stubs miss that None means no change
            require_client_authentication=self.client_ca_file is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def reload(self) -> None:
        configuration = self._load()
        with self._lock:
            self._current = self._pending = configuration
        log.info("reloaded the TLS certificate from %s", self.cert_file)


class FileReloader:
    """Polls files and reloads what changed; `reload_all` (SIGHUP) reloads everything."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._watched: list[tuple[str, Sequence[Path], Callable[[], None], list[Signature]]] = []
        self._task: asyncio.Task[None] | None = None

    def watch(self, what: str, paths: Sequence[Path], reload: Callable[[], None]) -> None:
        self._watched.append((what, tuple(paths), reload, [_signature(paths)]))

    def start(self) -> None:
        if self._watched and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self, *, force: bool = False) -> None:
        for what, paths, reload, last in self._watched:
            signature = _signature(paths)  # before reading: a write after it shows next time
            if not force and signature == last[0]:
                continue
            last[0] = signature
            try:
                reload()
            except (StartupError, OSError, ValueError) as error:
                log.error("could not reload %s, keeping the previous one: %s", what, error)

    def reload_all(self) -> None:
        log.info("SIGHUP: reloading %s", ", ".join(what for what, *_ in self._watched) or "nothing")
        self.check(force=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()
