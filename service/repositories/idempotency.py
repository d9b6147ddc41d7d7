"""Idempotency records (AIP-155): the first result of a create, per caller and request_id."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import IdempotencyRecord
from service.db.types import utcnow
from service.repositories.dialect import insert_ignore


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    caller: str
    method: str
    request_id: str


@dataclass(frozen=True, slots=True)
class PriorResult:
    request_hash: str
    resource_id: int


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def claim(self, key: IdempotencyKey, request_hash: str) -> PriorResult | None:
        """Claim the key for this transaction, or return the result already recorded.

        The claim is an INSERT ... ON CONFLICT DO NOTHING made before the resource is
        created: a concurrent call with the same key waits on it until the first
        commits (or rolls back, freeing the key), so one resource is created.
        """
        stmt = (
            insert_ignore(self._session, IdempotencyRecord)
            .values(
                caller=key.caller,
                method=key.method,
                request_id=key.request_id,
                request_hash=request_hash,
                resource_id=0,
                create_time=utcnow(),
            )
            .returning(IdempotencyRecord.request_id)
        )
        if (await self._session.execute(stmt)).first() is not None:
            return None
        row = (
            await self._session.execute(
                select(IdempotencyRecord.request_hash, IdempotencyRecord.resource_id).where(
                    IdempotencyRecord.caller == key.caller,
                    IdempotencyRecord.method == key.method,
                    IdempotencyRecord.request_id == key.request_id,
                )
            )
        ).first()
        if row is None:  # purged between the two statements: treat as new next time
            return PriorResult(request_hash, 0)
        return PriorResult(row.request_hash, row.resource_id)

    async def record(self, key: IdempotencyKey, resource_id: int) -> None:
        await self._session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.caller == key.caller,
                IdempotencyRecord.method == key.method,
                IdempotencyRecord.request_id == key.request_id,
            )
            .values(resource_id=resource_id)
        )

    async def purge(self, older_than: datetime) -> int:
        result = await self._session.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.create_time < older_than)
        )
        return int(getattr(result, "rowcount", 0) or 0)
