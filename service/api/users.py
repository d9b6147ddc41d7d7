"""blog.v1.UserService."""

from __future__ import annotations

import hashlib
import json
from contextlib import aclosing
from typing import Any

from blog.v1 import user_pb2
from service.api.convert import to_user_message
from service.api.rpc import Call
from service.api.streams import StreamLimiter, chunks
from service.api.validation import Violations, check_id
from service.config import Settings
from service.db.models import User
from service.db.uow import Database
from service.errors import AlreadyExists, InvalidArgument
from service.filtering import FieldKind, FilterError, FilterField, compile_filter, substring_has
from service.repositories.idempotency import IdempotencyKey, IdempotencyRepository
from service.repositories.keyset import Ordering, parse_order_by
from service.repositories.users import (
    DEFAULT_ORDER,
    ORDERABLE,
    UserRepository,
    normalize_email,
    version_of,
)
from service.tokens import TokenCodec, binding_of

MAX_BATCH = 1000
MUTABLE = ("username", "email", "display_name", "bio")
OUTPUT_ONLY = ("id", "create_time", "update_time", "delete_time", "etag", "post_count")
FULL = user_pb2.USER_VIEW_FULL
VIEWS = (user_pb2.USER_VIEW_UNSPECIFIED, user_pb2.USER_VIEW_BASIC, user_pb2.USER_VIEW_FULL)

FILTERABLE: dict[str, FilterField] = {
    "id": FilterField(FieldKind.INT, User.id),
    "username": FilterField(FieldKind.STRING, User.username),
    "email": FilterField(FieldKind.STRING, User.email),
    "display_name": FilterField(
        FieldKind.STRING, User.display_name, substring_has(User.display_name)
    ),
    "create_time": FilterField(FieldKind.TIMESTAMP, User.create_time),
    "update_time": FilterField(FieldKind.TIMESTAMP, User.update_time),
}


class UserServicer:
    def __init__(
        self, *, db: Database, tokens: TokenCodec, streams: StreamLimiter, settings: Settings
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._streams = streams
        self._settings = settings

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

    @staticmethod
    def _view(violations: Violations, view: int) -> bool:
        violations.enum("view", view, VIEWS)
        return view == FULL

    def _query(
        self, violations: Violations, *, filter_text: str, order_by: str
    ) -> tuple[Any, Ordering | None]:
        where = None
        ordering = None
        if violations.text("filter", filter_text, max_length=2048):
            try:
                where = compile_filter(filter_text, FILTERABLE)
            except FilterError as error:
                violations.add("filter", str(error))
        if violations.text("order_by", order_by, max_length=256):
            try:
                ordering = parse_order_by(order_by, columns=ORDERABLE, default=DEFAULT_ORDER)
            except InvalidArgument as error:
                violations.items.extend(error.violations)
        return where, ordering

    # -- methods ----------------------------------------------------------------------

    async def create_user(self, request: user_pb2.CreateUserRequest, call: Call) -> user_pb2.User:
        violations = Violations()
        values = self._user_fields(violations, request.user, "user", MUTABLE)
        request_id = violations.request_id("request_id", request.request_id)
        violations.raise_if_any()
        try:
            async with self._db.unit_of_work() as session:
                users = UserRepository(session)
                if request_id:
                    key = IdempotencyKey(call.caller, call.method, request_id)
                    digest = _digest(values)
                    records = IdempotencyRepository(session)
                    prior = await records.claim(key, digest)
                    if prior is not None:
                        if prior.request_hash != digest:
                            raise InvalidArgument.field(
                                "request_id",
                                "was already used with a different request",
                                reason="REQUEST_ID_REUSED",
                            )
                        return to_user_message(await users.require(prior.resource_id))
                row = await users.create(values)
                if request_id:
                    await records.record(key, row.id)
        except AlreadyExists as error:
            raise await self._username_first(error, values) from error
        return to_user_message(row)

    async def _username_first(self, error: AlreadyExists, values: dict[str, Any]) -> AlreadyExists:
        """When username and email both clash the contract says USERNAME_TAKEN; the
        database reports whichever index it checked first, so ask once more."""
        if error.reason != "EMAIL_TAKEN":
            return error
        async with self._db.unit_of_work("read") as session:
            names, _ = await UserRepository(session).find_live_clashes(
                [values["username"]], [values["email"]]
            )
        if names:
            return AlreadyExists("USERNAME_TAKEN", "the username is taken by a live user")
        return error

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
        violations.raise_if_any()
        _reject_duplicates_within(entries)
        async with self._db.unit_of_work() as session:
            users = UserRepository(session)
            names, emails = await users.find_live_clashes(
                [e["username"] for e in entries], [e["email"] for e in entries]
            )
            for index, entry in enumerate(entries):
                if entry["username"] in names:
                    raise _taken("USERNAME_TAKEN", index)
                if normalize_email(entry["email"]) in emails:
                    raise _taken("EMAIL_TAKEN", index)
            rows = await users.create_many(entries)
        return user_pb2.BatchCreateUsersResponse(users=[to_user_message(r) for r in rows])

    async def get_user(self, request: user_pb2.GetUserRequest, call: Call) -> user_pb2.User:
        violations = Violations()
        violations.resource_id("id", request.id)
        full = self._view(violations, request.view)
        violations.raise_if_any()
        async with self._db.unit_of_work("snapshot" if full else "read") as session:
            users = UserRepository(session)
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
        where, ordering = self._query(
            violations, filter_text=request.filter, order_by=request.order_by
        )
        violations.text("page_token", request.page_token, max_length=4096)
        violations.raise_if_any()
        assert ordering is not None
        binding = binding_of(request.filter, ordering.canonical, request.show_deleted)
        after = None
        if request.page_token:
            after = await self._tokens.decode(
                request.page_token, kind="users.list", binding=binding, field="page_token"
            )
            if len(after) != len(ordering.keys):
                raise InvalidArgument.field("page_token", "the token is not valid")
        async with self._db.unit_of_work("snapshot" if full else "read") as session:
            users = UserRepository(session)
            rows = await users.list_page(
                where=where,
                show_deleted=request.show_deleted,
                ordering=ordering,
                after=after,
                limit=page_size + 1,
            )
            more = len(rows) > page_size
            rows = rows[:page_size]
            counts = await users.post_counts([r.id for r in rows]) if full else None
        response = user_pb2.ListUsersResponse(
            users=[
                to_user_message(r, post_count=counts.get(r.id, 0) if counts is not None else None)
                for r in rows
            ]
        )
        if more:
            response.next_page_token = self._tokens.encode(
                "users.list", binding, ordering.position_of(rows[-1])
            )
        return response

    async def update_user(self, request: user_pb2.UpdateUserRequest, call: Call) -> user_pb2.User:
        violations = Violations()
        user = request.user
        violations.resource_id("user.id", user.id)
        fields = _masked_fields(violations, request, user)
        values = self._user_fields(violations, user, "user", fields)
        violations.text("user.etag", user.etag, max_length=64)
        violations.raise_if_any()
        expected = version_of(user.etag) if user.etag else None
        try:
            async with self._db.unit_of_work() as session:
                row = await UserRepository(session).update(
                    user.id, values, expected_version=expected
                )
        except AlreadyExists as error:
            if "username" not in values or "email" not in values:
                raise
            raise await self._username_first(error, values) from error
        return to_user_message(row)

    async def delete_user(self, request: user_pb2.DeleteUserRequest, call: Call) -> user_pb2.User:
        check_id("id", request.id)
        violations = Violations()
        violations.text("etag", request.etag, max_length=64)
        violations.raise_if_any()
        expected = version_of(request.etag) if request.etag else None
        async with self._db.unit_of_work() as session:
            row = await UserRepository(session).soft_delete(request.id, expected_version=expected)
        return to_user_message(row)

    async def undelete_user(
        self, request: user_pb2.UndeleteUserRequest, call: Call
    ) -> user_pb2.User:
        check_id("id", request.id)
        async with self._db.unit_of_work() as session:
            row = await UserRepository(session).undelete(request.id)
        return to_user_message(row)

    async def stream_users(self, request: user_pb2.StreamUsersRequest, call: Call) -> None:
        violations = Violations()
        full = self._view(violations, request.view)
        where, ordering = self._query(
            violations, filter_text=request.filter, order_by=request.order_by
        )
        violations.text("resume_token", request.resume_token, max_length=4096)
        violations.raise_if_any()
        assert ordering is not None
        view = FULL if full else user_pb2.USER_VIEW_BASIC
        binding = binding_of(request.filter, ordering.canonical, request.show_deleted, view)
        after = None
        if request.resume_token:
            after = await self._tokens.decode(
                request.resume_token, kind="users.stream", binding=binding, field="resume_token"
            )
            if len(after) != len(ordering.keys):
                raise InvalidArgument.field("resume_token", "the token is not valid")
        settings = self._settings
        with self._streams.slot():
            async with self._db.unit_of_work("snapshot") as session:
                users = UserRepository(session)
                batches = users.stream(
                    where=where,
                    show_deleted=request.show_deleted,
                    ordering=ordering,
                    after=after,
                    batch_size=settings.stream_batch_rows,
                )
                async with aclosing(batches):
                    async for rows in batches:
                        counts = await users.post_counts([r.id for r in rows]) if full else None
                        messages = [
                            to_user_message(
                                r, post_count=counts.get(r.id, 0) if counts is not None else None
                            )
                            for r in rows
                        ]
                        for chunk, last in chunks(
                            messages,
                            rows,
                            max_rows=settings.stream_batch_rows,
                            max_bytes=settings.stream_batch_bytes,
                        ):
                            token = self._tokens.encode(
                                "users.stream", binding, ordering.position_of(last)
                            )
                            await call.send(
                                user_pb2.StreamUsersResponse(users=chunk, resume_token=token),
                                resume_token=token,
                            )


def _masked_fields(
    violations: Violations, request: user_pb2.UpdateUserRequest, user: user_pb2.User
) -> tuple[str, ...]:
    """AIP-134: the mask's paths; `*` for all mutable fields; no mask, the non-default ones."""
    paths = list(request.update_mask.paths)
    if not paths:
        chosen = tuple(f for f in MUTABLE if getattr(user, f))
        if not chosen:
            violations.add("update_mask", "names no field to update and no field is set")
        return chosen
    if paths == ["*"]:
        return MUTABLE
    chosen_list: list[str] = []
    for path in paths:
        if path in MUTABLE:
            if path not in chosen_list:
                chosen_list.append(path)
        elif path in OUTPUT_ONLY:
            violations.add("update_mask", f"'{path}' is output only")
        elif path == "*":
            violations.add("update_mask", "'*' must be the only path")
        else:
            violations.add("update_mask", f"unknown field '{path[:64]}'")
    return tuple(chosen_list)


def _reject_duplicates_within(entries: list[dict[str, Any]]) -> None:
    names: set[str] = set()
    emails: set[str] = set()
    for index, entry in enumerate(entries):
        email = normalize_email(entry["email"])
        if entry["username"] in names:
            raise _taken("USERNAME_TAKEN", index, within=True)
        if email in emails:
            raise _taken("EMAIL_TAKEN", index, within=True)
        names.add(entry["username"])
        emails.add(email)


def _taken(reason: str, index: int, *, within: bool = False) -> AlreadyExists:
    what = "username" if reason == "USERNAME_TAKEN" else "email"
    where = "an earlier entry of the batch" if within else "a live user"
    return AlreadyExists(
        reason, f"requests[{index}]: the {what} is taken by {where}", metadata={"index": str(index)}
    )


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
