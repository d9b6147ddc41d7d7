"""TLS (TLS_CERT_FILE/TLS_KEY_FILE) and mTLS (TLS_CLIENT_CA_FILE), with certificates made
for the test by the openssl command line."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blog.v1 import user_pb2_grpc
from conftest import Backend, running_server, settings_for
from factories import create_user_request


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"))


def _make_pki(directory: Path) -> Pki:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA", cwd=directory)  # fmt: skip
    _issue(directory, "server", "/CN=localhost",
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _issue(directory, "client", "/CN=test client", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


def _channel(port: int, pki: Pki, *, client_cert: bool, fresh: bool = False) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    # fresh: a connection of its own, never one an earlier channel left open.
    options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
    return grpc.aio.secure_channel(f"localhost:{port}", credentials, options=options)


async def _serving(channel: grpc.aio.Channel) -> bool:
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_serves_secure_channels_only(backend: Backend, pki: Pki) -> None:
    settings = settings_for(backend.url, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    async with running_server(settings) as live:
        async with _channel(live.server.port, pki, client_cert=False) as channel:
            assert await _serving(channel)
            created = await user_pb2_grpc.UserServiceStub(channel).CreateUser(create_user_request())
            assert created.id > 0
        # The plaintext channel of `running_server` cannot talk to a TLS port.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.CreateUser(create_user_request(), timeout=2)
        assert caught.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


async def test_mtls_requires_a_client_certificate(backend: Backend, pki: Pki) -> None:
    settings = settings_for(
        backend.url,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
    )
    async with running_server(settings) as live:
        async with _channel(live.server.port, pki, client_cert=True) as channel:
            assert await _serving(channel)
        async with _channel(live.server.port, pki, client_cert=False) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _serving(channel)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def _rotatable(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Pki]:
    """Copies of the server's certificate and key to serve from, and a second PKI (another
    CA) to rotate to."""
    served = tmp_path_factory.mktemp("served")
    cert, key = served / "server.crt", served / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    return cert, key, _make_pki(tmp_path_factory.mktemp("rotated"))


async def test_a_rotated_certificate_reaches_new_connections_without_a_restart(
    backend: Backend, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Replace the certificate files with ones from another CA: once the change is seen
    (polled here every 0.2 s), a new channel trusting only the new CA gets through and one
    trusting only the old CA does not."""
    cert, key, new = _rotatable(pki, tmp_path_factory)
    settings = settings_for(
        backend.url, tls_cert_file=cert, tls_key_file=key, file_reload_interval=0.2
    )
    async with running_server(settings) as live:
        port = live.server.port
        async with _channel(port, pki, client_cert=False) as channel:
            assert await _serving(channel)
        # Write the key first: until the certificate follows they do not match, and the
        # reload keeps the old pair rather than serving a broken one.
        shutil.copy(new.server_key, key)
        await asyncio.sleep(0.5)
        async with _channel(port, pki, client_cert=False, fresh=True) as channel:
            assert await _serving(channel)
        shutil.copy(new.server_cert, cert)
        deadline = time.monotonic() + 10
        while True:
            try:
                async with _channel(port, new, client_cert=False, fresh=True) as channel:
                    assert await _serving(channel)
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline, "the new certificate was never served"
                await asyncio.sleep(0.2)
        async with _channel(port, pki, client_cert=False, fresh=True) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _serving(channel)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_reload_files_rereads_the_certificate_at_once(
    backend: Backend, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What SIGHUP does: no waiting for the poll (an hour here)."""
    cert, key, new = _rotatable(pki, tmp_path_factory)
    settings = settings_for(
        backend.url, tls_cert_file=cert, tls_key_file=key, file_reload_interval=3600
    )
    async with running_server(settings) as live:
        shutil.copy(new.server_key, key)
        shutil.copy(new.server_cert, cert)
        live.server.reload_files()
        async with _channel(live.server.port, new, client_cert=False, fresh=True) as channel:
            assert await _serving(channel)
