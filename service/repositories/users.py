"""Users: SQL for the user aggregate (soft delete, optimistic versions, keyset reads)."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeAlias

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Row,
    String,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import posts_table, users_table
from service.db.types import utcnow
from service.errors import AlreadyExists, EtagMismatch, FailedPrecondition, NotFound
from service.filtering import FieldKind, FilterField, substring_has
from service.repositories.dialect import is_postgres, one_of
from service.repositories.driver import RecordRow, driver_of
from service.repositories.keyset import seek
from service.repositories.query import Query, QuerySpec
from service.repositories.streaming import stream_partitions

_U = users_table.c
USER_COLUMNS = (
    _U.id,
    _U.username,
    _U.email,
    _U.display_name,
    _U.bio,
    _U.create_time,
    _U.update_time,
    _U.delete_time,
    _U.version,
)

# What ListUsers and StreamUsers may filter and order by (API.md), and the default order.
USER_QUERY = QuerySpec(
    "users",
    filterable={
        "id": FilterField(FieldKind.INT, _U.id),
        "username": FilterField(FieldKind.STRING, _U.username),
        "email": FilterField(FieldKind.STRING, _U.email),
        "display_name": FilterField(
            FieldKind.STRING, _U.display_name, substring_has(_U.display_name)
        ),
        "create_time": FilterField(FieldKind.TIMESTAMP, _U.create_time),
        "update_time": FilterField(FieldKind.TIMESTAMP, _U.update_time),
    },
    orderable={"id": _U.id, "username": _U.username, "create_time": _U.create_time},
    default_order="id",
)

UserRow: TypeAlias = "Row[*tuple[Any, ...]] | RecordRow | NewUser"
# GetUser's statement at driver level (PostgreSQL); the same columns as USER_COLUMNS.
_GET_BY_ID = (
    "SELECT id, username, email, display_name, bio, create_time, update_time, delete_time,"
    " version FROM users WHERE id = $1"
)


def normalize_email(email: str) -> str:
    return email.lower()


def _create_many_statement() -> Any:
    """BatchCreateUsers' statement on PostgreSQL, built once; the batch's columns are
    bound at execution as five arrays (`usernames`, `emails`, `normalized`, `names`,
    `bios`) and `now`."""
    text_array = ARRAY(String)
    source = func.unnest(
        bindparam("usernames", type_=text_array),
        bindparam("emails", type_=text_array),
        bindparam("normalized", type_=text_array),
        bindparam("names", type_=text_array),
        bindparam("bios", type_=text_array),
    ).table_valued(
        "username", "email", "email_normalized", "display_name", "bio", with_ordinality="ord"
    )
    source = source.render_derived(name="source")
    # Ids are drawn in the request's order (a volatile nextval keeps the subquery
    # apart, evaluated as unnest yields), but rows go in in username order: two
    # batches sharing usernames then take their index entries in one order and queue
    # instead of deadlocking. Emails can still cross; Store.run retries that deadlock.
    # The sequence is looked up once (an uncorrelated subquery: an InitPlan); as
    # nextval's direct argument the lookup ran per row, a fifth of the statement's time.
    sequence = select(func.pg_get_serial_sequence("users", "id")).scalar_subquery()
    numbered = (
        select(
            func.nextval(sequence).label("id"),
            source.c.username,
            source.c.email,
            source.c.email_normalized,
            source.c.display_name,
            source.c.bio,
        )
        .order_by(source.c.ord)
        .subquery("numbered")
    )
    stamp = bindparam("now", type_=_U.create_time.type)
    return (
        insert(users_table)
        .from_select(
            [
                "id",
                "username",
                "email",
                "email_normalized",
                "display_name",
                "bio",
                "create_time",
                "update_time",
                "version",
            ],
            select(
                numbered.c.id,
                numbered.c.username,
                numbered.c.email,
                numbered.c.email_normalized,
                numbered.c.display_name,
                numbered.c.bio,
                stamp,
                stamp,
                literal(1, BigInteger),
            ).order_by(numbered.c.username),
        )
        .returning(_U.username, _U.id)
    )


_CREATE_MANY = _create_many_statement()


class NewUser(NamedTuple):
    """A row as inserted, for callers that need no more than what they sent and its id."""

    id: int
    username: str
    email: str
    display_name: str
    bio: str
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None
    version: int


@functools.cache
def _update_statement(columns: tuple[str, ...], live: bool, guarded: bool) -> Any:
    """A version-guarded `UPDATE ... RETURNING` of these columns, built once per shape:
    the values are bound at execution (`set_<column>`, `user_id`, `now`,
    `expected_version`), so SQLAlchemy finds its compiled form without walking a new
    statement (a fifth of an UpdateUser call's CPU when it was built per call)."""
    stmt = (
        update(users_table)
        .where(_U.id == bindparam("user_id", type_=_U.id.type))
        .where(_U.delete_time.is_(None) if live else _U.delete_time.is_not(None))
        .values(
            {
                **{name: bindparam(f"set_{name}", type_=_U[name].type) for name in columns},
                "update_time": bindparam("now", type_=_U.update_time.type),
                "version": _U.version + 1,
            }
        )
        .returning(*USER_COLUMNS)
    )
    if guarded:
        stmt = stmt.where(_U.version == bindparam("expected_version", type_=_U.version.type))
    return stmt


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def create(self, values: Mapping[str, Any]) -> UserRow:
        return (await self.create_many([values]))[0]

    async def create_many(self, entries: Sequence[Mapping[str, Any]]) -> list[UserRow]:
        """Insert all rows in one statement; rows come back in the entries' order."""
        now = utcnow()
        if len(entries) > 1 and is_postgres(self._session):
            return await self._create_many_unnest(entries, now=now)
        params = [
            {
                "username": e["username"],
                "email": e["email"],
                "email_normalized": normalize_email(e["email"]),
                "display_name": e.get("display_name", ""),
                "bio": e.get("bio", ""),
                "create_time": now,
                "update_time": now,
                "version": 1,
            }
            for e in entries
        ]
        stmt = insert(users_table).returning(*USER_COLUMNS, sort_by_parameter_order=True)
        result = await self._session.execute(stmt, params)
        return list(result.all())

    async def _create_many_unnest(
        self, entries: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> list[UserRow]:
        """PostgreSQL: INSERT ... SELECT FROM unnest(arrays) RETURNING: five array
        parameters instead of eight per row, one round trip for the whole batch."""
        params = {
            "usernames": [e["username"] for e in entries],
            "emails": [e["email"] for e in entries],
            "normalized": [normalize_email(e["email"]) for e in entries],
            "names": [e.get("display_name", "") for e in entries],
            "bios": [e.get("bio", "") for e in entries],
            "now": now,
        }
        # Only the ids come back (everything else is what was sent); RETURNING order is
        # not promised, and usernames are unique within a batch.
        ids = dict((await self._session.execute(_CREATE_MANY, params)).all())
        return [
            NewUser(
                ids[e["username"]],
                e["username"],
                e["email"],
                e.get("display_name", ""),
                e.get("bio", ""),
                now,
                now,
                None,
                1,
            )
            for e in entries
        ]

    async def first_clash(
        self, entries: Sequence[Mapping[str, Any]], *, exclude_id: int | None = None
    ) -> tuple[int, str] | None:
        """The first entry whose username or email a live user holds, and the reason:
        USERNAME_TAKEN before EMAIL_TAKEN when an entry clashes on both (API.md). The one
        place that rule lives; asked after the unique indexes refused a write, since the
        database names whichever index it checked first. `exclude_id`: the user being
        updated, whose own username is no clash."""
        names, emails = await self._live_clashes(
            usernames=[e["username"] for e in entries],
            emails=[e["email"] for e in entries],
            exclude_id=exclude_id,
        )
        for index, entry in enumerate(entries):
            if entry["username"] in names:
                return index, "USERNAME_TAKEN"
            if normalize_email(entry["email"]) in emails:
                return index, "EMAIL_TAKEN"
        return None

    async def _live_clashes(
        self, *, usernames: Sequence[str], emails: Sequence[str], exclude_id: int | None
    ) -> tuple[set[str], set[str]]:
        """Which of these usernames and (normalised) emails live users already hold."""
        normalized = [normalize_email(e) for e in emails]
        stmt = select(_U.username, _U.email_normalized).where(
            _U.delete_time.is_(None),
            one_of(self._session, _U.username, usernames, String)
            | one_of(self._session, _U.email_normalized, normalized, String),
        )
        if exclude_id is not None:
            stmt = stmt.where(_U.id != exclude_id)
        rows = await self._session.execute(stmt)
        taken_names: set[str] = set()
        taken_emails: set[str] = set()
        names, mails = set(usernames), set(normalized)
        for row in rows:
            if row.username in names:
                taken_names.add(row.username)
            if row.email_normalized in mails:
                taken_emails.add(row.email_normalized)
        return taken_names, taken_emails

    async def get(self, user_id: int) -> UserRow | None:
        driver = await driver_of(self._session)
        if driver is not None:  # the hottest read: skip SQLAlchemy's per-statement work
            record = await driver.fetchrow(_GET_BY_ID, user_id)
            return None if record is None else RecordRow(record)
        result = await self._session.execute(select(*USER_COLUMNS).where(_U.id == user_id))
        return result.first()

    async def require(self, user_id: int) -> UserRow:
        row = await self.get(user_id)
        if row is None:
            raise NotFound("User", user_id)
        return row

    @staticmethod
    def _select(*, where: ColumnElement[bool] | None, show_deleted: bool) -> Any:
        stmt = select(*USER_COLUMNS)
        if not show_deleted:
            stmt = stmt.where(_U.delete_time.is_(None))
        return stmt if where is None else stmt.where(where)

    async def list_page(self, *, query: Query, show_deleted: bool, limit: int) -> list[UserRow]:
        stmt = self._select(where=query.where, show_deleted=show_deleted)
        result = await self._session.execute(seek(stmt, query.ordering, query.after).limit(limit))
        return list(result.all())

    def stream(
        self, *, query: Query, show_deleted: bool, batch_size: int
    ) -> AsyncGenerator[Sequence[UserRow]]:
        """Batches of rows from a server-side cursor; close it with contextlib.aclosing."""
        stmt = seek(
            self._select(where=query.where, show_deleted=show_deleted), query.ordering, query.after
        )
        return stream_partitions(self._session, stmt, batch_size=batch_size)

    async def purge_deleted(self, deleted_before: datetime, *, limit: int) -> tuple[int, int]:
        """One batch of the hard purge of users soft-deleted before the cut-off: up to
        `limit` of their posts (tag links cascade), then, once those users have no posts
        left, up to `limit` users. Returns (users, posts) deleted; (0, 0) when none is
        due. Callers loop, one short transaction per batch. A user with more than `limit`
        posts loses them over several batches, the user row last."""
        posts = posts_table.c
        due = (
            (
                await self._session.execute(
                    select(_U.id)
                    .where(_U.delete_time < deleted_before)
                    .order_by(_U.id)
                    .limit(limit)
                )
            )
            .scalars()
            .all()
        )
        if not due:
            return 0, 0
        theirs = select(posts.id).where(posts.author_id.in_(due)).limit(limit)
        deleted = await self._session.execute(delete(posts_table).where(posts.id.in_(theirs)))
        post_count = int(getattr(deleted, "rowcount", 0) or 0)
        if post_count >= limit:
            return 0, post_count  # maybe more posts of theirs: the users go in a later batch
        # The cut-off again: a user undeleted meanwhile stays.
        gone = await self._session.execute(
            delete(users_table).where(_U.id.in_(due), _U.delete_time < deleted_before)
        )
        return int(getattr(gone, "rowcount", 0) or 0), post_count

    async def post_counts(self, user_ids: Sequence[int]) -> dict[int, int]:
        """Posts per user for a whole page or batch, in one aggregate query."""
        posts = posts_table.c
        if not user_ids:
            return {}
        rows = await self._session.execute(
            select(posts.author_id, func.count())
            .where(one_of(self._session, posts.author_id, user_ids, BigInteger))
            .group_by(posts.author_id)
        )
        return {key: value for key, value in rows}

    async def update(
        self, user_id: int, *, values: Mapping[str, Any], expected_version: int | None
    ) -> UserRow:
        """Update a live user, guarded by its version when one is expected."""
        changes = dict(values)
        if "email" in changes:
            changes["email_normalized"] = normalize_email(changes["email"])
        return await self._guarded_update(
            user_id, changes=changes, expected_version=expected_version, live=True
        )

    async def soft_delete(self, user_id: int, *, expected_version: int | None) -> UserRow:
        # Take the row first (PostgreSQL: FOR NO KEY UPDATE, which waits out a CreatePost's
        # share lock; SQLite: the write lock of BEGIN IMMEDIATE), then read the clock, so
        # no post is ever created after its author's delete_time.
        await self._session.execute(
            select(_U.id).where(_U.id == user_id).with_for_update(key_share=True)
        )
        return await self._guarded_update(
            user_id, changes={"delete_time": utcnow()}, expected_version=expected_version, live=True
        )

    async def undelete(self, user_id: int) -> UserRow:
        return await self._guarded_update(
            user_id, changes={"delete_time": None}, expected_version=None, live=False
        )

    async def _guarded_update(
        self,
        user_id: int,
        *,
        changes: Mapping[str, Any],
        expected_version: int | None,
        live: bool,
    ) -> UserRow:
        params = {f"set_{name}": value for name, value in changes.items()}
        params["user_id"] = user_id
        params["now"] = utcnow()
        if expected_version is not None:
            params["expected_version"] = expected_version
        stmt = _update_statement(tuple(sorted(changes)), live, expected_version is not None)
        row = (await self._session.execute(stmt, params)).first()
        if row is not None:
            return row
        # Nothing matched: find out why, in the same transaction. Lock the row while
        # looking (PostgreSQL; SQLite's write lock is held already): under READ COMMITTED
        # a write that committed after the UPDATE's snapshot (an undelete racing an
        # update) may have made it match since, and only a locked row stays as read.
        current = (
            await self._session.execute(
                select(*USER_COLUMNS).where(_U.id == user_id).with_for_update(key_share=True)
            )
        ).first()
        if current is None:
            raise NotFound("User", user_id)
        if live and current.delete_time is not None:
            if "delete_time" in changes:
                raise NotFound("User", user_id)  # deleting a deleted user (AIP-164)
            raise FailedPrecondition(
                "USER_DELETED", subject=f"users/{user_id}", description="the user is deleted"
            )
        if not live and current.delete_time is None:
            raise AlreadyExists("USER_NOT_DELETED", "the user is not deleted")
        if expected_version is not None and current.version != expected_version:
            raise EtagMismatch("user", current_version=current.version)
        # The row moved into a state the UPDATE accepts after it looked (a caller that
        # sent no etag must not hear ETAG_MISMATCH): locked now, so this one applies.
        row = (await self._session.execute(stmt, params)).first()
        if row is None:  # not reachable while the lock holds; never claim a false cause
            raise EtagMismatch("user", current_version=current.version)
        return row
