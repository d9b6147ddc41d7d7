"""Storage of the HMAC keys that sign page and resume tokens."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import TokenKey
from service.db.types import utcnow
from service.repositories.dialect import insert_ignore

DEFAULT_KEY_ID = "db1"


class TokenKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def ensure_default(self) -> None:
        """Create the database's first key once; concurrent starters keep the first one."""
        stmt = insert_ignore(self._session, TokenKey).values(
            id=DEFAULT_KEY_ID, secret=secrets.token_bytes(32), create_time=utcnow()
        )
        await self._session.execute(stmt)

    async def all(self) -> list[tuple[str, bytes]]:
        """Every key, newest first (the newest signs; all verify)."""
        rows = await self._session.execute(
            select(TokenKey.id, TokenKey.secret).order_by(
                TokenKey.create_time.desc(), TokenKey.id.desc()
            )
        )
        return [(row.id, row.secret) for row in rows]
