"""How servicer methods become gRPC handlers: raw-bytes parsing, auth, errors, stream writes.

Handlers are registered with no deserializer, so the service parses the request
itself: bytes that do not parse (or invalid UTF-8) are INVALID_ARGUMENT rather
than gRPC's own INTERNAL. Every domain error is turned into a status here, a call
the client gave up on is logged as CANCELLED, and anything unexpected becomes
INTERNAL with an error id that is also logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from service.api.convert import etag_of
from service.auth import ANONYMOUS, Authenticator
from service.draining import Drain
from service.errors import (
    Aborted,
    DomainError,
    EtagMismatch,
    Internal,
    InvalidArgument,
    Unavailable,
    abort,
)
from service.repositories.uow import read_from_primary

log = logging.getLogger("service.rpc")

READ_CONSISTENCY = "x-read-consistency"

Context = grpc.aio.ServicerContext[Any, Any]


class Call:
    """What a servicer method gets besides its request: the caller and the stream writer."""

    __slots__ = ("_idle_timeout", "caller", "context", "method", "sent")

    def __init__(self, context: Context, method: str, caller: str, idle_timeout: float) -> None:
        self.context = context
        self.method = method
        self.caller = caller
        self._idle_timeout = idle_timeout
        self.sent = 0  # stream messages written so far

    async def send(self, message: protobuf_message.Message) -> None:
        """Write one stream message; a client that reads nothing for the idle timeout is
        ended with ABORTED STREAM_STALLED (its last resume token still works)."""
        try:
            self.sent += 1
            await asyncio.wait_for(self.context.write(message), self._idle_timeout)
        except TimeoutError:
            raise Aborted(
                "STREAM_STALLED",
                f"the client read nothing for {self._idle_timeout:g}s; resume with the "
                "last resume_token received",
            ) from None
        except Exception as error:
            # A write fails only once the call is over: the client cancelled, its
            # deadline passed or its connection dropped, and grpc.aio may not have
            # cancelled this task yet. No status can reach the client now: end the
            # handler as a cancellation (the wrapper logs it as CANCELLED), not as an
            # INTERNAL error with a traceback in the log.
            raise asyncio.CancelledError(f"stream write failed: {error!r}") from error


def _wants_strong_reads(context: Context) -> bool:
    """`x-read-consistency: strong` metadata: this call's reads go to the primary."""
    return any(
        key == READ_CONSISTENCY and value == "strong"
        for key, value in context.invocation_metadata() or ()
    )


async def run_once_more_if_transient(
    impl: Callable[[Any, Call], Awaitable[Any]], request: Any, call: Call
) -> Any:
    """Run the servicer method; after a transient database error that is not the unit of
    work's to retry (a cached statement made stale by a column type change in a rolling
    migration: the dialect has cleared its caches by then) run it once more, since its
    unit of work rolled back. Never once a stream has sent rows: then the status
    (UNAVAILABLE) is one the client resumes from with its last resume_token.
    Serialization failures and deadlocks are Store.run's to retry, a few times."""
    try:
        return await impl(request, call)
    except DomainError as error:
        if not error.transient or call.sent:
            raise
        log.info("%s: retrying once after %s", call.method, error.transient_cause)
    return await impl(request, call)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def parse(message_class: type[protobuf_message.Message], data: bytes) -> Any:
    try:
        return message_class.FromString(data)
    except (protobuf_message.DecodeError, UnicodeDecodeError, ValueError) as error:
        raise InvalidArgument.field(
            "", f"the request does not parse as {message_class.DESCRIPTOR.full_name}"
        ) from error


class HandlerFactory:
    """Builds generic handlers for a service descriptor from a servicer's snake_case methods."""

    def __init__(
        self, *, authenticator: Authenticator, idle_timeout: float, drain: Drain | None = None
    ) -> None:
        self._auth = authenticator
        self._idle_timeout = idle_timeout
        self.drain = drain or Drain()

    def service(self, descriptor: ServiceDescriptor, servicer: object) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in descriptor.methods:
            impl = getattr(servicer, _snake(method.name), None)
            if impl is None:
                continue  # not implemented yet: gRPC answers UNIMPLEMENTED
            request_class = GetMessageClass(method.input_type)
            response_class = GetMessageClass(method.output_type)
            full_name = f"/{descriptor.full_name}/{method.name}"
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._wrap(full_name, request_class, impl, streaming=True),
                    request_deserializer=None,
                    response_serializer=response_class.SerializeToString,
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._wrap(full_name, request_class, impl, streaming=False),
                    request_deserializer=None,
                    response_serializer=response_class.SerializeToString,
                )
        return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)

    def _wrap(
        self,
        method: str,
        request_class: type[protobuf_message.Message],
        impl: Callable[[Any, Call], Awaitable[Any]],
        *,
        streaming: bool,
    ) -> Callable[[bytes, Context], Awaitable[Any]]:
        auth = self._auth
        idle_timeout = self._idle_timeout
        drain = self.drain

        async def handle(data: bytes, context: Context) -> Any:
            started = time.perf_counter()
            caller = "-"
            task: asyncio.Task[object] | None = None
            try:
                if drain.draining:
                    await drain.refuse(context.time_remaining())
                task = drain.enter(streaming)
                caller = auth.caller(context.invocation_metadata()) if auth.enabled else ANONYMOUS
                request = parse(request_class, data)
                call = Call(context, method, caller, idle_timeout)
                read_from_primary(_wants_strong_reads(context))
                result = await run_once_more_if_transient(impl, request, call)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s OK caller=%s %.1fms",
                        method,
                        caller,
                        (time.perf_counter() - started) * 1000,
                    )
                return None if streaming else result
            except asyncio.CancelledError as cancelled:
                if drain.ended_by_shutdown(task) and not context.cancelled():
                    # Shutdown reached its grace deadline with this call still running:
                    # say UNAVAILABLE (retry; a stream resumes from its last
                    # resume_token), never let gRPC's stop answer CANCELLED.
                    assert task is not None
                    task.uncancel()
                    log.info("%s UNAVAILABLE: ended by shutdown caller=%s", method, caller)
                    await abort(
                        context,
                        Unavailable(
                            "the server is shutting down; retry (a stream resumes from its "
                            "last resume_token)"
                        ),
                    )
                    return None
                # grpc.aio cancelled the task (the client cancelled, its deadline passed
                # or its connection dropped), or a stream write failed (`Call.send`):
                # nobody is left to answer. Log it, and let the cancellation end the task.
                log.info(
                    "%s CANCELLED caller=%s %.1fms%s",
                    method,
                    caller,
                    (time.perf_counter() - started) * 1000,
                    f" ({cancelled.args[0]})" if cancelled.args else "",
                )
                raise
            except DomainError as error:
                if isinstance(error, EtagMismatch) and error.current_version is not None:
                    error.metadata["current_etag"] = etag_of(error.current_version)
                log.info(
                    "%s %s reason=%s caller=%s %.1fms",
                    method,
                    error.code.name,
                    error.reason,
                    caller,
                    (time.perf_counter() - started) * 1000,
                )
                await abort(context, error)
            except Exception:
                error_id = uuid.uuid4().hex
                log.exception("%s INTERNAL error_id=%s caller=%s", method, error_id, caller)
                await abort(context, Internal(error_id))
            finally:
                if task is not None:
                    drain.leave(task)
            return None

        return handle
