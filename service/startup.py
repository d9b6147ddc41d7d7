"""Start-up errors a person can act on: one line that names the setting and what to do.

API.md, "Start-up errors": a bad `DATABASE_URL`, an unreachable or missing database,
a port in use, a bad setting: no traceback, passwords masked, a non-zero exit. The
command in hints is the one actually run (`blog-service` in the image, `python -m
service` from a checkout).
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import make_url

from service.config import Settings, mask_url

_command = "python -m service"


class StartupError(Exception):
    """A start-up failure whose message is the whole story: logged as one line."""


def set_command(argv0: str) -> str:
    """Remember how this process was started (`sys.argv[0]`) for usage lines and hints."""
    global _command
    name = os.path.basename(argv0)
    if name and name != "__main__.py" and not name.endswith(".py"):
        _command = name
    return _command


def command() -> str:
    """`blog-service` (the console script), or `python -m service`."""
    return _command


def describe_settings_error(error: ValidationError) -> str:
    """Pydantic's report without the input values (they may hold passwords)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        name = ".".join(str(part) for part in item["loc"]).upper()
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {message}" if name else message)
    return "; ".join(parts)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, what caused it, and the driver error SQLAlchemy wrapped, once each."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__, getattr(current, "orig", None)):
            if isinstance(linked, BaseException):
                pending.append(linked)


def _file_setting(settings: Settings, filename: object) -> str | None:
    if filename is None:
        return None
    for name in ("auth_tokens_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        path = getattr(settings, name)
        if path is not None and Path(str(filename)) == path:
            return name.upper()
    return None


def explain(error: BaseException, settings: Settings) -> str | None:
    """One line for a start-up failure a person can fix, or None for a bug (keep its
    traceback)."""
    url = make_url(settings.database_url)
    shown = f"DATABASE_URL {mask_url(settings.database_url)}"
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    for cause in _chain(error):
        if isinstance(cause, StartupError):
            return str(cause)
        sqlstate = getattr(cause, "sqlstate", None)
        if sqlstate == "3D000":  # invalid_catalog_name
            return (
                f"{shown}: the database {url.database!r} does not exist on {where}: create it "
                f"(createdb -h {url.host or 'localhost'} -p {url.port or 5432} "
                f"-U {url.username or 'postgres'} {url.database}) or fix the name in DATABASE_URL"
            )
        if sqlstate in ("28P01", "28000"):  # invalid password, invalid authorization
            return (
                f"{shown}: PostgreSQL on {where} refused user {url.username!r}: fix the user "
                "or password in DATABASE_URL, or the server's pg_hba.conf"
            )
        if isinstance(cause, socket.gaierror):
            return (
                f"{shown}: the database host {url.host!r} does not resolve "
                f"({cause.strerror}): fix the host name in DATABASE_URL"
            )
        if isinstance(cause, ConnectionRefusedError):
            return (
                f"{shown}: nothing accepts connections on {where}: start PostgreSQL there, "
                "or fix the host and port in DATABASE_URL"
            )
        if isinstance(cause, OSError) and cause.filename is not None:
            setting = _file_setting(settings, cause.filename)
            if setting is not None:
                return (
                    f"{setting} {cause.filename}: {cause.strerror}: fix the path in {setting} "
                    "or the file's permissions"
                )
        if isinstance(cause, TimeoutError):
            return (
                f"{shown}: no answer from {where} within the connect timeout: check the host "
                "and port in DATABASE_URL, and that a firewall lets the connection through"
            )
        if isinstance(cause, OSError) and cause.errno in (
            errno.EHOSTUNREACH,
            errno.ENETUNREACH,
            errno.EADDRNOTAVAIL,
            errno.ECONNRESET,
            None,  # asyncpg: "Multiple exceptions: ..." for a name with several addresses
        ):
            return (
                f"{shown}: cannot connect to {where} ({cause}): start PostgreSQL there, "
                "or fix the host and port in DATABASE_URL"
            )
        if isinstance(cause, sqlite3.OperationalError) and "unable to open" in str(cause):
            return (
                f"{shown}: cannot open the SQLite file {url.database!r}: make sure its "
                "directory exists and is writable, or fix the path in DATABASE_URL"
            )
    return None


def preflight(settings: Settings) -> None:
    """Checks cheaper and clearer before connecting than after: a SQLite file whose
    directory is missing (aiosqlite's thread would also print a traceback)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        directory = Path(url.database).resolve().parent
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            raise StartupError(
                f"DATABASE_URL {mask_url(settings.database_url)}: cannot open the SQLite file "
                f"{url.database!r}: its directory {directory} does not exist or is not "
                "writable: create it, or fix the path in DATABASE_URL"
            )


def describe_listen_failure(address: str) -> str:
    """Why gRPC could not bind `address`: it does not resolve, it is in use, or it is
    not this host's; said by trying what gRPC tried with a plain socket."""
    prefix = f"GRPC_LISTEN (--listen) {address}"
    host, _, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit():
        return f"{prefix}: not an address to listen on: use HOST:PORT, for example [::]:50051"
    try:
        addresses = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        return (
            f"{prefix}: the host {host!r} does not resolve ({error}): use an address of this "
            "host, for example [::]:50051 or 127.0.0.1:50051"
        )
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return (
                        f"{prefix}: the port is in use (by another server without "
                        "SO_REUSEPORT): stop it, or choose another port"
                    )
                if error.errno == errno.EADDRNOTAVAIL:
                    return f"{prefix}: {host} is not an address of this host: use one that is"
                if error.errno == errno.EACCES:
                    return f"{prefix}: not allowed to bind port {port_text}: use a port above 1023"
                return f"{prefix}: cannot listen there ({error.strerror})"
    return f"{prefix}: gRPC could not bind it (see its log line above)"


def resolves(address: str) -> str | None:
    """None if the host of `address` resolves (or it is not a TCP address), else the
    one-line reason, so gRPC never tries a name that is not there."""
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return None
    host, _, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return describe_listen_failure(address)
    return None
