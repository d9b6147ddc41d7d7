"""Idempotent creates (AIP-155): the one path every create with a request_id takes, and
the records it keeps per caller, method and request_id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import IdempotencyRecord
from service.db.types import utcnow
from service.errors import InvalidArgument
from service.repositories.dialect import insert_ignore

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    caller: str
    method: str
    request_id: str


@dataclass(frozen=True, slots=True)
class PriorResult:
    request_hash: str
    resource_id: int
    response: bytes | None


def request_digest(payload: Mapping[str, Any]) -> str:
    """What an idempotent create is keyed on besides its request_id: what it would store."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def create_once(
        self,
        key: IdempotencyKey | None,
        *,
        payload: Mapping[str, Any],
        create: Callable[[], Awaitable[R]],
        encode: Callable[[R], bytes],
        decode: Callable[[bytes], R],
        resource_id_of: Callable[[R], int] | None = None,
        replay: Callable[[int], Awaitable[R]] | None = None,
    ) -> R:
        """Run `create` once per key: claim the key, create, record the response.

        Every create takes this path (CreateUser, CreatePost, BatchCreateUsers). `R` is
        the call's response, built inside the transaction; without a key it is just
        `create()`. The record keeps `encode(response)` in the same transaction as what
        was created, so a repeated key with the same `payload` gets `decode(bytes)`: the
        first response byte for byte, whatever has happened to the resource since (a
        replay never reads it). Another payload gets REQUEST_ID_REUSED.

        A record the previous release wrote (no stored response, only the id, during a
        rolling deploy) is replayed as that release did: `replay(resource_id)`.
        """
        if key is None:
            return await create()
        digest = request_digest(payload)
        prior = await self.claim(key, request_hash=digest)
        if prior is not None:
            if prior.request_hash != digest:
                raise InvalidArgument.field(
                    "request_id",
                    "was already used with a different request",
                    reason="REQUEST_ID_REUSED",
                )
            if prior.response is not None:
                return decode(prior.response)
            if replay is None or prior.resource_id <= 0:
                raise RuntimeError(f"idempotency record {key} holds no response")
            return await replay(prior.resource_id)
        response = await create()
        await self.record(
            key,
            resource_id=resource_id_of(response) if resource_id_of is not None else 0,
            response=encode(response),
        )
        return response

    async def claim(self, key: IdempotencyKey, *, request_hash: str) -> PriorResult | None:
        """Claim the key for this transaction, or return the record already made.

        The claim is an INSERT ... ON CONFLICT DO NOTHING made before the resource is
        created: on PostgreSQL a concurrent call with the same key waits on the row until
        the first commits (or rolls back, freeing the key); on SQLite BEGIN IMMEDIATE
        already serialises the two. Either way one resource is created.
        """
        claim = (
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
        lookup = select(
            IdempotencyRecord.request_hash,
            IdempotencyRecord.resource_id,
            IdempotencyRecord.response,
        ).where(
            IdempotencyRecord.caller == key.caller,
            IdempotencyRecord.method == key.method,
            IdempotencyRecord.request_id == key.request_id,
        )
        while True:
            if (await self._session.execute(claim)).first() is not None:
                return None
            row = (await self._session.execute(lookup)).first()
            if row is not None:
                return PriorResult(row.request_hash, row.resource_id, row.response)
            # Purged between the two statements (it had outlived its TTL): claim again.

    async def record(self, key: IdempotencyKey, *, resource_id: int, response: bytes) -> None:
        await self._session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.caller == key.caller,
                IdempotencyRecord.method == key.method,
                IdempotencyRecord.request_id == key.request_id,
            )
            .values(resource_id=resource_id, response=response)
        )

    async def purge(self, older_than: datetime, *, limit: int) -> int:
        """Delete up to `limit` records made before `older_than` (their stored responses
        go with them); how many went. Callers loop, one short transaction per batch."""
        record = IdempotencyRecord
        due = (
            select(record.caller, record.method, record.request_id)
            .where(record.create_time < older_than)
            .limit(limit)
        )
        result = await self._session.execute(
            delete(record).where(tuple_(record.caller, record.method, record.request_id).in_(due))
        )
        return int(getattr(result, "rowcount", 0) or 0)
