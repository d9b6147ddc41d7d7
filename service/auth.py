"""Bearer-token authentication from AUTH_TOKENS_FILE: each line `token [caller-name]`.

The file is re-read without a restart (service/reload.py); the new tokens replace
the old ones in one assignment, so a call sees either set, never a mix."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from service.errors import Unauthenticated
from service.startup import StartupError

ANONYMOUS = "anonymous"
# The width of idempotency_records.caller (service/db/models.py): a longer name could
# not be stored, so it is refused when the file is read.
CALLER_MAX_LENGTH = 200


class TokensFileError(StartupError):
    """AUTH_TOKENS_FILE cannot be used; the message names the file and the line."""


class Authenticator:
    """Maps a call's `authorization` metadata to a caller name, or refuses it."""

    def __init__(self, tokens: dict[bytes, str] | None, path: Path | None = None) -> None:
        # Keyed by digest, so lookups do not compare secrets byte by byte.
        self._tokens = tokens
        self.path = path

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        if path is None:
            return cls(None)
        return cls(_read(path), path)

    def reload(self) -> None:
        """Read the file again; on any error keep the tokens in use (and raise)."""
        if self.path is not None:
            self._tokens = _read(self.path)

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        tokens = self._tokens  # one set for the whole lookup, whatever a reload does
        if tokens is None:
            return ANONYMOUS
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    digest = _digest(token.strip())
                    for known, name in tokens.items():
                        if hmac.compare_digest(known, digest):
                            return name
        raise Unauthenticated("missing or invalid bearer token")


def _read(path: Path) -> dict[bytes, str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise TokensFileError(f"AUTH_TOKENS_FILE {path}: cannot be read ({error})") from None
    tokens: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        name = parts[1].strip() if len(parts) > 1 else f"token-{number}"
        if len(name) > CALLER_MAX_LENGTH:
            raise TokensFileError(
                f"AUTH_TOKENS_FILE {path} line {number}: the caller name is {len(name)} "
                f"characters, at most {CALLER_MAX_LENGTH} are allowed: shorten it"
            )
        tokens[_digest(parts[0])] = name
    if not tokens:
        raise TokensFileError(f"AUTH_TOKENS_FILE {path} has no tokens: add one a line")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
