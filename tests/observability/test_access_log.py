"""The access log: one JSON line per finished call with every field, never a secret."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url

from blog.v1 import user_pb2
from conftest import SECRETS, Backend, running_server, settings_for
from factories import create_user_request
from service.logs import JsonFormatter
from service.observability.access_log import ACCESS_FIELDS
from support.locks import row_locked

TOKEN = "access-log-test-token-7f3a"
PASSWORD = "access-log-Pa55word-91c2"
SECRETS.update({TOKEN, PASSWORD})
AUTH = (("authorization", f"Bearer {TOKEN}"),)


class _Json(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, object]]]:
    handler = _Json()
    logger = logging.getLogger("service.access")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def _with_password(url: str) -> str:
    """PostgreSQL here trusts local connections, so a password is accepted and unused:
    enough to prove it never reaches a log line."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.set(password=PASSWORD).render_as_string(hide_password=False)


async def test_one_json_line_per_call_with_every_field(
    backend: Backend, tmp_path: Path, access_lines: list[dict[str, object]]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} reporter\n")
    settings = settings_for(_with_password(backend.url), auth_tokens_file=tokens)
    async with running_server(settings) as live:
        created = await live.users.CreateUser(
            create_user_request(bio=f"my password is {PASSWORD}"), metadata=AUTH
        )
        ok = live.users.GetUser(
            user_pb2.GetUserRequest(id=created.id),
            metadata=(*AUTH, ("x-request-id", "req-ok-1")),
        )
        await ok
        assert ("x-request-id", "req-ok-1") in tuple(await ok.trailing_metadata())

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(user_pb2.GetUserRequest(id=2**62), metadata=AUTH)
        echoed = dict(caught.value.trailing_metadata() or ())
        assert len(str(echoed["x-request-id"])) == 32  # a new one, echoed with the error

        async with row_locked(backend.url, created.id):
            waiting = live.users.UpdateUser(
                user_pb2.UpdateUserRequest(
                    user=user_pb2.User(id=created.id, display_name="changed"),
                    update_mask={"paths": ["display_name"]},
                ),
                metadata=(*AUTH, ("x-request-id", "req-cancel-1")),
            )
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # Hold the lock until the server has seen the cancel (at most 2 s): released
            # at once, the update could finish before the cancel reached the server.
            for _ in range(100):
                if any(line.get("request_id") == "req-cancel-1" for line in access_lines):
                    break
                await asyncio.sleep(0.02)
        # (On SQLite the handler ends once the file lock is free: its thread was waiting.)
        for _ in range(250):
            if any(line.get("request_id") == "req-cancel-1" for line in access_lines):
                break
            await asyncio.sleep(0.02)

    by_id = {line["request_id"]: line for line in access_lines}
    assert by_id.keys() >= {"req-ok-1", "req-cancel-1", echoed["x-request-id"]}
    ok_line, error_line = by_id["req-ok-1"], by_id[echoed["x-request-id"]]
    cancel_line = by_id["req-cancel-1"]
    for line in (ok_line, error_line, cancel_line):
        assert set(ACCESS_FIELDS) <= line.keys(), line
        assert line["caller"] == "reporter"
        assert str(line["peer"]).startswith("ipv4:127.0.0.1:")
        assert isinstance(line["duration_ms"], float)
        assert line["level"] == "INFO"
        assert line["trace_id"] == ""  # tracing is off
    assert (ok_line["method"], ok_line["code"], ok_line["reason"]) == (
        "/blog.v1.UserService/GetUser",
        "OK",
        "",
    )
    assert (error_line["code"], error_line["reason"]) == ("NOT_FOUND", "NOT_FOUND")
    assert cancel_line["method"] == "/blog.v1.UserService/UpdateUser"
    assert cancel_line["code"] == "CANCELLED"
    assert float(str(cancel_line["duration_ms"])) >= 250
    text = json.dumps(access_lines)
    assert TOKEN not in text
    assert PASSWORD not in text


async def test_access_log_false_turns_it_off(
    backend: Backend, access_lines: list[dict[str, object]]
) -> None:
    async with running_server(settings_for(backend.url, access_log=False)) as live:
        created = await live.users.CreateUser(create_user_request())
        await live.users.GetUser(user_pb2.GetUserRequest(id=created.id))
    assert access_lines == []


async def test_a_bad_request_id_is_replaced(
    backend: Backend, access_lines: list[dict[str, object]]
) -> None:
    async with running_server(settings_for(backend.url)) as live:
        created = await live.users.CreateUser(create_user_request())
        call = live.users.GetUser(
            user_pb2.GetUserRequest(id=created.id),
            metadata=(("x-request-id", 'has spaces "and quotes"'),),
        )
        await call
        echoed = dict(await call.trailing_metadata())["x-request-id"]
    assert len(str(echoed)) == 32
    assert access_lines[-1]["request_id"] == echoed
