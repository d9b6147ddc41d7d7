"""Load-generating client processes: grpc.aio on uvloop, closed or open loop.

A `ClientPool` spawns its processes once (multiprocessing "spawn": a fresh
interpreter, never a fork of a process holding gRPC state) and reuses them for
every scenario. Each run follows one protocol over a pipe:

    parent -> ("run", LoadSpec)      child opens channels, makes one checked call
    child  -> ("ready", info)
    parent -> ("go", t0)             a time.monotonic() instant shared by all children
    child  -> ("result", dict)       after warm-up + measured window

Requests and responses travel as bytes (no serializer on the channel): the client
builds each request message itself and parses only the first response (to check
it), so the clients spend their CPU on gRPC, not on protobuf. A failed call is
never counted as a call: failures are counted by status code, separately.
Calls count in the window by their completion time (closed loop) or by their
scheduled time (open loop, where latency runs from the scheduled instant, so a
stalled server cannot hide its queue: no coordinated omission).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import multiprocessing
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

USER_SERVICE = "/blog.v1.UserService/"
POST_SERVICE = "/blog.v1.PostService/"


@dataclass
class LoadSpec:
    target: str
    workload: str
    params: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 16  # calls in flight per process (closed loop)
    channels: int = 4  # separate HTTP/2 connections per process
    warmup: float = 1.0
    duration: float = 5.0
    rate: float = 0.0  # calls/s per process: open loop when > 0
    timeout: float = 10.0
    max_outstanding: int = 2000  # open loop: beyond this the client is overloaded
    seed: int = 0


# -- workloads (run inside the client processes) -------------------------------------------


class Workload:
    method = ""
    streaming = False

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        self.params = params
        self.rng = rng
        self.index = index

    def request(self) -> bytes:
        raise NotImplementedError

    def check(self, response: bytes) -> None:
        """Raise if the first response is not what the scenario expects."""

    def rows(self) -> int:
        """Rows a call moves (for rows/s)."""
        return 1


class GetUser(Workload):
    method = USER_SERVICE + "GetUser"

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        super().__init__(params, rng, index)
        from blog.v1 import user_pb2

        self._pb = user_pb2
        self._n = int(params["users"])
        self._view = int(params.get("view", 0))

    def request(self) -> bytes:
        return self._pb.GetUserRequest(
            id=self.rng.randint(1, self._n),
            view=self._view,  # type: ignore[arg-type]
        ).SerializeToString()

    def check(self, response: bytes) -> None:
        user = self._pb.User.FromString(response)
        if user.id <= 0 or not user.username:
            raise AssertionError(f"GetUser answered {user!r}")


class ListPosts(Workload):
    method = POST_SERVICE + "ListPosts"

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        super().__init__(params, rng, index)
        from blog.v1 import post_pb2

        self._pb = post_pb2
        self._size = int(params.get("page_size", 50))
        self._requests = [
            post_pb2.ListPostsRequest(
                page_size=self._size,
                page_token=token,
                view=int(params.get("view", 0)),  # type: ignore[arg-type]
            ).SerializeToString()
            for token in params.get("tokens", [""])
        ]

    def request(self) -> bytes:
        return self.rng.choice(self._requests)

    def check(self, response: bytes) -> None:
        page = self._pb.ListPostsResponse.FromString(response)
        if len(page.posts) != self._size:
            raise AssertionError(f"ListPosts returned {len(page.posts)} posts, not {self._size}")
        if self.params.get("view") == self._pb.POST_VIEW_FULL and not page.posts[0].author.id:
            raise AssertionError("ListPosts FULL returned posts without their author")


class CreatePost(Workload):
    method = POST_SERVICE + "CreatePost"

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        super().__init__(params, rng, index)
        from blog.v1 import post_pb2

        self._pb = post_pb2
        self._n = int(params["users"])
        self._tags = list(params["tags"])
        self._bodies = [
            " ".join(rng.choice(("bench", "post", "body", "grpc", "words")) for _ in range(80))
            for _ in range(16)
        ]

    def request(self) -> bytes:
        rng = self.rng
        post = self._pb.Post(
            author_id=rng.randint(1, self._n),
            title=f"Bench post {rng.getrandbits(32):08x}",
            body=rng.choice(self._bodies),
            tags=rng.sample(self._tags, 2),
        )
        return self._pb.CreatePostRequest(post=post).SerializeToString()

    def check(self, response: bytes) -> None:
        post = self._pb.Post.FromString(response)
        if post.id <= 0 or len(post.tags) != 2:
            raise AssertionError(f"CreatePost answered {post!r}")


class UpdateUser(Workload):
    method = USER_SERVICE + "UpdateUser"

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        super().__init__(params, rng, index)
        from google.protobuf import field_mask_pb2

        from blog.v1 import user_pb2

        self._pb = user_pb2
        self._mask = field_mask_pb2.FieldMask(paths=["display_name"])
        self._n = int(params["users"])

    def request(self) -> bytes:
        rng = self.rng
        user = self._pb.User(id=rng.randint(1, self._n), display_name=f"Renamed {rng.random():.6f}")
        return self._pb.UpdateUserRequest(user=user, update_mask=self._mask).SerializeToString()

    def check(self, response: bytes) -> None:
        user = self._pb.User.FromString(response)
        if user.id <= 0 or not user.display_name.startswith("Renamed"):
            raise AssertionError(f"UpdateUser answered {user!r}")


class BatchCreateUsers(Workload):
    method = USER_SERVICE + "BatchCreateUsers"

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        super().__init__(params, rng, index)
        from blog.v1 import user_pb2

        self._pb = user_pb2
        self._batch = int(params.get("batch", 1000))
        self._prefix = f"b{params['prefix']}{index}"
        self._counter = 0

    def request(self) -> bytes:
        pb = self._pb
        self._counter += 1
        stem = f"{self._prefix}_{self._counter}_"
        return pb.BatchCreateUsersRequest(  # type: ignore[no-any-return]
            requests=[
                pb.CreateUserRequest(
                    user=pb.User(
                        username=f"{stem}{i}",
                        email=f"{stem}{i}@bench.example.com",
                        display_name=f"Batch {stem}{i}",
                    )
                )
                for i in range(self._batch)
            ]
        ).SerializeToString()

    def rows(self) -> int:
        return self._batch

    def check(self, response: bytes) -> None:
        got = len(self._pb.BatchCreateUsersResponse.FromString(response).users)
        if got != self._batch:
            raise AssertionError(f"BatchCreateUsers created {got}, not {self._batch}")


class StreamPosts(Workload):
    method = POST_SERVICE + "StreamPosts"
    streaming = True

    def __init__(self, params: dict[str, Any], rng: random.Random, index: int) -> None:
        super().__init__(params, rng, index)
        from blog.v1 import post_pb2

        self._pb = post_pb2

    def request(self) -> bytes:
        view = int(self.params.get("view", 0))
        return self._pb.StreamPostsRequest(view=view).SerializeToString()  # type: ignore[arg-type]

    def count(self, message: bytes) -> int:
        return len(self._pb.StreamPostsResponse.FromString(message).posts)


WORKLOADS: dict[str, type[Workload]] = {
    "get_user": GetUser,
    "list_posts": ListPosts,
    "create_post": CreatePost,
    "update_user": UpdateUser,
    "batch_create_users": BatchCreateUsers,
    "stream_posts": StreamPosts,
}


# -- the child process ----------------------------------------------------------------------


def _channel_options(i: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
        ("bench.channel_index", i),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]


async def _run(spec: LoadSpec, conn: Connection, progress: Any, index: int) -> dict[str, Any]:
    import grpc

    rng = random.Random(spec.seed * 1000 + index)
    workload = WORKLOADS[spec.workload](spec.params, rng, index)
    channels = [
        grpc.aio.insecure_channel(spec.target, options=_channel_options(i))
        for i in range(spec.channels)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout=15)
        if workload.streaming:
            return await _stream(spec, conn, progress, workload, channels[0])
        calls: list[Any] = [
            ch.unary_unary(workload.method, request_serializer=None, response_deserializer=None)
            for ch in channels
        ]
        for call in calls:  # every connection carries a checked call before the clock starts
            workload.check(await call(workload.request(), timeout=spec.timeout))
        _quiet_gc()
        conn.send(("ready", {"channels": len(channels)}))
        _, t0 = conn.recv()
        if spec.rate > 0:
            return await _open_loop(spec, workload, calls, t0)
        return await _closed_loop(spec, workload, calls, t0)
    finally:
        for ch in channels:
            await ch.close()


def _quiet_gc() -> None:
    """Move everything alive now (grpc, protobuf, the workload) out of the collector's
    reach: a full collection over ~100k start-up objects pauses a process for tens of
    milliseconds, which would show up as the server's tail latency."""
    gc.collect()
    gc.freeze()


def _error_key(error: BaseException) -> tuple[str, str]:
    import grpc

    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name, f"{error.code().name}: {error.details()}"
    return f"CLIENT_{type(error).__name__}", f"{type(error).__name__}: {error}"


def _result(
    ok: int, lat: array.array[float], errors: Counter[str], first_error: str | None, rows: int
) -> dict[str, Any]:
    return {
        "ok": ok,
        "rows": rows,
        "latencies": lat.tobytes(),
        "errors": dict(errors),
        "first_error": first_error,
    }


async def _closed_loop(
    spec: LoadSpec, workload: Workload, calls: list[Any], t0: float
) -> dict[str, Any]:
    measure_from = t0 + spec.warmup
    end = measure_from + spec.duration
    lat: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    state: dict[str, Any] = {"ok": 0, "first_error": None}
    rows_per_call = workload.rows()
    monotonic = time.monotonic
    timeout = spec.timeout
    await asyncio.sleep(max(0.0, t0 - monotonic()))

    async def worker(call: Any) -> None:
        while True:
            started = monotonic()
            if started >= end:
                return
            request = workload.request()
            try:
                await call(request, timeout=timeout)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                done = monotonic()
                if measure_from <= done < end:
                    key, text = _error_key(error)
                    errors[key] += 1
                    state["first_error"] = state["first_error"] or text
                continue
            done = monotonic()
            if measure_from <= done < end:
                lat.append(done - started)
                state["ok"] += 1

    workers = [
        asyncio.ensure_future(worker(calls[i % len(calls)])) for i in range(spec.concurrency)
    ]
    _, pending = await asyncio.wait(workers, timeout=end - monotonic() + timeout + 5)
    for task in pending:
        task.cancel()
    return _result(state["ok"], lat, errors, state["first_error"], state["ok"] * rows_per_call)


async def _open_loop(
    spec: LoadSpec, workload: Workload, calls: list[Any], t0: float
) -> dict[str, Any]:
    measure_from = t0 + spec.warmup
    end = measure_from + spec.duration
    lat: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    state: dict[str, Any] = {"ok": 0, "first_error": None}
    monotonic = time.monotonic
    interval = 1.0 / spec.rate
    tasks: set[asyncio.Task[None]] = set()

    async def one(call: Any, scheduled: float) -> None:
        try:
            await call(workload.request(), timeout=spec.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if scheduled >= measure_from:
                key, text = _error_key(error)
                errors[key] += 1
                state["first_error"] = state["first_error"] or text
            return
        if scheduled >= measure_from:
            lat.append(monotonic() - scheduled)
            state["ok"] += 1

    scheduled = t0
    n = 0
    await asyncio.sleep(max(0.0, t0 - monotonic()))
    while scheduled < end:
        now = monotonic()
        while scheduled <= now and scheduled < end:
            if len(tasks) >= spec.max_outstanding:
                if scheduled >= measure_from:
                    errors["CLIENT_OVERLOADED"] += 1
            else:
                task = asyncio.ensure_future(one(calls[n % len(calls)], scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
            scheduled = t0 + n * interval
        await asyncio.sleep(max(0.0, scheduled - monotonic()))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=spec.timeout + 5)
        for task in pending:
            task.cancel()
    return _result(state["ok"], lat, errors, state["first_error"], state["ok"])


async def _stream(
    spec: LoadSpec, conn: Connection, progress: Any, workload: Any, channel: Any
) -> dict[str, Any]:
    _quiet_gc()
    conn.send(("ready", {"channels": 1}))
    _, t0 = conn.recv()
    monotonic = time.monotonic
    await asyncio.sleep(max(0.0, t0 - monotonic()))
    errors: Counter[str] = Counter()
    first_error = None
    rows = 0
    messages = 0
    gaps: array.array[float] = array.array("d")
    started = monotonic()
    first = None
    last = started
    call = channel.unary_stream(
        workload.method, request_serializer=None, response_deserializer=None
    )(workload.request(), timeout=spec.timeout)
    try:
        async for message in call:
            now = monotonic()
            if first is None:
                first = now - started
            gaps.append(now - last)
            last = now
            rows += workload.count(message)
            messages += 1
            progress.value = rows
    except Exception as error:
        key, first_error = _error_key(error)
        errors[key] += 1
    elapsed = monotonic() - started
    return {
        "ok": 1 if not errors else 0,
        "rows": rows,
        "messages": messages,
        "elapsed": elapsed,
        "first_message": first,
        "latencies": gaps.tobytes(),
        "errors": dict(errors),
        "first_error": first_error,
    }


def client_main(conn: Connection, progress: Any, index: int) -> None:
    import signal

    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when clients stop

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        spec: LoadSpec = message[1]
        try:
            result = uvloop.run(_run(spec, conn, progress, index))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("result", result))


# -- the parent side ------------------------------------------------------------------------


class ClientError(RuntimeError):
    pass


@dataclass
class Merged:
    ok: int
    rows: int
    latencies: list[float]  # seconds, sorted
    errors: dict[str, int]
    first_error: str | None
    raw: list[dict[str, Any]]


def merge(results: list[dict[str, Any]]) -> Merged:
    lat: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    first_error = None
    for result in results:
        part: array.array[float] = array.array("d")
        part.frombytes(result["latencies"])
        lat.extend(part)
        errors.update(result["errors"])
        first_error = first_error or result["first_error"]
    return Merged(
        ok=sum(r["ok"] for r in results),
        rows=sum(r["rows"] for r in results),
        latencies=sorted(lat),
        errors=dict(errors),
        first_error=first_error,
        raw=results,
    )


class ClientPool:
    """N spawned client processes, reused across scenarios."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._procs = []
        self._conns: list[Connection] = []
        self.progress = []
        for i in range(size):
            parent, child = context.Pipe()
            progress = context.Value("q", 0, lock=False)
            proc = context.Process(
                target=client_main, args=(child, progress, i), name=f"bench-client-{i}", daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
            self.progress.append(progress)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def size(self) -> int:
        return len(self._procs)

    def _recv(self, i: int, timeout: float, expect: str) -> Any:
        conn = self._conns[i]
        if not conn.poll(timeout):
            raise ClientError(f"client {i} sent nothing for {timeout:.0f}s (waiting for {expect})")
        kind, payload = conn.recv()
        if kind == "error":
            raise ClientError(f"client {i} failed:\n{payload}")
        if kind != expect:
            raise ClientError(f"client {i} sent {kind}, expected {expect}")
        return payload

    def start(self, specs: list[LoadSpec]) -> float:
        """Send the specs to the first len(specs) clients, wait until all are ready, and
        release them together; returns the shared start instant t0."""
        for i, spec in enumerate(specs):
            self.progress[i].value = 0
            self._conns[i].send(("run", spec))
        for i in range(len(specs)):
            self._recv(i, 60, "ready")
        t0 = time.monotonic() + 0.05
        for i in range(len(specs)):
            self._conns[i].send(("go", t0))
        return t0

    def results(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [
            self._recv(i, max(1.0, deadline - time.monotonic()), "result") for i in range(count)
        ]

    def poll_done(self, count: int) -> bool:
        return all(self._conns[i].poll(0) for i in range(count))

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop", None))
        for proc in self._procs:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)
