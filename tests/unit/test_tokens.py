"""Page and resume tokens (service/tokens.py): authenticated before any of their
contents is parsed, and key reloads throttled (issue 8, items 1 and 2)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from service.errors import InvalidArgument
from service.tokens import TokenCodec, _mac

KEY = ("db1", b"k" * 32)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


FORGED = [
    b64(b"[" * 1000) + ".AA",  # issue 8: a RecursionError in json.loads, answered INTERNAL
    "db1." + b64(b"[" * 1000) + ".AAAAAAAAAAAAAAAAAAAAAA",
    "db1." + b64(b"[" * 100_000)[:3000] + "." + "A" * 22,
    b64(json.dumps({"k": "db1", "t": "users.page_token", "b": "x", "p": [1]}).encode()) + ".AA",
    "",
    ".",
    "..",
    "...",
    "db1..AAAAAAAAAAAAAAAAAAAAAA",
    "db1.e30.AAAAAAAAAAAAAAAAAAAAAA",  # "{}" under a made-up MAC
    "x" * 41 + ".e30.AAAAAAAAAAAAAAAAAAAAAA",  # key id too long
    '{"k":1}.e30.AAAAAAAAAAAAAAAAAAAAAA',  # JSON where the key id goes
    "db1.e30=.AAAAAAAAAAAAAAAAAAAAAA",  # padding
    "db1.e3 0.AAAAAAAAAAAAAAAAAAAAAA",
    "db1.\u00e9.AAAAAAAAAAAAAAAAAAAAAA",
    "db1.e30.AAAAAAAAAAAAAAAAAAAAA",  # 21-character MAC
    "db1.e30.AAAAAAAAAAAAAAAAAAAAAA.x",
    "\x00.\x00.\x00",
    "db1." + "A" * 5000 + "." + "A" * 22,  # longer than any token
]


@pytest.mark.parametrize("token", FORGED, ids=range(len(FORGED)))
async def test_a_forged_token_of_any_shape_is_invalid_argument(token: str) -> None:
    codec = TokenCodec([KEY])
    with pytest.raises(InvalidArgument) as caught:
        await codec.decode(token, kind="users.page_token", binding="b", field="page_token")
    assert [v.field for v in caught.value.violations] == ["page_token"]


async def test_a_signed_body_that_is_not_a_position_is_invalid_argument() -> None:
    """Even a body the key really signed is parsed defensively."""
    codec = TokenCodec([KEY])
    for body in (b"[" * 1000, b"[]", b'{"t":"k","b":"b","p":[[1]]}', b"\xff"):
        signed = "db1." + b64(body)

        token = signed + "." + b64(_mac(KEY[1], signed))
        with pytest.raises(InvalidArgument):
            await codec.decode(token, kind="k", binding="b", field="page_token")


async def test_round_trip_and_binding() -> None:
    codec = TokenCodec([KEY])
    token = codec.encode("users.page_token", "b", [5, "x"])
    assert token.startswith("db1.")
    got = await codec.decode(token, kind="users.page_token", binding="b", field="page_token")
    assert got == [5, "x"]
    with pytest.raises(InvalidArgument):
        await codec.decode(token, kind="users.page_token", binding="other", field="page_token")


async def test_the_key_id_is_covered_by_the_mac() -> None:
    """Moving a token's body under another known key id does not verify."""
    codec = TokenCodec([KEY, ("db2", b"j" * 32)])
    token = codec.encode("k", "b", [1])
    with pytest.raises(InvalidArgument):
        await codec.decode("db2" + token[3:], kind="k", binding="b", field="page_token")


async def test_unknown_key_ids_reload_at_most_once_per_interval() -> None:
    loads = 0

    async def reload() -> list[tuple[str, bytes]]:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return [KEY]

    codec = TokenCodec([KEY], reload, reload_interval=0.5)
    forged = "nokey.e30." + "A" * 22
    decode = codec.decode(forged, kind="k", binding="b", field="page_token")
    with pytest.raises(InvalidArgument):
        await decode
    assert loads == 0  # the keys were loaded just now, at construction

    await asyncio.sleep(0.5)

    async def one() -> None:
        with pytest.raises(InvalidArgument):
            await codec.decode(forged, kind="k", binding="b", field="page_token")

    # Concurrent triggers share one reload; later ones within the interval trigger none.
    await asyncio.gather(*(one() for _ in range(50)))
    for _ in range(200):
        await one()
    assert loads == 1


async def test_a_new_key_is_learned_on_the_next_reload() -> None:
    other = ("db2", b"n" * 32)
    published: list[tuple[str, bytes]] = [KEY]

    async def reload() -> list[tuple[str, bytes]]:
        return list(published)

    signer = TokenCodec([other, KEY])
    token = signer.encode("k", "b", [1])
    codec = TokenCodec([KEY], reload, reload_interval=0.05)
    published.append(other)  # publish, wait a reload interval, then sign
    await asyncio.sleep(0.06)
    assert await codec.decode(token, kind="k", binding="b", field="page_token") == [1]


async def test_a_failing_or_hanging_reload_leaves_the_token_invalid_argument() -> None:
    async def down() -> list[tuple[str, bytes]]:
        raise ConnectionRefusedError("the database is down")

    async def hangs() -> list[tuple[str, bytes]]:
        await asyncio.sleep(30)
        return []

    forged = "db9.e30." + "A" * 22
    for reload in (down, hangs):
        codec = TokenCodec([KEY], reload, reload_interval=0.0, reload_wait=0.2)
        started = time.monotonic()
        with pytest.raises(InvalidArgument):
            await codec.decode(forged, kind="k", binding="b", field="page_token")
        assert time.monotonic() - started < 1.0
