"""Posts and tags: SQL for the post aggregate (tag links, keyset reads, guarded writes)."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Row,
    String,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    null,
    select,
    true,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import NullType

from service.db.models import (
    post_tags_table,
    posts_table,
    tags_table,
    users_table,
)
from service.db.types import TagList, utcnow
from service.errors import EtagMismatch, NotFound, author_not_live
from service.filtering import FieldKind, FilterField, substring_has
from service.repositories.dialect import byte_length, insert_ignore, is_postgres, one_of
from service.repositories.driver import driver_of
from service.repositories.keyset import PAGE_LIMIT, after_params, seek, seek_page
from service.repositories.query import Query, QuerySpec
from service.repositories.streaming import byte_bounded, stream_partitions
from service.repositories.tag_names import tag_names

PostRow: TypeAlias = Row[*tuple[Any, ...]]

_P = posts_table.c
_U = users_table.c
POST_COLUMNS = (_P.id, _P.author_id, _P.title, _P.body, _P.create_time, _P.update_time, _P.version)
# The author's columns, joined in for POST_VIEW_FULL (one statement, like joinedload).
AUTHOR_COLUMNS = (
    _U.username.label("author_username"),
    _U.email.label("author_email"),
    _U.display_name.label("author_display_name"),
    _U.bio.label("author_bio"),
    _U.create_time.label("author_create_time"),
    _U.update_time.label("author_update_time"),
    _U.delete_time.label("author_delete_time"),
    _U.version.label("author_version"),
)
# A post row begins with these columns in this order, and for POST_VIEW_FULL goes on with
# the author's: the servicers read them by position (api/convert.py add_post).
POST_FIELDS = tuple(column.key for column in POST_COLUMNS)
AUTHOR_FIELDS = tuple(column.key for column in AUTHOR_COLUMNS)
_ID = POST_FIELDS.index("id")
_BODY = POST_FIELDS.index("body")

# Large rows (API.md: memory per call is bounded by bytes, never by rows alone). The first
# statement of a page, and each fetch of a stream's cursor, carries a post's body only up
# to an inline limit; a longer body comes as NULL beside its length (`body_bytes`, read
# from the value's header, not the value) and is read afterwards by id, about `max_bytes`
# at a time, inside the same snapshot. Small-row pages and fetches are untouched: one
# statement, as before.
# A fetch of N rows holds about N x (inline limit + title + author) at most.
FETCH_BYTES = 4 * 1024 * 1024
MIN_INLINE_BYTES = 2048
# What a post adds to a response besides its title and body: field tags and lengths,
# ids, timestamps, etag (as convert.py's estimate) and up to 20 tags of 32 characters.
_ROW_BYTES = 96 + 20 * 34


_INLINE_LIMIT = bindparam("inline_limit", type_=Integer)


def inline_limit(rows: int) -> int:
    """The longest body a fetch of `rows` rows carries inline."""
    return max(MIN_INLINE_BYTES, FETCH_BYTES // max(rows, 1))


def _utf8_length(text: str | None) -> int:
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode())


def estimated_bytes(row: Any, *, full: bool) -> int:
    """About how many bytes a post adds to a response (an overestimate), from the
    length of its body, withheld or not."""
    size: int = _ROW_BYTES + row.body_bytes + _utf8_length(row.title)
    if full:
        size += (
            _ROW_BYTES
            + _utf8_length(row.author_username)
            + _utf8_length(row.author_email)
            + _utf8_length(row.author_display_name)
            + _utf8_length(row.author_bio)
        )
    return size


def _withheld(row: Any) -> bool:
    return row[_BODY] is None


class WithBody:
    """A row whose withheld body was read afterwards: the row's columns, by name and by
    position, with the body in its place."""

    __slots__ = ("_row", "_values", "body")

    def __init__(self, row: Any, body: str) -> None:
        self._row = row
        self.body = body
        values = list(row)
        values[_BODY] = body
        self._values = tuple(values)

    def __getitem__(self, index: Any) -> Any:
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)


@dataclass(frozen=True, slots=True)
class PostPage:
    """A page of posts, `more` when rows remain after it. `needs_snapshot`: the page has
    bodies too large to come inline, which are read by id afterwards; that needs one
    snapshot for the page (a `snapshot` unit of work), which an autocommit read is not."""

    rows: list[PostRow]
    more: bool
    needs_snapshot: bool = False
    tags: list[list[str]] = field(default_factory=list)  # each row's sorted tag names


# tags_of at driver level (PostgreSQL): each post's sorted names in one array, a row a
# post (the driver decodes the arrays; a row per tag cost a stream a tenth of its time).
_TAGS_OF = (
    "SELECT pt.post_id, array_agg(t.name ORDER BY t.name) FROM post_tags pt"
    " JOIN tags t ON t.id = pt.tag_id WHERE pt.post_id = ANY($1::bigint[]) GROUP BY pt.post_id"
)


def has_tag(value: Any) -> ColumnElement[bool]:
    """`tags:"go"`: posts linked to the tag (an EXISTS-style IN over post_tags)."""
    name = str(value).lower()
    links = post_tags_table.c
    tags = tags_table.c
    return _P.id.in_(
        select(links.post_id).join(tags_table, tags.id == links.tag_id).where(tags.name == name)
    )


# What ListPosts and StreamPosts may filter and order by (API.md), and the default order.
POST_QUERY = QuerySpec(
    "posts",
    filterable={
        "id": FilterField(FieldKind.INT, _P.id),
        "author_id": FilterField(FieldKind.INT, _P.author_id),
        "title": FilterField(FieldKind.STRING, _P.title, substring_has(_P.title)),
        "create_time": FilterField(FieldKind.TIMESTAMP, _P.create_time),
        "update_time": FilterField(FieldKind.TIMESTAMP, _P.update_time),
        "tags": FilterField(FieldKind.STRING, None, has_tag),
    },
    orderable={"id": _P.id, "create_time": _P.create_time, "title": _P.title},
    default_order="create_time desc",
)


def _tags_column(*, postgres: bool) -> Any:
    """Each post's tags in its own row (a correlated subquery), so a page or a single
    post is one statement: an autocommit read with no transaction to open. On
    PostgreSQL, the tag ids (an index-only scan of post_tags a row; tag_names.py makes
    them names from a per-process cache): joining and sorting the names a row cost the
    database ~25 µs a row, more than the rest of a page. Streams load tags per batch
    instead (`tags_of`)."""
    links = post_tags_table.c
    if postgres:
        ids = select(links.tag_id).where(links.post_id == _P.id).scalar_subquery()
        # NullType: the driver's list of ints as it is (ARRAY's processing copies it).
        return type_coerce(func.array(ids), NullType()).label("tags")
    tags = tags_table.c
    names = select(func.group_concat(tags.name, ","))
    names = names.join_from(tags_table, post_tags_table, links.tag_id == tags.id)
    column = names.where(links.post_id == _P.id).scalar_subquery()
    return type_coerce(column, TagList()).label("tags")


@functools.cache
def _base(
    full: bool, *, tags_on_postgres: bool | None = None, inline_on_postgres: bool | None = None
) -> Any:
    """The post columns (with the author's for FULL); with a tags column in the given
    dialect's spelling unless `tags_on_postgres` is None; unless `inline_on_postgres` is
    None, a body longer than the `inline_limit` parameter comes as NULL, with its length
    in `body_bytes` (both in that dialect's spelling). Built once per variant: a select
    is immutable, and building one costs more than running a small page's query."""
    columns: list[Any] = [*POST_COLUMNS, *AUTHOR_COLUMNS] if full else list(POST_COLUMNS)
    if inline_on_postgres is not None:
        size = byte_length(_P.body, postgres=inline_on_postgres)
        columns[3] = case((size <= _INLINE_LIMIT, _P.body), else_=null()).label("body")
        columns.append(size.label("body_bytes"))
    if tags_on_postgres is not None:
        columns.append(_tags_column(postgres=tags_on_postgres))
    stmt = select(*columns)
    return stmt.join(users_table, _U.id == _P.author_id) if full else stmt


# Page statements without a filter, by (view, dialect, order, whether after a position):
# a handful, built once (a filtered page builds its own, its filter holding values).
_PAGES: dict[tuple[bool, bool, str, bool], Any] = {}


def _page_select(full: bool, postgres: bool, query: Query) -> Any:
    """A ListPosts page's statement (`seek_page`'s parameters, and `inline_limit`)."""
    seeking = query.after is not None
    key = (full, postgres, query.ordering.canonical, seeking)
    if query.where is None and key in _PAGES:
        return _PAGES[key]
    stmt = _base(full, tags_on_postgres=postgres, inline_on_postgres=postgres)
    if query.where is not None:
        stmt = stmt.where(query.where)
    stmt = seek_page(stmt, query.ordering, seeking=seeking)
    if query.where is None:
        _PAGES[key] = stmt
    return stmt


def _create_statement() -> Any:
    """CreatePost's insert, built once: the post's values selected from its author's live
    row (share-locked on PostgreSQL; SQLite ignores FOR SHARE), bound at execution."""
    now = bindparam("now", type_=_P.create_time.type)
    author = (
        select(
            _U.id,
            bindparam("title", type_=_P.title.type),
            bindparam("body", type_=_P.body.type),
            now,
            now,
            literal(1, BigInteger),
        )
        .where(_U.id == bindparam("author_id", type_=_U.id.type), _U.delete_time.is_(None))
        .with_for_update(read=True)
    )
    columns = ["author_id", "title", "body", "create_time", "update_time", "version"]
    return insert(posts_table).from_select(columns, author).returning(*POST_COLUMNS)


_CREATE = _create_statement()


def _linking(post: Any | None) -> Any:
    """A post's tags linked (PostgreSQL), as a CTE with a row per link: the names bound
    as `names`, the missing tags created (ON CONFLICT DO NOTHING: a concurrent creator
    wins), the existing ones found, and a link to each from the post bound as
    `post_id`, or from the row that `post` (an inserting CTE) returns. The caller
    compares the links with the names: a tag another transaction committed while this
    waited on its insert is invisible to this statement's snapshot, so it is neither
    created nor found (`_link_rest` links it)."""
    tags = tags_table.c
    wanted = (
        select(func.unnest(bindparam("names", type_=ARRAY(String))).label("name"))
        .distinct()
        .cte("wanted")
    )
    created = (
        pg_insert(tags_table)
        .from_select(["name"], select(wanted.c.name))
        .on_conflict_do_nothing()
        .returning(tags.id)
        .cte("created")
    )
    found = union_all(
        select(created.c.id), select(tags.id).join(wanted, wanted.c.name == tags.name)
    ).cte("found")
    if post is None:
        links = select(bindparam("post_id", type_=BigInteger), found.c.id)
    else:
        links = select(post.c.id, found.c.id).select_from(post.join(found, true()))
    return (
        insert(post_tags_table)
        .from_select(["post_id", "tag_id"], links)
        .returning(post_tags_table.c.tag_id)
        .cte("linked")
    )


def _links_statement() -> Any:
    """Tags linked to an existing post in one statement, returning how many links."""
    return select(func.count()).select_from(_linking(None))


def _create_tagged_statement() -> Any:
    """CreatePost with tags in one statement (PostgreSQL): `_CREATE` as a CTE, its tags
    linked to what it inserted, and the post's row with a last column, `linked`, the
    links made. No row: no live author (and nothing linked)."""
    post = _CREATE.cte("post")
    linked = select(func.count()).select_from(_linking(post)).scalar_subquery()
    return select(post, linked.label("linked"))


_LINK_TAGS = _links_statement()
_CREATE_TAGGED = _create_tagged_statement()


class PostRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    # -- writes -----------------------------------------------------------------------

    async def create(
        self, *, author_id: int, title: str, body: str, tags: Sequence[str]
    ) -> PostRow:
        """A post by a live author (else AUTHOR_NOT_LIVE), who stays live until commit:
        one `INSERT ... SELECT` from the author's row, share-locked on PostgreSQL so a
        concurrent DeleteUser cannot slip in before the commit (SQLite: BEGIN IMMEDIATE
        serialises the writers already); no row inserted means no live author."""
        params = {"author_id": author_id, "title": title, "body": body, "now": utcnow()}
        # PostgreSQL: the post and its tag links in one statement, a round trip fewer.
        together = bool(tags) and is_postgres(self._session)
        if together:
            params["names"] = list(tags)
        row = (await self._session.execute(_CREATE_TAGGED if together else _CREATE, params)).first()
        if row is None:
            raise author_not_live(author_id)
        if not together:
            await self._link_tags(row.id, names=tags)
        elif row.linked != len(set(tags)):
            await self._link_rest(row.id, names=tags)
        return row

    async def update(
        self,
        post_id: int,
        *,
        values: Mapping[str, Any],
        tags: Sequence[str] | None,
        expected_version: int | None,
    ) -> PostRow:
        stmt = (
            update(posts_table)
            .where(_P.id == post_id)
            .values(**values, update_time=utcnow(), version=_P.version + 1)
            .returning(*POST_COLUMNS)
        )
        if expected_version is not None:
            stmt = stmt.where(_P.version == expected_version)
        row = (await self._session.execute(stmt)).first()
        if row is None:
            await self._why_unmatched(post_id)
            raise AssertionError("unreachable")
        if tags is not None:
            # Replacement is atomic: it happens in the caller's one transaction.
            await self._session.execute(
                delete(post_tags_table).where(post_tags_table.c.post_id == post_id)
            )
            await self._link_tags(post_id, names=tags)
        return row

    async def delete(self, post_id: int, *, expected_version: int | None) -> None:
        """Hard delete; the tag links go with it (ON DELETE CASCADE)."""
        stmt = delete(posts_table).where(_P.id == post_id).returning(_P.id)
        if expected_version is not None:
            stmt = stmt.where(_P.version == expected_version)
        if (await self._session.execute(stmt)).first() is None:
            await self._why_unmatched(post_id)

    async def _why_unmatched(self, post_id: int) -> None:
        current = (await self._session.execute(select(_P.version).where(_P.id == post_id))).first()
        if current is None:
            raise NotFound("Post", post_id)
        raise EtagMismatch("post")

    async def _link_tags(self, post_id: int, *, names: Sequence[str]) -> None:
        if not names:
            return
        if is_postgres(self._session):
            params = {"post_id": post_id, "names": list(names)}
            linked = (await self._session.execute(_LINK_TAGS, params)).scalar_one()
            if linked == len(set(names)):
                return
        await self._link_rest(post_id, names=names)

    async def _link_rest(self, post_id: int, *, names: Sequence[str]) -> None:
        """Link the post to each of `names` not linked yet, creating the missing tags, in
        two statements that each take a new snapshot (READ COMMITTED): the way on SQLite,
        which has no INSERT in a WITH, and on PostgreSQL the rare second pass after a tag
        another transaction created after `_linking`'s snapshot was taken (ON CONFLICT
        skipped it and the snapshot could not see it)."""
        await self._session.execute(
            insert_ignore(self._session, tags_table), [{"name": name} for name in names]
        )
        tags = tags_table.c
        await self._session.execute(
            insert_ignore(self._session, post_tags_table).from_select(
                ["post_id", "tag_id"],
                select(literal(post_id, BigInteger), tags.id).where(tags.name.in_(names)),
            )
        )

    # -- reads ------------------------------------------------------------------------

    @staticmethod
    def _select(
        *,
        full: bool,
        where: ColumnElement[bool] | None,
        tags_on_postgres: bool | None = None,
        inline_on_postgres: bool | None = None,
    ) -> Any:
        stmt = _base(full, tags_on_postgres=tags_on_postgres, inline_on_postgres=inline_on_postgres)
        return stmt if where is None else stmt.where(where)

    async def get(self, post_id: int, *, full: bool) -> tuple[PostRow, list[str]]:
        """The post and its sorted tag names, in one statement (two the first time a
        process meets one of its tags)."""
        postgres = is_postgres(self._session)
        stmt = _base(full, tags_on_postgres=postgres).where(_P.id == post_id)
        row = (await self._session.execute(stmt)).first()
        if row is None:
            raise NotFound("Post", post_id)
        return row, (await self._tag_names([row], postgres))[0]

    async def _tag_names(self, rows: Sequence[PostRow], postgres: bool) -> list[list[str]]:
        """Each row's sorted tag names, from its `tags` column: ids on PostgreSQL, names
        on SQLite."""
        if postgres:
            return await tag_names(self._session, [row.tags for row in rows])
        return [row.tags for row in rows]

    async def list_page(
        self, *, query: Query, full: bool, limit: int, max_bytes: int, snapshot: bool = False
    ) -> PostPage:
        """Up to `limit` posts with their tags (`page.tags`) and no more than `max_bytes`
        (estimated_bytes), in one statement unless bodies are too large to come inline:
        then, in a `snapshot` unit of work, they are read by id about `max_bytes`/4 at a
        time; in any other, the page says it `needs_snapshot` and holds no rows."""
        inline = inline_limit(limit)
        postgres = is_postgres(self._session)
        stmt = _page_select(full, postgres, query)
        params = {"inline_limit": inline, PAGE_LIMIT: limit + 1, **after_params(query.after)}
        rows = list((await self._session.execute(stmt, params)).all())
        if not rows:
            return PostPage(rows, more=False)
        sizes = [row.body_bytes for row in rows]
        # The common page: every body inline, and far below the cap whatever the rest is.
        bound = sum(sizes) + len(rows) * (2 * _ROW_BYTES + 800 + (9000 if full else 0))
        if max(sizes) <= inline and bound <= max_bytes:
            return await self._tagged(rows[:limit], more=len(rows) > limit, postgres=postgres)
        kept: list[PostRow] = []
        total = 0
        for row in rows[:limit]:
            size = estimated_bytes(row, full=full)
            if kept and total + size > max_bytes:
                break
            kept.append(row)
            total += size
        more = len(kept) < len(rows)
        if not any(map(_withheld, kept)):
            return await self._tagged(kept, more=more, postgres=postgres)
        if not snapshot:
            return PostPage([], more=more, needs_snapshot=True)
        kept = await self._with_bodies(kept, chunk_bytes=max_bytes // 4)
        return await self._tagged(kept, more=more, postgres=postgres)

    async def _tagged(self, rows: list[PostRow], *, more: bool, postgres: bool) -> PostPage:
        return PostPage(rows, more=more, tags=await self._tag_names(rows, postgres))

    def stream(
        self, *, query: Query, full: bool, batch_size: int, max_bytes: int
    ) -> AsyncGenerator[Sequence[PostRow]]:
        """Batches of rows from a server-side cursor, without tags (`tags_of` loads them
        per batch); close it with contextlib.aclosing. A fetch of `batch_size` rows carries
        bodies up to `inline_limit(batch_size)` bytes; a fetch with longer ones is cut into
        batches of about `max_bytes`, whose bodies are read by id just before each goes
        out, so a stream holds about one such batch of large bodies at a time."""
        stmt = self._select(
            full=full, where=query.where, inline_on_postgres=is_postgres(self._session)
        )
        stmt = seek(stmt, query.ordering, query.after)
        return byte_bounded(
            stream_partitions(
                self._session,
                stmt,
                batch_size=batch_size,
                params={"inline_limit": inline_limit(batch_size)},
            ),
            max_bytes=max_bytes,
            size_of=lambda row: estimated_bytes(row, full=full),
            incomplete=_withheld,
            complete=lambda rows: self._with_bodies(rows, chunk_bytes=max_bytes),
        )

    async def _with_bodies(self, rows: Sequence[PostRow], *, chunk_bytes: int) -> list[PostRow]:
        """The rows, those whose body was withheld completed with it (read by id, about
        `chunk_bytes` per statement). Only inside the snapshot that read the rows."""
        completed: list[Any] = list(rows)
        pending = [i for i, row in enumerate(rows) if row.body is None]
        while pending:
            chunk: list[int] = []
            total = 0
            while pending and (not chunk or total + rows[pending[0]].body_bytes <= chunk_bytes):
                total += rows[pending[0]].body_bytes
                chunk.append(pending.pop(0))
            found = await self._session.execute(
                select(_P.id, _P.body).where(
                    one_of(self._session, _P.id, [rows[i].id for i in chunk], BigInteger)
                )
            )
            bodies: dict[int, str] = {post_id: body for post_id, body in found}
            for i in chunk:
                completed[i] = WithBody(rows[i], bodies[rows[i].id])
        return completed

    async def batch_tags(self, rows: Sequence[PostRow]) -> list[Sequence[str]]:
        """Each row's sorted tag names, in the rows' order (a stream batch's: one query)."""
        ids = [row[_ID] for row in rows]
        tags = await self.tags_of(ids)
        none: tuple[str, ...] = ()
        return [tags.get(post_id, none) for post_id in ids]

    async def tags_of(self, post_ids: Sequence[int]) -> dict[int, list[str]]:
        """Sorted tag names of each post, for a whole page or batch in one query."""
        tags: dict[int, list[str]] = defaultdict(list)
        if not post_ids:
            return tags
        driver = await driver_of(self._session)
        if driver is not None:  # once per page or stream batch: skip SQLAlchemy's row work
            return dict(await driver.fetch(_TAGS_OF, post_ids))
        links = post_tags_table.c
        names = tags_table.c
        rows = await self._session.execute(
            select(links.post_id, names.name)
            .join(tags_table, names.id == links.tag_id)
            .where(one_of(self._session, links.post_id, post_ids, BigInteger))
            .order_by(links.post_id, names.name)
        )
        for post_id, name in rows:
            tags[post_id].append(name)
        return tags
