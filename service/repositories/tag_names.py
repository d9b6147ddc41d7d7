"""Tag names by id, cached per process and database, so post reads carry tag ids only.

A post read on PostgreSQL gathers each post's tag ids (an index-only scan of
post_tags per row) instead of joining and sorting tag names per row: for a page of
50 that halved PostgreSQL's CPU (docs/BENCHMARKS.md). The ids become names here.

Correct without invalidation because a tag, once made, never changes: the service
has no rename and no delete of tags (post_tags refers to them ON DELETE RESTRICT),
and ids come from a sequence, never reused. An id not cached yet (a tag made since,
by this process or another) is read with the others missing, in one statement.
The cache is keyed by the connection pool, so two databases (tests, a replica
beside its primary) never share one, and it is bounded: past MAX_CACHED names it
starts over. Someone who renames tags by hand in the database restarts the service.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from sqlalchemy import BigInteger, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import tags_table
from service.repositories.dialect import one_of

MAX_CACHED = 100_000

_T = tags_table.c
_caches: weakref.WeakKeyDictionary[object, dict[int, str]] = weakref.WeakKeyDictionary()


async def tag_names(session: AsyncSession, id_lists: Sequence[Sequence[int]]) -> list[list[str]]:
    """The sorted tag names of each list of tag ids."""
    bind = session.bind
    assert bind is not None
    pool = bind.sync_engine.pool
    names = _caches.get(pool)
    if names is None:
        names = _caches[pool] = {}
    missing = {tag_id for ids in id_lists for tag_id in ids if tag_id not in names}
    if missing:
        if len(names) + len(missing) > MAX_CACHED:
            names.clear()
        found = await session.execute(
            select(_T.id, _T.name).where(one_of(session, _T.id, list(missing), BigInteger))
        )
        names.update({tag_id: name for tag_id, name in found})
    return [sorted([names[tag_id] for tag_id in ids]) if ids else [] for ids in id_lists]
