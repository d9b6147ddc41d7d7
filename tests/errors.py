"""Reading rich error details (google.rpc.Status) off a failed call, for assertions."""

from __future__ import annotations

from dataclasses import dataclass, field

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
