"""Opaque, signed page and resume tokens (AIP-158).

A token carries the keyset position after the last row served and a digest of the
request parameters it is bound to, and is signed with HMAC-SHA256. It names its key,
so keys can rotate: PAGE_TOKEN_SECRET (comma-separated, first one signs) when set,
otherwise a random key created once in the database and shared by every process.

Wire form: ``<key id>.<body>.<mac>``. The key id is a short plain word (never JSON),
so a client's bytes reach no parser before they are authenticated: the key id and
both base64url parts are checked against bounded patterns, the MAC (over key id and
body) is verified, and only then is the body decoded and parsed.

A key id this process does not know makes it reload the keys from the database, at
most once every RELOAD_INTERVAL seconds whatever triggers it (concurrent triggers
share one reload), so forged key ids cost no database round trip per request, and a
reload that fails (the database is down) leaves the token INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from service.errors import InvalidArgument

log = logging.getLogger(__name__)

KeyLoader = Callable[[], Awaitable[list[tuple[str, bytes]]]]
MAX_TOKEN_CHARS = 4096
RELOAD_INTERVAL = 5.0  # seconds between two key reloads of one process, at most one
RELOAD_WAIT = 2.0  # how long a call waits for a reload before its token is refused
_MAC_BYTES = 16
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_MAC = re.compile(r"[A-Za-z0-9_-]{22}")  # 16 bytes, unpadded base64url
_BODY = re.compile(r"[A-Za-z0-9_-]+")


class TokenError(ValueError):
    pass


class TokenCodec:
    def __init__(
        self,
        keys: Sequence[tuple[str, bytes]],
        reload: KeyLoader | None = None,
        *,
        reload_interval: float = RELOAD_INTERVAL,
        reload_wait: float = RELOAD_WAIT,
    ) -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        for key_id, _ in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"token key id {key_id!r} must be 1-40 of [A-Za-z0-9_-]")
        self._keys = dict(keys)
        self._signing_id, self._signing_key = keys[0]
        self._reload = reload
        self._reload_interval = reload_interval
        self._reload_wait = reload_wait
        # The keys were just loaded: the first reload may come one interval from now.
        self._last_reload = time.monotonic()
        self._reloading: asyncio.Task[None] | None = None
        self.reloads = 0  # reloads started (for tests and figures)

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
            {"t": kind, "b": binding, "p": [_dump(v) for v in position]},
            separators=(",", ":"),
        ).encode()
        signed = f"{self._signing_id}.{_b64(body)}"
        return signed + "." + _b64(_mac(self._signing_key, signed))

    async def decode(self, token: str, *, kind: str, binding: str, field: str) -> list[Any]:
        """The position in a token; INVALID_ARGUMENT on `field` if forged or bound elsewhere.

        Authenticated before anything in it is parsed (see the module docstring)."""
        parts = token.split(".", 3) if len(token) <= MAX_TOKEN_CHARS else []
        if (
            len(parts) != 3
            or not _KEY_ID.fullmatch(parts[0])
            or not _BODY.fullmatch(parts[1])
            or not _MAC.fullmatch(parts[2])
        ):
            raise InvalidArgument.field(field, "the token is malformed")
        key_id, body_part, mac_part = parts
        key = self._keys.get(key_id)
        if key is None:
            # Another process may have rotated in a key this one has not seen yet.
            await self._refresh()
            key = self._keys.get(key_id)
        if key is None or not hmac.compare_digest(
            _mac(key, f"{key_id}.{body_part}"), _unb64(mac_part)
        ):
            raise InvalidArgument.field(field, "the token is not valid")
        # Authentic: made by a process holding the key. Parse it defensively all the same.
        try:
            payload = json.loads(_unb64(body_part))
            if not isinstance(payload, dict):
                raise TokenError("not an object")
            if payload.get("t") != kind or payload.get("b") != binding:
                raise InvalidArgument.field(
                    field, "the token was issued for a request with other parameters"
                )
            position = payload.get("p")
            if not isinstance(position, list):
                raise TokenError("no position")
            return [_load(v) for v in position]
        except InvalidArgument:
            raise
        except (ValueError, TypeError, KeyError, RecursionError) as error:
            raise InvalidArgument.field(field, "the token is malformed") from error

    async def _refresh(self) -> None:
        """Reload the keys unless that happened less than an interval ago; one reload at
        a time, shared by every call that asks meanwhile; never raises."""
        if self._reload is None:
            return
        task = self._reloading
        if task is None:
            now = time.monotonic()
            if now - self._last_reload < self._reload_interval:
                return
            self._last_reload = now
            self.reloads += 1
            task = self._reloading = asyncio.get_running_loop().create_task(
                self._reload_keys(), name="token-key-reload"
            )
        try:
            await asyncio.wait_for(asyncio.shield(task), self._reload_wait)
        except TimeoutError:
            log.warning("token key reload still running after %gs", self._reload_wait)

    async def _reload_keys(self) -> None:
        assert self._reload is not None
        try:
            self._keys.update(await self._reload())
        except Exception as error:  # the database is down: unknown keys stay unknown
            log.warning("token key reload failed: %s", type(error).__name__)
        finally:
            self._reloading = None
            # The throttle counts from the end too, so a slow reload is not followed
            # at once by the next one.
            self._last_reload = time.monotonic()


def binding_of(*parts: object) -> str:
    """A short digest of the request parameters a token is bound to."""
    text = json.dumps([str(p) for p in parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()[:_MAC_BYTES]


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
