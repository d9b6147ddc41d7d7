"""Domain errors and their one mapping to gRPC statuses with rich details (AIP-193)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "blog.v1"
# A BadRequest lists at most this many field violations (the first ones in check
# order); ErrorInfo metadata `violation_count` then gives the total. With the bounds
# below a status stays far under gRPC's 16 KiB trailer limit (API.md, Errors).
MAX_VIOLATIONS = 20
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 256
MAX_MESSAGE_CHARS = 512


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` code points, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One fault in one request field; `field` is a path relative to the request.

    Both are clipped: a description may echo a client's value, which can be huge."""

    field: str
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "field", clip(self.field, MAX_FIELD_CHARS))
        object.__setattr__(self, "description", clip(self.description, MAX_DESCRIPTION_CHARS))


class DomainError(Exception):
    """Base of every error the service reports on purpose. Never built into a status elsewhere."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    # A database error after which the handler runs the call once more (its transaction
    # rolled back; api/rpc.py); `transient_cause` says which, for the log.
    transient: bool = False
    transient_cause: str = ""

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    def details(self) -> list[object]:
        """Detail messages besides the ErrorInfo every status carries."""
        return []


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        reason: str = "INVALID_FIELD",
        metadata: Mapping[str, str] | None = None,
        total: int | None = None,
    ) -> None:
        """`violations` in check order; `total` counts those a collector already left
        out (it keeps only the first MAX_VIOLATIONS). Only the first MAX_VIOLATIONS are
        kept; when there were more, metadata `violation_count` gives the total."""
        total = max(len(violations), total or 0)
        first = violations[0] if violations else FieldViolation("", "invalid request")
        summary = f"{first.field}: {first.description}" if first.field else first.description
        if total > 1:
            summary += f" (and {total - 1} more)"
        extra = dict(metadata or {})
        if total > MAX_VIOLATIONS:
            extra["violation_count"] = str(total)
        super().__init__(summary, metadata=extra)
        self.violations = list(violations[:MAX_VIOLATIONS])
        self.total = total
        self.reason = reason

    @classmethod
    def field(
        cls, field: str, description: str, *, reason: str = "INVALID_FIELD"
    ) -> InvalidArgument:
        return cls([FieldViolation(field, description)], reason=reason)

    def details(self) -> list[object]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]


class FieldViolations:
    """Collects field violations; `raise_if_any` ends the call with them.

    Only the first MAX_VIOLATIONS are kept (the BadRequest shows no more), the rest are
    only counted, so a request with 100,000 bad mask paths builds no huge list."""

    __slots__ = ("count", "items")

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self.count = 0

    def add(self, field: str, description: str) -> None:
        self.count += 1
        if len(self.items) < MAX_VIOLATIONS:
            self.items.append(FieldViolation(field, description))

    def extend(self, violations: Iterable[FieldViolation]) -> None:
        for violation in violations:
            self.add(violation.field, violation.description)

    def raise_if_any(self) -> None:
        if self.count:
            raise InvalidArgument(self.items, total=self.count)

    def text(
        self,
        field: str,
        value: str,
        *,
        max_length: int,
        min_length: int = 0,
        required: bool = False,
    ) -> bool:
        """Length in code points and no NUL; True when the value passed."""
        if "\x00" in value:
            self.add(field, "must not contain NUL characters")
            return False
        if required and not value:
            self.add(field, "is required")
            return False
        length = len(value)
        if length > max_length:
            self.add(field, f"must be at most {max_length} characters (got {length})")
            return False
        if value and length < min_length:
            self.add(field, f"must be at least {min_length} characters (got {length})")
            return False
        return True


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, resource_id: object) -> None:
        super().__init__(
            f"{resource_type} {resource_id} not found",
            metadata={"resource_type": resource_type, "id": str(resource_id)},
        )
        self.resource_type = resource_type
        self.resource_name = f"{resource_type.lower()}s/{resource_id}"

    def details(self) -> list[object]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=f"{DOMAIN}.{self.resource_type}",
                resource_name=self.resource_name,
                description="no such resource",
            )
        ]


class AlreadyExists(DomainError):
    """A unique clash (USERNAME_TAKEN, EMAIL_TAKEN) or an undelete of a live user."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(
        self, reason: str, message: str, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.reason = reason


def taken(reason: str, *, index: int | None = None, within: bool = False) -> AlreadyExists:
    """USERNAME_TAKEN or EMAIL_TAKEN; in a batch, for entry `index` (a clash with a live
    user, or `within` the batch itself)."""
    what = "username" if reason == "USERNAME_TAKEN" else "email"
    if index is None:
        return AlreadyExists(reason, f"the {what} is taken by a live user")
    where = "an earlier entry of the batch" if within else "a live user"
    return AlreadyExists(
        reason, f"requests[{index}]: the {what} is taken by {where}", metadata={"index": str(index)}
    )


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, *, subject: str, description: str) -> None:
        super().__init__(description, metadata={"subject": subject})
        self.reason = reason
        self.subject = subject

    def details(self) -> list[object]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.reason, subject=self.subject, description=self.message
                    )
                ]
            )
        ]


def author_not_live(author_id: int | None) -> FailedPrecondition:
    """AUTHOR_NOT_LIVE: a post's author_id names no live user (None: not known, as when
    the foreign key refused the row)."""
    if author_id is None:
        return FailedPrecondition(
            "AUTHOR_NOT_LIVE", subject="author_id", description="the author is not a live user"
        )
    return FailedPrecondition(
        "AUTHOR_NOT_LIVE",
        subject=f"users/{author_id}",
        description=f"author_id {author_id} names no live user",
    )


class Aborted(DomainError):
    """ETAG_MISMATCH, STREAM_STALLED or TRANSACTION_CONFLICT: the caller may retry."""

    code = grpc.StatusCode.ABORTED

    def __init__(
        self, reason: str, message: str, *, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.reason = reason


class EtagMismatch(Aborted):
    """ETAG_MISMATCH. `current_version` is the row's version when the writer read it; the
    API layer, which alone knows how a version is shown, names it as `current_etag`."""

    def __init__(self, resource: str, *, current_version: int | None = None) -> None:
        super().__init__(
            "ETAG_MISMATCH",
            f"the etag does not match the {resource}'s current etag; read it again",
        )
        self.current_version = current_version


class TransactionConflict(Aborted):
    """TRANSACTION_CONFLICT: a serialization failure or deadlock that the service's own
    retries (Store.run) did not get past; the call may be retried as it is."""

    def __init__(self, *, retry_after: float = 0.1) -> None:
        super().__init__(
            "TRANSACTION_CONFLICT", "the transaction conflicted with another one; retry"
        )
        self.retry_after = retry_after

    def details(self) -> list[object]:
        return [_retry_info(self.retry_after)]


def _retry_info(after: float) -> error_details_pb2.RetryInfo:
    seconds = int(after)
    nanos = int((after - seconds) * 1e9)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"

    def __init__(
        self, message: str = "the database is unavailable; retry", *, retry_after: float = 1.0
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> list[object]:
        return [_retry_info(self.retry_after)]


class StaleStatement(Unavailable):
    """A cached prepared statement outlived a schema change (a column's type changed in a
    rolling migration). Run once more (the caches are cleared by then); if that cannot
    be done, UNAVAILABLE, which clients retry."""

    transient = True
    transient_cause = "a stale cached statement"

    def __init__(self) -> None:
        super().__init__("the schema changed under the call; retry", retry_after=0.0)


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_STREAMS"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> list[object]:
        seconds = int(self.retry_after)
        return [error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))]


class Overloaded(ResourceExhausted):
    """More calls in flight than MAX_CONCURRENT_RPCS: shed, retry after a pause."""

    reason = "OVERLOADED"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class DatabaseTimeout(DeadlineExceeded):
    """The database's own statement_timeout cancelled a statement."""

    reason = "DATABASE_TIMEOUT"

    def __init__(self) -> None:
        super().__init__("the database statement timed out")


class CallTimeout(DeadlineExceeded):
    """A unary call without a client deadline ran for DEFAULT_CALL_TIMEOUT."""

    reason = "CALL_TIMEOUT"


class Internal(DomainError):
    """Anything unexpected. The message is generic; the error id is also logged."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, error_id: str) -> None:
        super().__init__(
            f"internal error; quote error id {error_id}", metadata={"error_id": error_id}
        )
        self.error_id = error_id


def to_grpc_status(error: DomainError) -> grpc.Status:
    """The status for a domain error: ErrorInfo first, then the type's own details."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    for message in [info, *error.details()]:
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=clip(error.message, MAX_MESSAGE_CHARS),
        details=details,
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(
    context: grpc.aio.ServicerContext[object, object],
    error: DomainError,
    trailing_metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """End the call with the error's status; never returns (grpc raises AbortError).

    `trailing_metadata` is added to the status's own (an abort replaces what the
    call set before, such as the echoed x-request-id)."""
    status = to_grpc_status(error)
    await context.abort(
        status.code, status.details, (*status.trailing_metadata, *trailing_metadata)
    )
