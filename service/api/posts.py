"""blog.v1.PostService."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import empty_pb2

from blog.v1 import post_pb2
from service.api.base import Servicer
from service.api.convert import add_post, to_post_message, version_of
from service.api.pages import LARGE_RESPONSE_BYTES, MAX_PAGE_BYTES
from service.api.rpc import Call
from service.api.streams import send_batches
from service.api.validation import Violations, check_id, masked_fields
from service.memory import release_memory_soon
from service.repositories.posts import POST_QUERY
from service.repositories.uow import UnitOfWork

MUTABLE = ("title", "body", "tags")
IMMUTABLE = ("author_id",)
OUTPUT_ONLY = ("id", "create_time", "update_time", "etag", "author")
FULL = post_pb2.POST_VIEW_FULL
VIEWS = frozenset(post_pb2.PostView.values())


class PostServicer(Servicer):
    VIEWS = VIEWS
    FULL_VIEW = FULL

    # -- validation -------------------------------------------------------------------

    @staticmethod
    def _post_fields(
        violations: Violations, post: post_pb2.Post, fields: tuple[str, ...]
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "title" in fields and violations.text(
            "post.title", post.title, max_length=200, min_length=1, required=True
        ):
            values["title"] = post.title
        if "body" in fields and violations.text("post.body", post.body, max_length=100_000):
            values["body"] = post.body
        if "tags" in fields:
            values["tags"] = violations.tags("post.tags", post.tags)
        return values

    # -- methods ----------------------------------------------------------------------

    async def create_post(self, request: post_pb2.CreatePostRequest, call: Call) -> post_pb2.Post:
        violations = Violations()
        post = request.post
        violations.resource_id("post.author_id", post.author_id)
        values = self._post_fields(violations, post, MUTABLE)
        request_id = violations.request_id("request_id", request.request_id)
        violations.raise_if_any()
        tags: list[str] = values.pop("tags")
        key = self._idempotency_key(call, request_id)

        async def work(uow: UnitOfWork) -> post_pb2.Post:
            posts = uow.posts

            async def create() -> post_pb2.Post:
                row = await posts.create(
                    author_id=post.author_id, title=values["title"], body=values["body"], tags=tags
                )
                return to_post_message(row, tags, full=False)

            async def replay(post_id: int) -> post_pb2.Post:
                row, tags = await posts.get(post_id, full=False)
                return to_post_message(row, tags, full=False)

            return await uow.idempotency.create_once(
                key,
                payload={"author_id": post.author_id, "tags": tags, **values},
                create=create,
                encode=post_pb2.Post.SerializeToString,
                decode=post_pb2.Post.FromString,
                resource_id_of=_id_of,
                replay=replay,
            )

        return await self._write(call, work)

    async def get_post(self, request: post_pb2.GetPostRequest, call: Call) -> post_pb2.Post:
        violations = Violations()
        violations.resource_id("id", request.id)
        full = self._view(violations, request.view)
        violations.raise_if_any()
        async with self._store.unit_of_work("read") as uow:
            row, tags = await uow.posts.get(request.id, full=full)
        return to_post_message(row, tags, full=full)

    async def list_posts(
        self, request: post_pb2.ListPostsRequest, call: Call
    ) -> post_pb2.ListPostsResponse:
        violations = Violations()
        page_size = violations.page_size("page_size", request.page_size)
        full = self._view(violations, request.view)
        query = await POST_QUERY.parse(
            violations,
            self._tokens,
            filter_text=request.filter,
            order_by=request.order_by,
            token=request.page_token,
            token_field="page_token",
        )
        # One statement (tags come in a correlated subquery): an autocommit read, unless
        # the page's bodies are too large to come inline (repositories/posts.py).
        async with self._store.unit_of_work("read") as uow:
            page = await uow.posts.list_page(
                query=query, full=full, limit=page_size, max_bytes=MAX_PAGE_BYTES
            )
        if page.needs_snapshot:
            async with self._store.unit_of_work("snapshot") as uow:
                page = await uow.posts.list_page(
                    query=query,
                    full=full,
                    limit=page_size,
                    max_bytes=MAX_PAGE_BYTES,
                    snapshot=True,
                )
        rows = page.rows
        response = post_pb2.ListPostsResponse()
        repeated = response.posts
        add = repeated.add
        size = 0
        for count, (row, tags) in enumerate(zip(rows, page.tags, strict=True)):
            size += add_post(add, row, tags, full=full)[1]
            if size > MAX_PAGE_BYTES and count:
                del repeated[-1]  # the cap is the contract's; the repository's is memory's
                rows = rows[:count]
                break
        if page.more or len(rows) < len(page.rows):
            response.next_page_token = query.token_after(rows[-1])
        if size >= LARGE_RESPONSE_BYTES:
            release_memory_soon()
        return response

    async def update_post(self, request: post_pb2.UpdatePostRequest, call: Call) -> post_pb2.Post:
        violations = Violations()
        post = request.post
        violations.resource_id("post.id", post.id)
        fields = masked_fields(
            violations,
            request.update_mask.paths,
            post,
            mutable=MUTABLE,
            immutable=IMMUTABLE,
            output_only=OUTPUT_ONLY,
        )
        values = self._post_fields(violations, post, fields)
        violations.text("post.etag", post.etag, max_length=64)
        violations.raise_if_any()
        tags: list[str] | None = values.pop("tags", None)
        expected = version_of(post.etag) if post.etag else None

        async def work(uow: UnitOfWork) -> post_pb2.Post:
            posts = uow.posts
            row = await posts.update(post.id, values=values, tags=tags, expected_version=expected)
            shown = (await posts.tags_of([row.id])).get(row.id, []) if tags is None else tags
            return to_post_message(row, shown, full=False)

        return await self._write(call, work)

    async def delete_post(self, request: post_pb2.DeletePostRequest, call: Call) -> empty_pb2.Empty:
        check_id("id", request.id)
        violations = Violations()
        violations.text("etag", request.etag, max_length=64)
        violations.raise_if_any()
        expected = version_of(request.etag) if request.etag else None

        async def work(uow: UnitOfWork) -> None:
            await uow.posts.delete(request.id, expected_version=expected)

        await self._write(call, work)
        return empty_pb2.Empty()

    async def stream_posts(self, request: post_pb2.StreamPostsRequest, call: Call) -> None:
        violations = Violations()
        full = self._view(violations, request.view)
        query = await POST_QUERY.parse(
            violations,
            self._tokens,
            filter_text=request.filter,
            order_by=request.order_by,
            token=request.resume_token,
            token_field="resume_token",
            bound_to=(FULL if full else post_pb2.POST_VIEW_BASIC,),
        )
        settings = self._settings
        with self._streams.slot():
            async with self._store.unit_of_work("snapshot") as uow:
                posts = uow.posts

                def add(put: Callable[..., Any], row: Any, tags: Sequence[str]) -> int:
                    return add_post(put, row, tags, full=full)[1]

                await send_batches(
                    call,
                    posts.stream(
                        query=query,
                        full=full,
                        batch_size=settings.stream_batch_rows,
                        max_bytes=settings.stream_batch_bytes,
                    ),
                    prepare=posts.batch_tags,
                    new_message=post_pb2.StreamPostsResponse,
                    rows_field="posts",
                    add=add,
                    token_of=query.token_after,
                    max_rows=settings.stream_batch_rows,
                    max_bytes=settings.stream_batch_bytes,
                )


def _id_of(post: post_pb2.Post) -> int:
    return post.id
