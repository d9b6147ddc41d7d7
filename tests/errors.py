"""Reading rich error details (google.rpc.Status) off a failed call, for assertions."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    resource_info: error_details_pb2.ResourceInfo | None = None
    precondition: error_details_pb2.PreconditionFailure | None = None
    retry_info: error_details_pb2.RetryInfo | None = None
    detail_types: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        return self.info.reason if self.info else None

    @property
    def fields(self) -> list[str]:
        if self.bad_request is None:
            return []
        return [v.field for v in self.bad_request.field_violations]


_TYPES = {
    "ErrorInfo": ("info", error_details_pb2.ErrorInfo),
    "BadRequest": ("bad_request", error_details_pb2.BadRequest),
    "ResourceInfo": ("resource_info", error_details_pb2.ResourceInfo),
    "PreconditionFailure": ("precondition", error_details_pb2.PreconditionFailure),
    "RetryInfo": ("retry_info", error_details_pb2.RetryInfo),
}


def rich(error: grpc.aio.AioRpcError) -> RichError:
    result = RichError(error.code(), error.details() or "")
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return result
    for detail in status.details:
        name = detail.type_url.rsplit(".", 1)[-1]
        result.detail_types.append(name)
        if name in _TYPES:
            attribute, message_type = _TYPES[name]
            message = message_type()
            detail.Unpack(message)
            setattr(result, attribute, message)
    return result


# -- assertions shared by the API tests ---------------------------------------------------

DOMAIN = "blog.v1"

# The reason a status has when a test does not name one (AIP-193 table of API.md).
_DEFAULT_REASON = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_FIELD",
    grpc.StatusCode.NOT_FOUND: "NOT_FOUND",
}
# The detail type each code must carry besides its ErrorInfo.
_REQUIRED_DETAIL = {
    grpc.StatusCode.INVALID_ARGUMENT: "BadRequest",
    grpc.StatusCode.NOT_FOUND: "ResourceInfo",
    grpc.StatusCode.FAILED_PRECONDITION: "PreconditionFailure",
    grpc.StatusCode.UNAVAILABLE: "RetryInfo",
}


def check_error(
    error: grpc.aio.AioRpcError,
    code: grpc.StatusCode,
    reason: str | None = None,
    *,
    fields: list[str] | None = None,
) -> RichError:
    """Assert a status the service made: its code, exactly one ErrorInfo in domain blog.v1
    (reason `reason`, or the code's usual one), each detail type at most once, the detail
    the code calls for, and, when given, exactly these BadRequest field paths in order."""
    result = rich(error)
    assert result.code is code, f"expected {code.name}, got {result.code.name}: {result.message}"
    assert result.detail_types.count("ErrorInfo") == 1, result.detail_types
    assert len(set(result.detail_types)) == len(result.detail_types), result.detail_types
    assert result.info is not None
    assert result.info.domain == DOMAIN, result.info
    expected_reason = reason or _DEFAULT_REASON.get(code)
    if expected_reason is not None:
        assert result.reason == expected_reason, (result.reason, result.message)
    required = _REQUIRED_DETAIL.get(code)
    if required is not None:
        assert required in result.detail_types, result.detail_types
    if fields is not None:
        assert result.fields == fields, (result.fields, result.message)
    return result


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str | None = None,
    *,
    fields: list[str] | None = None,
) -> RichError:
    """Await a call that must fail, then `check_error` its status."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return check_error(error, code, reason, fields=fields)
    raise AssertionError(f"expected {code.name}, but the call succeeded")
