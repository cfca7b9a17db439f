"""The shared infrastructure helpers against real nats-server / redis-server processes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from slomesh import bus
from slomesh.service import start_grpc_server
from slomesh.telemetry import extract_context
from slomesh.v1 import state_pb2

pytestmark = pytest.mark.integration


async def test_publish_carries_protobuf_and_trace_context(nats_server):
    nc = await bus.connect_nats(nats_server.url, "test")
    received: asyncio.Queue = asyncio.Queue()

    async def handler(msg):
        await received.put(msg)

    await nc.subscribe(bus.ALL_STATES, cb=handler)
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("publish") as span:
        await bus.publish(nc, bus.state_subject("tokyo"), state_pb2.RegionState(region="tokyo", seq=7))
    msg = await asyncio.wait_for(received.get(), 5)
    state = state_pb2.RegionState.FromString(msg.data)
    assert (state.region, state.seq) == ("tokyo", 7)
    assert bus.region_of_subject(msg.subject) == "tokyo"
    from opentelemetry import trace

    ctx = trace.get_current_span(extract_context(msg.headers)).get_span_context()
    assert ctx.trace_id == span.get_span_context().trace_id
    await nc.drain()


async def test_client_reconnects_after_nats_restart(nats_server):
    nc = await bus.connect_nats(nats_server.url, "test")
    got: asyncio.Queue = asyncio.Queue()

    async def handler(msg):
        await got.put(msg.data)

    await nc.subscribe("x.y", cb=handler)
    nats_server.stop()
    await asyncio.sleep(0.5)
    nats_server.start()
    for _ in range(100):
        if nc.is_connected:
            break
        await asyncio.sleep(0.1)
    assert nc.is_connected
    await nc.publish("x.y", b"after-restart")
    assert await asyncio.wait_for(got.get(), 5) == b"after-restart"
    await nc.drain()


async def test_redis_fixture_restarts(redis_server):
    client = aioredis.from_url(redis_server.url)
    await client.set("k", "v")
    assert await client.get("k") == b"v"
    redis_server.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.get("k")
    redis_server.start()
    await client.set("k", "w")
    assert await client.get("k") == b"w"
    await client.aclose()


async def test_grpc_server_has_health_reflection_and_graceful_stop():
    handle = await start_grpc_server([], ["slomesh.v1.Example"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="slomesh.v1.Example"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for reply in refl.ServerReflectionInfo(requests()):
            names = {s.name for s in reply.list_services_response.service}
            break
        assert {"slomesh.v1.Example", "grpc.health.v1.Health"} <= names
        await handle.set_serving(False)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await handle.stop(0.1)
