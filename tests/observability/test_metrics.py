"""/metrics over HTTP: counters move by exactly the calls made, with the right labels."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from blog.v1 import user_pb2
from conftest import Backend, running_server, settings_for
from factories import create_user_request, unique
from support.metrics import call_labels, scrape

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


async def test_health_and_reflection_are_counted(backend: Backend) -> None:
    settings = settings_for(backend.url, metrics_listen="127.0.0.1:0")
    async with running_server(settings) as live:
        port = live.server.observability.metrics_port
        assert port is not None
        health = health_pb2_grpc.HealthStub(live.channel)
        before = await scrape(port)
        for _ in range(3):
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        reflect = reflection_pb2_grpc.ServerReflectionStub(live.channel)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        responses = [response async for response in call]
        assert len(responses) == 2
        after = await scrape(port)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    check = call_labels(HEALTH, "Check")
    assert delta("grpc_server_started_total", **check) == 4
    assert delta("grpc_server_handled_total", **check, grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", **check, grpc_code="NotFound") == 1
    assert delta("grpc_server_msg_received_total", **check) == 4
    assert delta("grpc_server_msg_sent_total", **check) == 3
    assert delta("grpc_server_handling_seconds_count", **check) == 4
    buckets = {
        labels["le"]
        for name, labels, _ in after.samples
        if name == "grpc_server_handling_seconds_bucket"
    }
    assert {"0.001", "10.0", "+Inf"} <= buckets  # 1 ms to 10 s

    info = call_labels(REFLECTION, "ServerReflectionInfo", "bidi_stream")
    assert delta("grpc_server_started_total", **info) == 1
    assert delta("grpc_server_handled_total", **info, grpc_code="OK") == 1
    assert delta("grpc_server_msg_received_total", **info) == 2
    assert delta("grpc_server_msg_sent_total", **info) == 2


async def test_gauges_of_pool_readiness_and_event_loop(backend: Backend) -> None:
    settings = settings_for(
        backend.url, metrics_listen="127.0.0.1:0", db_pool_size=4, db_max_overflow=2
    )
    async with running_server(settings) as live:
        port = live.server.observability.metrics_port
        assert port is not None
        await asyncio.sleep(1.2)  # a few event-loop lag ticks
        seen = await scrape(port)
    assert seen.value("blog_db_pool_size", pool="primary") == 4
    assert seen.value("blog_db_pool_limit", pool="primary") == 6
    assert seen.value("blog_db_pool_checked_out", pool="primary") == 0
    for service in ("blog.v1.UserService", "blog.v1.PostService"):
        assert seen.value("blog_readiness", service=service) == 1
    assert "blog_event_loop_lag_seconds" in seen.names()
    assert seen.value("blog_stream_limit") == 3
    assert "process_cpu_seconds_total" in seen.names()


async def test_metrics_are_off_without_metrics_listen(backend: Backend) -> None:
    async with running_server(settings_for(backend.url)) as live:
        assert live.server.observability.metrics is None
        assert live.server.observability.metrics_port is None


USERS = "blog.v1.UserService"


async def test_service_calls_are_counted_by_method_type_and_code(backend: Backend) -> None:
    settings = settings_for(backend.url, metrics_listen="127.0.0.1:0", stream_batch_rows=2)
    async with running_server(settings) as live:
        port = live.server.observability.metrics_port
        assert port is not None
        marker = unique("m")
        created = [
            await live.users.CreateUser(create_user_request(display_name=f"{marker} {i}"))
            for i in range(5)
        ]
        before = await scrape(port)
        for user in created[:3]:
            await live.users.GetUser(user_pb2.GetUserRequest(id=user.id))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(user_pb2.GetUserRequest(id=2**62))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.users.GetUser(user_pb2.GetUserRequest(id=-1))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        messages = [
            m
            async for m in live.users.StreamUsers(
                user_pb2.StreamUsersRequest(filter=f'display_name:"{marker}"')
            )
        ]
        assert [len(m.users) for m in messages] == [2, 2, 1]
        after = await scrape(port)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    get = call_labels(USERS, "GetUser")
    assert delta("grpc_server_started_total", **get) == 5
    assert delta("grpc_server_msg_received_total", **get) == 5
    assert delta("grpc_server_handled_total", **get) == 5
    assert delta("grpc_server_handled_total", **get, grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", **get, grpc_code="NotFound") == 1
    assert delta("grpc_server_handled_total", **get, grpc_code="InvalidArgument") == 1
    assert delta("grpc_server_msg_sent_total", **get) == 3
    assert delta("grpc_server_handling_seconds_count", **get) == 5
    # Nothing else moved for GetUser's neighbours.
    assert delta("grpc_server_started_total", **call_labels(USERS, "CreateUser")) == 0

    stream = call_labels(USERS, "StreamUsers", "server_stream")
    assert delta("grpc_server_started_total", **stream) == 1
    assert delta("grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert delta("grpc_server_msg_received_total", **stream) == 1
    assert delta("grpc_server_msg_sent_total", **stream) == 3
    assert delta("blog_stream_rows_sent_total", grpc_method="StreamUsers") == 5
    assert after.value("blog_active_streams") == 0
    assert after.value("blog_db_pool_checked_out", pool="primary") == 0
