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
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from service.api.convert import etag_of
from service.auth import ANONYMOUS, Authenticator
from service.deadline import CURRENT_CALL, CallScope
from service.draining import Drain
from service.errors import (
    Aborted,
    CallTimeout,
    DeadlineExceeded,
    DomainError,
    EtagMismatch,
    Internal,
    InvalidArgument,
    Overloaded,
    Unavailable,
    abort,
)
from service.observability.calls import (
    SERVER_STREAM,
    UNARY,
    MethodObserver,
    Observability,
    code_after,
)
from service.repositories.uow import read_from_primary

log = logging.getLogger("service.rpc")

# Metadata by which a caller that must read its own writes sends its reads to the primary.
READ_CONSISTENCY = "x-read-consistency"

Context = grpc.aio.ServicerContext[Any, Any]


class Call:
    """What a servicer method gets besides its request: the caller and the stream writer."""

    __slots__ = ("_idle_timeout", "_observer", "caller", "context", "method", "sent")

    def __init__(
        self,
        context: Context,
        method: str,
        caller: str,
        idle_timeout: float,
        observer: MethodObserver | None = None,
    ) -> None:
        self.context = context
        self.method = method
        self.caller = caller
        self._idle_timeout = idle_timeout
        self._observer = observer
        self.sent = 0  # stream messages written so far

    async def send(self, message: protobuf_message.Message, rows: int = 0) -> None:
        """Write one stream message (of `rows` rows); a client that reads nothing for the
        idle timeout is ended with ABORTED STREAM_STALLED (its last resume token still
        works)."""
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
        if self._observer is not None:
            self._observer.sent(rows)


class CallLimiter:
    """MAX_CONCURRENT_RPCS: calls in flight beyond the limit are shed at once
    (RESOURCE_EXHAUSTED OVERLOADED), not queued. Health and reflection never pass here."""

    __slots__ = ("in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0


def _wants_strong_reads(metadata: Any) -> bool:
    """`x-read-consistency: strong` metadata: this call's reads go to the primary."""
    return any(key == READ_CONSISTENCY and value == "strong" for key, value in metadata)


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
        self,
        *,
        authenticator: Authenticator,
        idle_timeout: float,
        observability: Observability,
        default_call_timeout: float = 30.0,
        max_concurrent_rpcs: int | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.drain = drain or Drain()
        self._auth = authenticator
        self._idle_timeout = idle_timeout
        self._observability = observability
        self._default_timeout = default_call_timeout
        self._limiter = CallLimiter(max_concurrent_rpcs) if max_concurrent_rpcs else None

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
        """The handler of one method: where each call's metrics, access-log line and
        server span begin and end (service/observability), its deadline is applied,
        and overload is shed."""
        auth = self._auth
        idle_timeout = self._idle_timeout
        drain = self.drain
        default_timeout = self._default_timeout
        limiter = self._limiter
        observer = self._observability.method(method, SERVER_STREAM if streaming else UNARY)
        OK = grpc.StatusCode.OK

        async def handle(data: bytes, context: Context) -> Any:
            metadata = context.invocation_metadata() or ()
            record = observer.begin(context, metadata)
            caller = "-"
            code = OK
            reason = ""
            admitted = False
            task: asyncio.Task[object] | None = None
            try:
                if drain.draining:
                    await drain.refuse(context.time_remaining())
                task = drain.enter(streaming)
                if limiter is not None:
                    if limiter.in_flight >= limiter.limit:
                        observer.shed()
                        raise Overloaded(
                            f"more than {limiter.limit} calls in flight; retry after a pause"
                        )
                    limiter.in_flight += 1
                    admitted = True
                caller = auth.caller(metadata) if auth.enabled else ANONYMOUS
                request = parse(request_class, data)
                call = Call(context, method, caller, idle_timeout, observer)
                read_from_primary(_wants_strong_reads(metadata))
                if streaming:
                    # A stream ends when the client's deadline passes or it cancels; it
                    # gets no default timeout (a long export may run for hours).
                    await run_once_more_if_transient(impl, request, call)
                    return None
                return await _bounded(
                    run_once_more_if_transient(impl, request, call), context, default_timeout
                )
            except asyncio.CancelledError as cancelled:
                if drain.ended_by_shutdown(task) and not context.cancelled():
                    # Shutdown reached its grace deadline with this call still running:
                    # say UNAVAILABLE (retry; a stream resumes from its last
                    # resume_token), never let gRPC's stop answer CANCELLED.
                    assert task is not None
                    task.uncancel()
                    ended = Unavailable(
                        "the server is shutting down; retry (a stream resumes from its "
                        "last resume_token)"
                    )
                    code, reason = ended.code, ended.reason
                    await abort(context, ended, record.trailing_metadata)
                    return None
                # grpc.aio cancelled the task (the client cancelled, its deadline passed
                # or its connection dropped), or a stream write failed (`Call.send`):
                # nobody is left to answer. The access line says CANCELLED (or
                # DEADLINE_EXCEEDED); the cancellation ends the task and its finally
                # blocks give the connection back.
                code = code_after(context, cancelled)
                if cancelled.args and log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s (%s)", method, code.name, cancelled.args[0])
                raise
            except DomainError as error:
                if isinstance(error, EtagMismatch) and error.current_version is not None:
                    error.metadata["current_etag"] = etag_of(error.current_version)
                code, reason = error.code, error.reason
                await abort(context, error, record.trailing_metadata)
            except Exception:
                error_id = uuid.uuid4().hex
                code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
                log.exception("%s INTERNAL error_id=%s caller=%s", method, error_id, caller)
                await abort(context, Internal(error_id), record.trailing_metadata)
            finally:
                if task is not None:
                    drain.leave(task)
                if admitted:
                    limiter.in_flight -= 1  # type: ignore[union-attr]
                observer.end(record, context, code, reason, caller)
            return None

        return handle


# The server gives up this much before the client's deadline (a quarter of a short
# one), so its CancelRequest and ROLLBACK finish before grpc.aio cancels the handler
# at the deadline itself (which would make SQLAlchemy discard the connection).
DEADLINE_MARGIN = 0.05
# How long a cancelled statement may take to end before the call's task is cancelled.
CANCEL_GRACE = 1.0


async def _bounded(work: Awaitable[Any], context: Context, default_timeout: float) -> Any:
    """Run a unary call within the client's deadline, or DEFAULT_CALL_TIMEOUT without one.

    The deadline bounds everything the call waits for. Waiting for a pool connection
    (which otherwise ends at DB_POOL_TIMEOUT, whichever is first), the task is
    cancelled. Inside a statement, the statement is cancelled on the server
    (service/deadline.py, db/cancel.py): it fails, the transaction rolls back and the
    connection goes back to the pool clean; only if it has not ended within
    CANCEL_GRACE is the task cancelled too."""
    remaining = context.time_remaining()
    own = remaining is None or remaining > default_timeout
    if own:
        timeout = default_timeout
    else:
        assert remaining is not None
        timeout = max(0.0, remaining - min(DEADLINE_MARGIN, remaining / 4))
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    scope = CallScope()
    timers: list[asyncio.TimerHandle] = []
    ours = [False]  # whether the task's cancellation is ours

    def cancel_task() -> None:
        ours[0] = True
        task.cancel()

    def expire() -> None:
        scope.expired = True
        if scope.cancel_statements():
            timers.append(loop.call_later(CANCEL_GRACE, cancel_task))
        else:
            cancel_task()

    token = CURRENT_CALL.set(scope)
    timers.append(loop.call_later(timeout, expire))
    try:
        return await work
    except asyncio.CancelledError:
        if ours[0] and task.uncancel() == 0:
            raise _expired(own, default_timeout) from None
        raise
    except Exception as error:
        if scope.expired:
            raise _expired(own, default_timeout) from error
        raise
    finally:
        for timer in timers:
            timer.cancel()
        CURRENT_CALL.reset(token)


def _expired(own: bool, default_timeout: float) -> DeadlineExceeded:
    if own:
        return CallTimeout(
            f"the call ran for DEFAULT_CALL_TIMEOUT ({default_timeout:g}s) without a "
            "client deadline"
        )
    return DeadlineExceeded("the client's deadline passed")
