"""blog.v1.UserService."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

from blog.v1 import user_pb2
from service.api.base import Servicer
from service.api.convert import add_user, to_user_message, version_of
from service.api.pages import LARGE_RESPONSE_BYTES, MAX_PAGE_BYTES
from service.api.rpc import Call
from service.api.streams import send_batches
from service.api.validation import Violations, check_id, masked_fields
from service.errors import AlreadyExists, InvalidArgument, taken
from service.memory import release_memory_soon
from service.repositories.uow import UnitOfWork
from service.repositories.users import USER_QUERY, normalize_email

MAX_BATCH = 1000
MUTABLE = ("username", "email", "display_name", "bio")
OUTPUT_ONLY = ("id", "create_time", "update_time", "delete_time", "etag", "post_count")
FULL = user_pb2.USER_VIEW_FULL
VIEWS = frozenset(user_pb2.UserView.values())


class UserServicer(Servicer):
    VIEWS = VIEWS
    FULL_VIEW = FULL

    # -- validation -------------------------------------------------------------------

    @staticmethod
    def _user_fields(
        violations: Violations, user: user_pb2.User, prefix: str, fields: tuple[str, ...]
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "username" in fields:
            values["username"] = violations.username(f"{prefix}.username", user.username)
        if "email" in fields:
            values["email"] = violations.email(f"{prefix}.email", user.email)
        if "display_name" in fields and violations.text(
            f"{prefix}.display_name", user.display_name, max_length=100
        ):
            values["display_name"] = user.display_name
        if "bio" in fields and violations.text(f"{prefix}.bio", user.bio, max_length=2000):
            values["bio"] = user.bio
        return values

    # -- methods ----------------------------------------------------------------------

    async def create_user(self, request: user_pb2.CreateUserRequest, call: Call) -> user_pb2.User:
        violations = Violations()
        values = self._user_fields(violations, request.user, "user", MUTABLE)
        request_id = violations.request_id("request_id", request.request_id)
        violations.raise_if_any()
        key = self._idempotency_key(call, request_id)

        async def work(uow: UnitOfWork) -> user_pb2.User:
            users = uow.users

            async def create() -> user_pb2.User:
                return to_user_message(await users.create(values))

            async def replay(user_id: int) -> user_pb2.User:
                return to_user_message(await users.require(user_id))

            return await uow.idempotency.create_once(
                key,
                payload=values,
                create=create,
                encode=user_pb2.User.SerializeToString,
                decode=user_pb2.User.FromString,
                resource_id_of=_id_of,
                replay=replay,
            )

        try:
            return await self._write(call, work)
        except AlreadyExists as error:
            raise await self._username_first(error, [values]) from error

    async def _username_first(
        self,
        error: AlreadyExists,
        entries: list[dict[str, Any]],
        *,
        batch: bool = False,
        exclude_id: int | None = None,
    ) -> AlreadyExists:
        """The clash to report once the unique indexes refused a write: the database
        names whichever index it checked first, so ask again which entry clashes and on
        what (`UserRepository.first_clash`: the username first). Asked of the primary,
        in a unit of work of its own (the failed one is rolled back): the primary has
        the row that clashed, a replica may not have it yet."""
        if not batch and error.reason != "EMAIL_TAKEN":
            return error
        async with self._store.unit_of_work("write") as uow:
            clash = await uow.users.first_clash(entries, exclude_id=exclude_id)
        if clash is None:
            return error
        index, reason = clash
        return taken(reason, index=index) if batch else taken(reason)

    async def batch_create_users(
        self, request: user_pb2.BatchCreateUsersRequest, call: Call
    ) -> user_pb2.BatchCreateUsersResponse:
        count = len(request.requests)
        if count == 0 or count > MAX_BATCH:
            raise InvalidArgument.field("requests", f"must hold 1 to {MAX_BATCH} entries")
        violations = Violations()
        entries = [
            self._user_fields(violations, entry.user, f"requests[{i}].user", MUTABLE)
            for i, entry in enumerate(request.requests)
        ]
        request_id = violations.request_id("request_id", request.request_id)
        violations.raise_if_any()
        _reject_duplicates_within(entries)
        key = self._idempotency_key(call, request_id)

        async def work(uow: UnitOfWork) -> user_pb2.BatchCreateUsersResponse:
            async def create() -> user_pb2.BatchCreateUsersResponse:
                response = user_pb2.BatchCreateUsersResponse()
                _add_users(response.users, await uow.users.create_many(entries), None)
                return response

            return await uow.idempotency.create_once(
                key,
                payload={"requests": entries},
                create=create,
                encode=user_pb2.BatchCreateUsersResponse.SerializeToString,
                decode=user_pb2.BatchCreateUsersResponse.FromString,
            )

        try:
            return await self._write(call, work)
        except AlreadyExists as error:
            # The constraint refused the batch (nothing was written); say which entry.
            raise await self._username_first(error, entries, batch=True) from error

    async def get_user(self, request: user_pb2.GetUserRequest, call: Call) -> user_pb2.User:
        violations = Violations()
        violations.resource_id("id", request.id)
        full = self._view(violations, request.view)
        violations.raise_if_any()
        async with self._store.unit_of_work("snapshot" if full else "read") as uow:
            users = uow.users
            row = await users.require(request.id)
            if not full:
                return to_user_message(row)
            counts = await users.post_counts([row.id])
        return to_user_message(row, post_count=counts.get(row.id, 0))

    async def list_users(
        self, request: user_pb2.ListUsersRequest, call: Call
    ) -> user_pb2.ListUsersResponse:
        violations = Violations()
        page_size = violations.page_size("page_size", request.page_size)
        full = self._view(violations, request.view)
        query = await USER_QUERY.parse(
            violations,
            self._tokens,
            filter_text=request.filter,
            order_by=request.order_by,
            token=request.page_token,
            token_field="page_token",
            bound_to=(request.show_deleted,),
        )
        async with self._store.unit_of_work("snapshot" if full else "read") as uow:
            users = uow.users
            rows = await users.list_page(
                query=query, show_deleted=request.show_deleted, limit=page_size + 1
            )
            more = len(rows) > page_size
            rows = rows[:page_size]
            counts = await users.post_counts([r.id for r in rows]) if full else None
        response = user_pb2.ListUsersResponse()
        kept = _fill_page(response.users, rows, counts)
        if more or kept < len(rows):
            response.next_page_token = query.token_after(rows[kept - 1])
        return response

    async def update_user(self, request: user_pb2.UpdateUserRequest, call: Call) -> user_pb2.User:
        violations = Violations()
        user = request.user
        violations.resource_id("user.id", user.id)
        fields = masked_fields(
            violations,
            request.update_mask.paths,
            user,
            mutable=MUTABLE,
            output_only=OUTPUT_ONLY,
        )
        values = self._user_fields(violations, user, "user", fields)
        violations.text("user.etag", user.etag, max_length=64)
        violations.raise_if_any()
        expected = version_of(user.etag) if user.etag else None

        async def work(uow: UnitOfWork) -> Any:
            return await uow.users.update(user.id, values=values, expected_version=expected)

        try:
            row = await self._write(call, work)
        except AlreadyExists as error:
            if "username" not in values or "email" not in values:
                raise
            raise await self._username_first(error, [values], exclude_id=user.id) from error
        return to_user_message(row)

    async def delete_user(self, request: user_pb2.DeleteUserRequest, call: Call) -> user_pb2.User:
        check_id("id", request.id)
        violations = Violations()
        violations.text("etag", request.etag, max_length=64)
        violations.raise_if_any()
        expected = version_of(request.etag) if request.etag else None

        async def work(uow: UnitOfWork) -> Any:
            return await uow.users.soft_delete(request.id, expected_version=expected)

        return to_user_message(await self._write(call, work))

    async def undelete_user(
        self, request: user_pb2.UndeleteUserRequest, call: Call
    ) -> user_pb2.User:
        check_id("id", request.id)

        async def work(uow: UnitOfWork) -> Any:
            return await uow.users.undelete(request.id)

        try:
            row = await self._write(call, work)
        except AlreadyExists as error:
            if error.reason != "EMAIL_TAKEN":
                raise
            async with self._store.unit_of_work("write") as uow:  # the primary, as above
                current = await uow.users.get(request.id)
            if current is None:
                raise
            values = {"username": current.username, "email": current.email}
            raise await self._username_first(error, [values]) from error
        return to_user_message(row)

    async def stream_users(self, request: user_pb2.StreamUsersRequest, call: Call) -> None:
        violations = Violations()
        full = self._view(violations, request.view)
        query = await USER_QUERY.parse(
            violations,
            self._tokens,
            filter_text=request.filter,
            order_by=request.order_by,
            token=request.resume_token,
            token_field="resume_token",
            bound_to=(request.show_deleted, FULL if full else user_pb2.USER_VIEW_BASIC),
        )
        settings = self._settings
        with self._streams.slot():
            async with self._store.unit_of_work("snapshot") as uow:
                users = uow.users

                async def prepare(rows: Sequence[Any]) -> Iterable[int]:
                    if not full:
                        return repeat(0)
                    ids = [r.id for r in rows]
                    counts = await users.post_counts(ids)
                    return [counts.get(user_id, 0) for user_id in ids]

                def add(put: Callable[..., Any], row: Any, post_count: int) -> int:
                    return add_user(put, row, post_count)[1]

                await send_batches(
                    call,
                    users.stream(
                        query=query,
                        show_deleted=request.show_deleted,
                        batch_size=settings.stream_batch_rows,
                    ),
                    prepare=prepare,
                    new_message=user_pb2.StreamUsersResponse,
                    rows_field="users",
                    add=add,
                    token_of=query.token_after,
                    max_rows=settings.stream_batch_rows,
                    max_bytes=settings.stream_batch_bytes,
                )


def _add_users(container: Any, rows: Sequence[Any], counts: dict[int, int] | None) -> None:
    add = container.add
    for row in rows:
        add_user(add, row, counts.get(row.id, 0) if counts else 0)


def _fill_page(container: Any, rows: Sequence[Any], counts: dict[int, int] | None) -> int:
    """Add rows to a page until its estimated size would pass MAX_PAGE_BYTES (a thousand
    users with 2,000-character bios can); return how many went in (at least one). The
    rows themselves are bounded by the schema, so they are read in one statement."""
    add = container.add
    size = 0
    for count, row in enumerate(rows):
        size += add_user(add, row, counts.get(row.id, 0) if counts else 0)[1]
        if size > MAX_PAGE_BYTES and count:
            del container[-1]
            release_memory_soon()
            return count
    if size >= LARGE_RESPONSE_BYTES:
        release_memory_soon()
    return len(rows)


def _id_of(user: user_pb2.User) -> int:
    return user.id


def _reject_duplicates_within(entries: list[dict[str, Any]]) -> None:
    names: set[str] = set()
    emails: set[str] = set()
    for index, entry in enumerate(entries):
        email = normalize_email(entry["email"])
        if entry["username"] in names:
            raise taken("USERNAME_TAKEN", index=index, within=True)
        if email in emails:
            raise taken("EMAIL_TAKEN", index=index, within=True)
        names.add(entry["username"])
        emails.add(email)
