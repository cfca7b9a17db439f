"""Tests of the WAN relay: delay per direction, ordering, integrity, bandwidth, gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from slomesh.wan_relay import RelaySpec, WanRelay, build_parser


async def _echo_server() -> tuple[asyncio.base_events.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout=30)


class TestRelaySpec:
    def test_parse_round_trip(self) -> None:
        spec = RelaySpec.parse("wdc->fra@40001=127.0.0.1:50051=43")
        assert spec.name == "wdc->fra"
        assert (spec.listen_port, spec.target_host, spec.target_port) == (40001, "127.0.0.1", 50051)
        assert spec.one_way_delay_ms == 43.0
        assert spec.bandwidth_bytes_per_s is None
        assert RelaySpec.parse(spec.format()) == spec

    def test_parse_bandwidth_and_fraction(self) -> None:
        spec = RelaySpec.parse("9000=agent:50051=7.5=1e6")
        assert spec.one_way_delay_ms == 7.5
        assert spec.bandwidth_bytes_per_s == 1e6
        assert spec.name == ""

    @pytest.mark.parametrize("bad", ["9000=host=5", "x=host:1=5", "9000=host:1", "9000=host:p=5"])
    def test_parse_rejects(self, bad: str) -> None:
        with pytest.raises(ValueError, match="expected"):
            RelaySpec.parse(bad)

    def test_cli_requires_relay(self) -> None:
        with pytest.raises(SystemExit):
            build_parser().parse_args([])

    def test_rejects_negative_delay(self) -> None:
        with pytest.raises(ValueError, match="one_way_delay_ms"):
            WanRelay("127.0.0.1", 0, "127.0.0.1:1", -1)


async def test_round_trip_is_about_twice_the_delay() -> None:
    server, port = await _echo_server()
    delay_ms = 60.0
    async with WanRelay("127.0.0.1", 0, ("127.0.0.1", port), delay_ms) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        rtts = []
        for i in range(5):
            t0 = time.perf_counter()
            writer.write(b"ping%d" % i)
            await writer.drain()
            got = await _read_exactly(reader, 5)
            rtts.append((time.perf_counter() - t0) * 1000)
            assert got == b"ping%d" % i
        writer.close()
    server.close()
    # Each direction is delayed once: RTT >= 2 x delay, and not grossly more.
    assert min(rtts) >= 2 * delay_ms - 1.0
    assert sorted(rtts)[len(rtts) // 2] < 2 * delay_ms + 150


async def test_back_to_back_chunks_are_not_delayed_cumulatively() -> None:
    server, port = await _echo_server()
    delay_ms = 100.0
    n = 20
    async with WanRelay("127.0.0.1", 0, ("127.0.0.1", port), delay_ms) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        t0 = time.perf_counter()
        for i in range(n):
            writer.write(b"%04d" % i)
            await writer.drain()
            await asyncio.sleep(0.005)
        got = await _read_exactly(reader, 4 * n)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        writer.close()
    server.close()
    assert got == b"".join(b"%04d" % i for i in range(n))
    # Serial delays would take n x 2 x delay = 4 s; pipelined ones about 2 x delay + n x 5 ms.
    assert 2 * delay_ms <= elapsed_ms < 1500


async def test_large_payload_intact_and_ordered() -> None:
    server, port = await _echo_server()
    payload = os.urandom(4 * 1024 * 1024)
    async with WanRelay("127.0.0.1", 0, ("127.0.0.1", port), 5.0) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)

        async def send() -> None:
            view = memoryview(payload)
            for off in range(0, len(payload), 10_000):
                writer.write(view[off : off + 10_000])
                await writer.drain()

        sender = asyncio.create_task(send())
        got = await _read_exactly(reader, len(payload))
        await sender
        writer.write_eof()
        # The echo server half-closes after our EOF crosses the relay: EOF comes back.
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
    server.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_bandwidth_cap_limits_throughput() -> None:
    server, port = await _echo_server()
    nbytes = 200_000
    bandwidth = 1_000_000.0  # 1 MB/s each way: >= 0.2 s out and 0.2 s back, pipelined
    async with WanRelay(
        "127.0.0.1", 0, ("127.0.0.1", port), 1.0, bandwidth_bytes_per_s=bandwidth
    ) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        t0 = time.perf_counter()
        writer.write(b"x" * nbytes)
        await writer.drain()
        got = await _read_exactly(reader, nbytes)
        elapsed_s = time.perf_counter() - t0
        writer.close()
    server.close()
    assert got == b"x" * nbytes
    assert elapsed_s >= nbytes / bandwidth * 0.9


async def test_unreachable_target_closes_client() -> None:
    from slomesh.procs import free_port

    dead_port = free_port()
    async with WanRelay("127.0.0.1", 0, ("127.0.0.1", dead_port), 1.0) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()


async def test_carries_grpc_and_stop_closes_connections() -> None:
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
    delay_ms = 40.0
    relay = await WanRelay("127.0.0.1", 0, f"127.0.0.1:{port}", delay_ms).start()
    try:
        async with grpc.aio.insecure_channel(relay.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            t0 = time.perf_counter()
            for _ in range(3):
                await stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
            per_call_ms = (time.perf_counter() - t0) * 1000 / 3
            assert per_call_ms >= 2 * delay_ms - 1.0
            # A streaming RPC (HTTP/2 frames both ways, long-lived) goes through too.
            call = stub.Watch(health_pb2.HealthCheckRequest(service="svc"))
            first = await asyncio.wait_for(call.read(), timeout=10)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await health_servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
            second = await asyncio.wait_for(call.read(), timeout=10)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            call.cancel()
            await relay.stop()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=2)
            assert err.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
    finally:
        await relay.stop()
        await server.stop(0)


async def test_bandwidth_cap_is_shared_by_the_relays_connections() -> None:
    """The cap is the emulated link's: the connections through one relay share it."""
    server, port = await _echo_server()
    nbytes = 100_000
    bandwidth = 1_000_000.0
    async with WanRelay(
        "127.0.0.1", 0, ("127.0.0.1", port), 1.0, bandwidth_bytes_per_s=bandwidth
    ) as relay:
        conns = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(3)]
        t0 = time.perf_counter()
        for _, writer in conns:
            writer.write(b"y" * nbytes)
        got = await asyncio.gather(*(_read_exactly(reader, nbytes) for reader, _ in conns))
        elapsed_s = time.perf_counter() - t0
        for _, writer in conns:
            writer.close()
    server.close()
    assert got == [b"y" * nbytes] * 3
    # Each direction carries 3 x nbytes at the shared rate (~0.3 s; a cap per connection would
    # take ~0.17 s: 0.1 s out, pipelined with the way back).
    assert elapsed_s >= 3 * nbytes / bandwidth * 0.9


def test_relay_plan_arg_carries_the_link_capacity() -> None:
    from slomesh.launcher import RelayPlan

    plan = RelayPlan("tokyo", "frankfurt", 41000, "127.0.0.1:50052", 114.0, 2.5e8)
    spec = RelaySpec.parse(plan.relay_arg)
    assert (spec.name, spec.listen_port, spec.target_port) == ("tokyo->frankfurt", 41000, 50052)
    assert spec.one_way_delay_ms == 114.0
    assert spec.bandwidth_bytes_per_s == 2.5e8
    uncapped = RelayPlan("tokyo", "frankfurt", 41000, "127.0.0.1:50052", 114.0)
    assert RelaySpec.parse(uncapped.relay_arg).bandwidth_bytes_per_s is None
