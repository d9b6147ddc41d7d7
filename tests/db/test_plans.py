"""Query plans at scale (PostgreSQL): with about 100,000 posts, the SQL the service
really sends for the hot post reads uses an index: no sequential scan of `posts`, and
no sort of the whole table. The SQL and its bound values are captured from a running
server at asyncpg's protocol (support/statements.py), then EXPLAINed twice: as the
service's first executions plan it (a custom plan for these values) and as a prepared
statement may plan it after a few runs (a generic plan)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from blog.v1 import post_pb2
from conftest import Running, _migrate, running_server, settings_for
from support.postgres import PostgresServer, raw_dsn
from support.statements import Statement, count_statements

POSTS = 100_000
AUTHORS = 1_000
TAGS = 50
START = datetime(2024, 1, 1, tzinfo=UTC)
# Posts come three to an instant (ties), instants three minutes apart, ids ascending;
# every post has two of 50 tags, and one in a hundred also has "x".
FIRST_TAG = "(SELECT min(id) FROM tags)"
# Foreign-key triggers off while seeding (the rows are consistent by construction):
# checking 300,000 references one by one is most of the seeding time otherwise.
SEED = f"""
SET session_replication_role = replica;
INSERT INTO users (username, email, email_normalized, display_name, bio,
                   create_time, update_time, version)
SELECT 'plan_' || g, 'plan_' || g || '@example.com', 'plan_' || g || '@example.com',
       'Author ' || g, '', $1::timestamptz, $1::timestamptz, 1
FROM generate_series(1, {AUTHORS}) AS g;

INSERT INTO tags (name)
SELECT CASE WHEN g < {TAGS} THEN 'tag-' || g ELSE 'x' END FROM generate_series(0, {TAGS}) AS g;

INSERT INTO posts (author_id, title, body, create_time, update_time, version)
SELECT (SELECT min(id) FROM users) + (g::bigint * 7919) % {AUTHORS},
       'Post ' || (g::bigint * 104729) % {POSTS}, repeat('body ', 20),
       t, t, 1
FROM generate_series(1, {POSTS}) AS g,
     LATERAL (SELECT $1::timestamptz + (g / 3) * interval '3 minutes' AS t) AS moment;

INSERT INTO post_tags (post_id, tag_id)
SELECT id, {FIRST_TAG} + id % {TAGS} FROM posts
UNION SELECT id, {FIRST_TAG} + (id * 31) % {TAGS} FROM posts
UNION SELECT id, {FIRST_TAG} + {TAGS} FROM posts WHERE id % 100 = 7;
SET session_replication_role = DEFAULT;
ANALYZE;
"""


@dataclass
class Planned:
    live: Running
    url: str


@pytest.fixture(scope="module")
async def planned(postgres: PostgresServer) -> AsyncIterator[Planned]:
    url = postgres.create_database(prefix="blogplans")
    try:
        await _migrate(url)
        started = time.monotonic()
        connection = await asyncpg.connect(raw_dsn(url))
        try:
            # Parameters only in single statements: run the script statement by statement.
            for statement in filter(str.strip, SEED.split(";")):
                if "$1" in statement:
                    await connection.execute(statement, START)
                else:
                    await connection.execute(statement)
        finally:
            await connection.close()
        print(f"seeded {POSTS} posts in {time.monotonic() - started:.1f}s")
        async with running_server(settings_for(url)) as live:
            yield Planned(live, url)
    finally:
        postgres.drop_database(url)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def sql_literal(value: Any) -> str:
    """A bound value as an untyped SQL literal (EXPLAIN takes no parameters before
    PostgreSQL 16): EXECUTE coerces it to the prepared statement's parameter type."""
    if isinstance(value, datetime):
        value = value.isoformat()
    elif isinstance(value, list | tuple):
        value = "{" + ",".join(str(v) for v in value) + "}"
    text = str(value).replace("'", "''")
    return f"'{text}'"


async def explain(url: str, statement: Statement) -> dict[str, dict[str, Any]]:
    """The custom plan (what the first executions of a prepared statement get) and the
    generic plan (what it may switch to after five) of a captured statement."""
    connection = await asyncpg.connect(raw_dsn(url))
    values = ", ".join(sql_literal(v) for v in statement.args)
    execute = f"EXECUTE captured({values})" if statement.args else "EXECUTE captured"
    plans = {}
    try:
        await connection.execute(f"PREPARE captured AS {statement.sql}")
        for mode in ("custom", "generic"):
            await connection.execute(f"SET plan_cache_mode = force_{mode}_plan")
            plan = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {execute}")
            plans[mode] = json.loads(plan)[0]["Plan"]
    finally:
        await connection.close()
    return plans


def outline(plan: dict[str, Any], depth: int = 0) -> str:
    """One line per node: type, relation or index, estimated rows."""
    where = plan.get("Index Name") or plan.get("Relation Name") or ""
    line = f"{'  ' * depth}{plan['Node Type']} {where} rows={plan['Plan Rows']}".rstrip()
    children = [outline(child, depth + 1) for child in plan.get("Plans", ())]
    return "\n".join([line, *children])


def check_plan(plan: dict[str, Any], what: str) -> None:
    text = outline(plan)
    print(f"{what}:\n{text}")
    for node in nodes(plan):
        assert not (node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "posts"), (
            f"{what}: sequential scan of posts\n{text}"
        )
        if node["Node Type"] in ("Sort", "Incremental Sort"):
            sorted_rows = node["Plans"][0]["Plan Rows"]
            assert sorted_rows < POSTS / 10, f"{what}: sorts {sorted_rows} rows\n{text}"


async def test_the_check_catches_a_bad_plan(planned) -> None:
    """The check itself: a query with no usable index fails it."""
    bad = Statement("execute", "SELECT id FROM posts ORDER BY body, id LIMIT $1", (10,))
    plans = await explain(planned.url, bad)
    with pytest.raises(AssertionError, match=r"sequential scan of posts|sorts"):
        check_plan(plans["custom"], "ORDER BY body")


async def captured(live: Running, call: Any, kinds: tuple[str, ...]) -> Statement:
    with count_statements(live.server.db.engine) as log:
        await call()
    found = log.find(*kinds, containing="FROM posts")
    assert len(found) == 1, log.summary()
    return found[0]


async def list_sql(live: Running, **request: Any) -> Statement:
    message = post_pb2.ListPostsRequest(**request)
    return await captured(live, lambda: live.posts.ListPosts(message), ("execute",))


async def seek_page(live: Running, page: int, page_size: int) -> str:
    """The page token of page `page` (1-based) of the default listing at `page_size`,
    reached in big pages: page size may change between pages, the position may not."""
    token = ""
    skip = (page - 1) * page_size
    while skip:
        step = min(skip, 1000)
        response = await live.posts.ListPosts(
            post_pb2.ListPostsRequest(page_size=step, page_token=token)
        )
        assert len(response.posts) == step
        token = response.next_page_token
        skip -= step
    return token


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


CASES = {
    "default page": {},
    "author_id = N": {"filter": "author_id = {author}"},
    'tags:"x"': {"filter": 'tags:"x"'},
    'tags:"tag-7"': {"filter": 'tags:"tag-7"'},
    "create_time range": {
        "filter": (
            f'create_time >= "{stamp(START + timedelta(days=30))}"'
            f' AND create_time < "{stamp(START + timedelta(days=31))}"'
        )
    },
    "title order": {"order_by": "title"},
    "FULL view": {"view": post_pb2.POST_VIEW_FULL},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_list_posts_plans_use_an_index(planned, case) -> None:
    live = planned.live
    request = dict(CASES[case])
    if "filter" in request:
        first = await live.posts.ListPosts(post_pb2.ListPostsRequest(page_size=1))
        request["filter"] = request["filter"].format(author=first.posts[0].author_id)
    for page in (1, 2):  # the first page, and a keyset page after it
        statement = await list_sql(live, **request)
        plans = await explain(planned.url, statement)
        for kind, plan in plans.items():
            check_plan(plan, f"ListPosts {case} page {page} ({kind})")
        response = await live.posts.ListPosts(post_pb2.ListPostsRequest(**request))
        if not response.next_page_token:
            break
        request["page_token"] = response.next_page_token


async def test_page_1000_of_the_default_listing_uses_an_index(planned) -> None:
    live = planned.live
    started = time.monotonic()
    token = await seek_page(live, 1000, 50)
    print(f"reached page 1000 in {time.monotonic() - started:.1f}s")
    statement = await list_sql(live, page_token=token)
    for kind, plan in (await explain(planned.url, statement)).items():
        check_plan(plan, f"ListPosts page 1000 ({kind})")
    page = await live.posts.ListPosts(post_pb2.ListPostsRequest(page_token=token))
    assert len(page.posts) == 50


async def test_default_stream_uses_an_index(planned) -> None:
    live = planned.live
    request = post_pb2.StreamPostsRequest()

    async def first_message() -> None:
        call = live.posts.StreamPosts(request)
        assert len((await call.read()).posts) > 0
        call.cancel()

    statement = await captured(live, first_message, ("bind",))
    for kind, plan in (await explain(planned.url, statement)).items():
        check_plan(plan, f"StreamPosts default ({kind})")
