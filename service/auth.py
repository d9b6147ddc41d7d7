"""Bearer-token authentication from AUTH_TOKENS_FILE: each line `token [caller-name]`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from service.errors import Unauthenticated

ANONYMOUS = "anonymous"


class Authenticator:
    """Maps a call's `authorization` metadata to a caller name, or refuses it."""

    def __init__(self, tokens: dict[bytes, str] | None) -> None:
        # Keyed by digest, so lookups do not compare secrets byte by byte.
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        if path is None:
            return cls(None)
        tokens: dict[bytes, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split(None, 1)
            if not parts or parts[0].startswith("#"):
                continue
            name = parts[1].strip() if len(parts) > 1 else f"token-{number}"
            tokens[_digest(parts[0])] = name
        if not tokens:
            raise ValueError(f"AUTH_TOKENS_FILE {path} has no tokens")
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        if self._tokens is None:
            return ANONYMOUS
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    digest = _digest(token.strip())
                    for known, name in self._tokens.items():
                        if hmac.compare_digest(known, digest):
                            return name
        raise Unauthenticated("missing or invalid bearer token")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
