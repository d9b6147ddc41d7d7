"""A blog.v1 client other services can copy: balancing, retries, deadlines, resumption.

    python examples/python_client.py dns:///blog.default.svc.cluster.local:50051

What it does, and why:
- `dns:///host:port` with `round_robin`: the resolver returns every address of a
  headless Kubernetes Service (one per pod) and each call goes to the next one. A
  plain ClusterIP Service gives one address, so one HTTP/2 connection and one pod
  for the channel's whole life; see docs/SCALING.md.
- Keepalive within what the server accepts: a ping every 60 s (the server pings
  every 60 s itself and refuses pings more often than every 10 s without data), never
  while idle, so the server never answers GOAWAY "too_many_pings".
- A service config retry policy for UNAVAILABLE only (a lost connection, a server
  draining, the database unreachable): reads are always safe to retry; creates only
  because this client always sends a request_id, which makes a retried create return
  the first result instead of creating twice (AIP-155). Updates and deletes are not
  retried by the channel: an update that committed before the connection dropped would
  be applied again (send an etag to make a retry safe, then retry it yourself).
- Every call has a deadline, and an `x-request-id` (echoed in the server's access log
  and trailing metadata) so one call can be followed across services.
- Streams resume from the last `resume_token` after UNAVAILABLE or ABORTED (a server
  restart, a stalled client, a replica cancelling a long read), so every row arrives
  exactly once.
- `strong=True` on a read sends `x-read-consistency: strong`: served by the primary,
  so a caller reads its own write even when reads normally go to a lagging replica.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from blog.v1 import user_pb2, user_pb2_grpc

T = TypeVar("T")

READ_METHODS = ("GetUser", "ListUsers")
CREATE_METHODS = ("CreateUser", "BatchCreateUsers")
POST_READS = ("GetPost", "ListPosts")
POST_CREATES = ("CreatePost",)

# Retries inside the channel: a few quick attempts cover a connection that broke or a
# pod that is draining (the next attempt goes to another address under round_robin).
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "blog.v1.UserService", "method": m} for m in READ_METHODS]
            + [{"service": "blog.v1.PostService", "method": m} for m in POST_READS]
            + [{"service": "blog.v1.UserService", "method": m} for m in CREATE_METHODS]
            + [{"service": "blog.v1.PostService", "method": m} for m in POST_CREATES],
            "retryPolicy": _RETRY_POLICY,
            "waitForReady": True,
            "timeout": "10s",
        }
    ],
    # Retries may not grow the load without bound when the service is in trouble.
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # Keepalive: at most what the server permits (it refuses pings more often than
    # every 10 s without data; keep a wide margin), and never while no call is open.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    # Reconnect quickly after a pod restarts, but back off to at most 5 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # Re-resolve DNS at most every 5 s (new pods appear without waiting for a failure).
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
]

# A call that is safe to repeat (a read, a create with its request_id) is retried after
# these; a passed deadline is one attempt's, not the caller's whole budget. CANCELLED
# reaches a caller that did not cancel only when the server or a proxy reset the call
# (a pod stopping past its grace period): for a repeatable call, one more reason to retry.
RETRY_SAFE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)
# Streams resume after these; anything else is the caller's to handle.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED)


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    extra_options: Sequence[tuple[str, Any]] = (),
) -> Any:
    """A channel to `target` (`dns:///host:port`; a plain `host:port` works too)."""
    options = [*CHANNEL_OPTIONS, *extra_options]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def _metadata(token: str | None, *, strong: bool = False) -> list[tuple[str, str]]:
    metadata = [("x-request-id", uuid.uuid4().hex)]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if strong:
        metadata.append(("x-read-consistency", "strong"))
    return metadata


class BlogClient:
    """The calls another service typically makes, each with a deadline and request id."""

    def __init__(
        self,
        channel: Any,
        *,
        token: str | None = None,
        deadline: float = 5.0,
        create_window: float = 30.0,
    ) -> None:
        self.users = user_pb2_grpc.UserServiceStub(channel)
        self._token = token
        self._deadline = deadline
        self._create_window = create_window
        # How often a stream was reopened from its resume_token and a create retried:
        # worth exporting as metrics in a real client.
        self.stream_resumes = 0
        self.create_retries = 0
        self.retried_codes: Counter[str] = Counter()

    async def get_user(self, user_id: int, *, strong: bool = False) -> user_pb2.User:
        return await self.users.GetUser(
            user_pb2.GetUserRequest(id=user_id),
            timeout=self._deadline,
            metadata=_metadata(self._token, strong=strong),
        )

    async def create_user(
        self, user: user_pb2.User, *, request_id: str | None = None
    ) -> user_pb2.User:
        """Create once, however often the connection breaks: the request_id is chosen
        once, before the first attempt, and every retry sends the same one."""
        request = user_pb2.CreateUserRequest(user=user, request_id=request_id or str(uuid.uuid4()))
        return await self._retry_safe(
            lambda: self.users.CreateUser(
                request, timeout=self._deadline, metadata=_metadata(self._token)
            )
        )

    async def _retry_safe(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Beyond the channel's own quick retries: keep retrying for up to
        `create_window` seconds (a whole deployment restarting), with jittered backoff.
        Only for calls that are safe to repeat, such as a create with its request_id:
        then an attempt whose deadline passed may be retried too (it may have committed;
        the retry returns that result)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._create_window
        delay = 0.1
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRY_SAFE or loop.time() > give_up:
                    raise
                self.create_retries += 1
                self.retried_codes[error.code().name] += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)

    async def stream_users(
        self,
        request: user_pb2.StreamUsersRequest,
        *,
        max_resumes: int = 20,
        strong: bool = False,
        message_deadline: float | None = None,
    ) -> AsyncIterator[Sequence[user_pb2.User]]:
        """Yield each message's users; after UNAVAILABLE or ABORTED, reopen the stream
        from the last resume_token received, so no row is missed or repeated."""
        resumed = user_pb2.StreamUsersRequest()
        resumed.CopyFrom(request)  # the caller's request stays as it was
        resumes = 0
        while True:
            call = self.users.StreamUsers(
                resumed,
                metadata=_metadata(self._token, strong=strong),
                timeout=message_deadline,
                wait_for_ready=True,
            )
            try:
                async for message in call:
                    resumed.resume_token = message.resume_token
                    resumes = 0  # progress was made: the budget is per outage
                    yield message.users
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RESUMABLE or resumes >= max_resumes:
                    raise
                resumes += 1
                self.stream_resumes += 1
                self.retried_codes[error.code().name] += 1
                await asyncio.sleep(min(0.1 * 2**resumes, 2.0) * random.uniform(0.5, 1.5))
            finally:
                call.cancel()


async def _demo(target: str) -> None:
    async with open_channel(target) as channel:
        client = BlogClient(channel)
        suffix = uuid.uuid4().hex[:8]
        user = await client.create_user(
            user_pb2.User(username=f"demo_{suffix}", email=f"demo_{suffix}@example.com")
        )
        print("created", user.id)
        print("read back (strong)", (await client.get_user(user.id, strong=True)).username)
        rows = 0
        async for users in client.stream_users(user_pb2.StreamUsersRequest()):
            rows += len(users)
        print("streamed", rows, "users")


if __name__ == "__main__":
    asyncio.run(_demo(sys.argv[1] if len(sys.argv) > 1 else "dns:///localhost:50051"))
