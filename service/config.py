"""Settings: read from the environment once, validated at start-up, passed down."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PAGE_TOKEN_SECRET_MIN_BYTES = 32
# Addresses gRPC binds without a host:port (a Unix socket, a VM socket).
_NON_TCP_ADDRESSES = ("unix:", "unix-abstract:", "vsock:")


def mask_url(url: str) -> str:
    """A database URL fit for a log line or an error message: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Not parseable as a URL: mask whatever sits between `user:` and `@`.
        return re.sub(r"(//[^/@:]*:)[^@/]*@", r"\1***@", url)


class Settings(BaseSettings):
    """Every knob of the service. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./blog.db"
    database_read_url: str | None = None
    grpc_listen: str = "[::]:50051"
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 10.0
    grpc_max_connection_age: Annotated[float, Field(gt=0)] = 300.0

    db_pool_size: Annotated[int, Field(ge=1, le=1000)] = 10
    db_max_overflow: Annotated[int, Field(ge=0, le=1000)] = 10
    db_pool_timeout: Annotated[float, Field(gt=0, le=600)] = 5.0
    db_pool_recycle: Annotated[float, Field(ge=-1)] = 1800.0
    db_statement_timeout: Annotated[float, Field(ge=0)] = 30.0
    db_pgbouncer: bool = False
    migration_lock_timeout: Annotated[float, Field(gt=0, le=600)] = 5.0
    sqlite_busy_timeout: Annotated[float, Field(ge=0)] = 5.0

    stream_max_concurrent: Annotated[int, Field(ge=1)] | None = None
    stream_idle_timeout: Annotated[float, Field(gt=0)] = 60.0
    stream_batch_rows: Annotated[int, Field(ge=1, le=1000)] = 1000
    stream_batch_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024

    max_message_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    page_token_secret: SecretStr | None = None
    idempotency_ttl_hours: Annotated[float, Field(ge=24)] = 24.0
    user_retention_days: Annotated[float, Field(gt=0)] | None = None
    purge_interval: Annotated[float, Field(gt=0)] = 3600.0

    health_check_interval: Annotated[float, Field(gt=0, le=5)] = 1.0
    health_check_timeout: Annotated[float, Field(gt=0, le=5)] = 1.0

    auth_tokens_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    file_reload_interval: Annotated[float, Field(gt=0, le=3600)] = 5.0

    reflection: bool = True
    log_level: str = "INFO"
    log_format: str = "text"

    # Operating it (README "Operating it"): metrics, the access log, deadlines, load.
    metrics_listen: str | None = None
    access_log: bool = True
    default_call_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_concurrent_rpcs: Annotated[int, Field(ge=1)] | None = None
    event_loop_lag_interval: Annotated[float, Field(gt=0, le=60)] = 0.5
    # Keepalive enforcement: the server pings an idle connection every
    # GRPC_KEEPALIVE_TIME, drops it when no ack comes within GRPC_KEEPALIVE_TIMEOUT,
    # and answers a client that pings more often than GRPC_KEEPALIVE_MIN_PING_INTERVAL
    # with GOAWAY (too_many_pings). Clients: keepalive_time_ms >= that interval.
    grpc_keepalive_time: Annotated[float, Field(ge=1)] = 60.0
    grpc_keepalive_timeout: Annotated[float, Field(ge=1)] = 20.0
    grpc_keepalive_min_ping_interval: Annotated[float, Field(ge=1)] = 10.0

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _known_driver(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("sqlite+aiosqlite:", "postgresql+asyncpg:")):
            raise ValueError(
                "must be a sqlite+aiosqlite:// or postgresql+asyncpg:// SQLAlchemy URL, "
                f"not {mask_url(value)}"
            )
        try:
            make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(f"{mask_url(value)} is not a valid SQLAlchemy URL") from None
        return value

    @field_validator("grpc_listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if value.startswith(_NON_TCP_ADDRESSES):
            return value
        host, colon, port = value.rpartition(":")
        bracketed = host.startswith("[") == host.endswith("]")
        if not (colon and host and bracketed and port.isdigit() and int(port) <= 65535):
            raise ValueError(
                f"{value!r} is not an address to listen on: use HOST:PORT, "
                "for example [::]:50051 or 127.0.0.1:50051"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level

    @field_validator("page_token_secret")
    @classmethod
    def _long_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secrets = [part.strip() for part in value.get_secret_value().split(",")]
        if not any(secrets):
            raise ValueError("holds no secret: unset it, or set one or more, comma-separated")
        for number, secret in enumerate(secrets, start=1):
            if secret and len(secret.encode()) < PAGE_TOKEN_SECRET_MIN_BYTES:
                raise ValueError(
                    f"secret {number} is {len(secret.encode())} bytes; each must be at least "
                    f"{PAGE_TOKEN_SECRET_MIN_BYTES} (make one with `openssl rand -base64 48`)"
                )
        return value

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("must be 'text' or 'json'")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port or :port, e.g. 0.0.0.0:9090 or [::]:9090")
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        return self

    @property
    def effective_stream_max_concurrent(self) -> int:
        """STREAM_MAX_CONCURRENT, by default half the pool (at least one)."""
        if self.stream_max_concurrent is not None:
            return self.stream_max_concurrent
        return max(1, (self.db_pool_size + self.db_max_overflow) // 2)
