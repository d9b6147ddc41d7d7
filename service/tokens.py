"""Opaque, signed page and resume tokens (AIP-158).

A token carries the keyset position after the last row served and a digest of the
request parameters it is bound to, and is signed with HMAC-SHA256. It names its key,
so keys can rotate: PAGE_TOKEN_SECRET (comma-separated, first one signs) when set,
otherwise a random key created once in the database and shared by every process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from service.errors import InvalidArgument

KeyLoader = Callable[[], Awaitable[list[tuple[str, bytes]]]]
_MAC_BYTES = 16


class TokenError(ValueError):
    pass


class TokenCodec:
    def __init__(self, keys: Sequence[tuple[str, bytes]], reload: KeyLoader | None = None) -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        self._keys = dict(keys)
        self._signing_id, self._signing_key = keys[0]
        self._reload = reload

    @staticmethod
    def env_keys(secret: str) -> list[tuple[str, bytes]]:
        """Keys from PAGE_TOKEN_SECRET: comma-separated, the first signs."""
        keys = []
        for part in secret.split(","):
            raw = part.strip().encode()
            if raw:
                key_id = "env-" + hashlib.sha256(raw).hexdigest()[:8]
                keys.append((key_id, hashlib.sha256(b"blog-page-token\0" + raw).digest()))
        return keys

    def encode(self, kind: str, binding: str, position: Sequence[Any]) -> str:
        body = json.dumps(
            {"k": self._signing_id, "t": kind, "b": binding, "p": [_dump(v) for v in position]},
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._signing_key, body, hashlib.sha256).digest()[:_MAC_BYTES]
        return _b64(body) + "." + _b64(mac)

    async def decode(self, token: str, *, kind: str, binding: str, field: str) -> list[Any]:
        """The position in a token; INVALID_ARGUMENT on `field` if forged or bound elsewhere."""
        try:
            body_part, mac_part = token.split(".")
            body = _unb64(body_part)
            mac = _unb64(mac_part)
            payload = json.loads(body)
            key_id = payload["k"]
            if not isinstance(key_id, str):
                raise TokenError
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidArgument.field(field, "the token is malformed") from error
        key = self._keys.get(key_id)
        if key is None and self._reload is not None:
            # Another process may have rotated in a key this one has not seen yet.
            self._keys.update(await self._reload())
            key = self._keys.get(key_id)
        expected = hmac.new(key or b"", body, hashlib.sha256).digest()[:_MAC_BYTES]
        if key is None or not hmac.compare_digest(expected, mac):
            raise InvalidArgument.field(field, "the token is not valid")
        if payload.get("t") != kind or payload.get("b") != binding:
            raise InvalidArgument.field(
                field, "the token was issued for a request with other parameters"
            )
        position = payload.get("p")
        if not isinstance(position, list):
            raise InvalidArgument.field(field, "the token is malformed")
        try:
            return [_load(v) for v in position]
        except (ValueError, TypeError, KeyError) as error:
            raise InvalidArgument.field(field, "the token is malformed") from error


def binding_of(*parts: object) -> str:
    """A short digest of the request parameters a token is bound to."""
    text = json.dumps([str(p) for p in parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dump(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"ts": value.isoformat()}
    if isinstance(value, int | str):
        return value
    raise TypeError(f"cannot put {type(value).__name__} in a token")


def _load(value: Any) -> Any:
    if isinstance(value, dict):
        return datetime.fromisoformat(value["ts"])
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError("bad position value")
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
