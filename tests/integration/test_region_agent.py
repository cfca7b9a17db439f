"""The region agent against a real nats-server, an in-process emulator and a raw ZMQ publisher."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
import pytest
import zmq
import zmq.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from services.region_agent.config import AgentConfig, InstanceConfig, PeerConfig
from services.region_agent.server import SENT_UNIX_NS_METADATA, RegionAgent
from slomesh import bus
from slomesh.emulator.server import EmulatorConfig, EmulatorServer
from slomesh.kv.events import BlockStored, encode_multipart
from slomesh.kv.hashing import compute_block_keys
from slomesh.kv.index import PrefixIndex
from slomesh.telemetry import grpc_metadata_inject, setup_telemetry
from slomesh.topology import Topology
from slomesh.v1 import region_agent_pb2, region_agent_pb2_grpc, state_pb2
from tests.helpers import free_port

pytestmark = pytest.mark.integration

REGION = "washington-dc"
INSTANCE = "wdc-h100-0"
SPANS = InMemorySpanExporter()
setup_telemetry("test-region-agent", extra_exporters=[SPANS])


class Collector:
    """Collects protobuf messages of one NATS subject."""

    def __init__(self, message_type):
        self.type = message_type
        self.items: list = []
        self.times: list[float] = []
        self.event = asyncio.Event()

    async def handle(self, msg):
        self.items.append(self.type.FromString(msg.data))
        self.times.append(time.monotonic())
        self.event.set()

    async def wait_for(self, predicate, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while True:
            for item in self.items:
                if predicate(item):
                    return item
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching {self.type.__name__} within {timeout_s} s")
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), remaining)


@pytest.fixture
async def mesh(nats_server):
    emulator = EmulatorServer(
        EmulatorConfig(
            gpu_type="H100",
            port=0,
            instance_id=INSTANCE,
            kv_events_endpoint="tcp://127.0.0.1:*",
            num_gpu_blocks=4096,
        )
    )
    await emulator.start()
    zctx = zmq.asyncio.Context()
    raw_pub = zctx.socket(zmq.PUB)
    raw_pub.setsockopt(zmq.LINGER, 0)
    raw_port = raw_pub.bind_to_random_port("tcp://127.0.0.1")
    port = free_port()
    config = AgentConfig(
        region=REGION,
        bind=f"127.0.0.1:{port}",
        # Ping itself as the "frankfurt" peer so that RTT reports flow.
        peers=[PeerConfig("frankfurt", f"127.0.0.1:{port}")],
        instances=[
            InstanceConfig(INSTANCE, emulator.url, kv_events=emulator.publisher.endpoint),
            # An instance with no HTTP server: only its (raw) KV event stream is used.
            InstanceConfig(
                "wdc-a10g-0",
                "http://127.0.0.1:9",
                kv_events=f"tcp://127.0.0.1:{raw_port}",
                gpu_type="A10G",
            ),
        ],
        nats_url=nats_server.url,
        shutdown_grace_s=5.0,
    )
    agent = RegionAgent(config, Topology.default())
    await agent.start()
    nc = await bus.connect_nats(nats_server.url, "test-observer")
    states, deltas, rtts = (
        Collector(state_pb2.RegionState),
        Collector(state_pb2.KvIndexDelta),
        Collector(state_pb2.RttReport),
    )
    await nc.subscribe(bus.state_subject(REGION), cb=states.handle)
    await nc.subscribe(bus.kv_subject(REGION), cb=deltas.handle)
    await nc.subscribe(bus.rtt_subject(REGION), cb=rtts.handle)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.port}")
    stub = region_agent_pb2_grpc.RegionAgentStub(channel)
    ns = type("Mesh", (), {})()
    ns.agent, ns.emulator, ns.nc, ns.stub, ns.raw_pub = agent, emulator, nc, stub, raw_pub
    ns.states, ns.deltas, ns.rtts, ns.nats = states, deltas, rtts, nats_server
    await states.wait_for(
        lambda s: any(i.healthy and i.instance_id == INSTANCE for i in s.instances)
    )
    yield ns
    await channel.close()
    await agent.stop(grace_s=1)
    with contextlib.suppress(Exception):
        await nc.close()
    raw_pub.close(linger=0)
    zctx.term()
    await emulator.stop()


async def until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


async def _generate(stub, **kwargs):
    request = region_agent_pb2.AgentGenerateRequest(**kwargs)
    return [r async for r in stub.Generate(request, timeout=20)]


async def test_region_state_is_published_at_10_hz_with_instance_fields(mesh):
    start = time.monotonic()
    await asyncio.sleep(1.5)
    window = [t for t in mesh.states.times if start + 0.25 <= t <= start + 1.25]
    assert len(window) >= 9, f"{len(window)} RegionStates in 1 s"
    last = mesh.states.items[-1]
    seqs = [s.seq for s in mesh.states.items]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert last.region == REGION
    assert last.agent_incarnation == mesh.agent.incarnation
    assert last.agent_endpoint == f"127.0.0.1:{mesh.agent.port}"
    assert last.egress_usd_per_gb == pytest.approx(0.02)
    by_id = {i.instance_id: i for i in last.instances}
    emu = by_id[INSTANCE]
    assert emu.healthy and emu.gpu_type == "H100"
    assert emu.block_size == 16 and emu.num_gpu_blocks == 4096
    assert emu.max_model_len > 0 and emu.model
    on_demand, spot = Topology.default().gpu_price_usd_per_hour("H100", "us-east-1")
    assert emu.price_usd_per_hour == pytest.approx(on_demand)
    assert emu.spot_price_usd_per_hour == pytest.approx(spot)
    raw = by_id["wdc-a10g-0"]
    assert not raw.healthy
    assert raw.gpu_type == "A10G"
    direct = await mesh.stub.GetState(region_agent_pb2.GetStateRequest(), timeout=5)
    assert direct.region == REGION and direct.agent_incarnation == mesh.agent.incarnation
    assert [i.instance_id for i in direct.instances] == [INSTANCE, "wdc-a10g-0"]
    pong = await mesh.stub.Ping(region_agent_pb2.PingRequest(from_region="tokyo"), timeout=5)
    assert pong.region == REGION and abs(pong.received_unix_ns - time.time_ns()) < 5e9


async def test_generate_streams_tokens_and_kv_deltas_and_snapshot(mesh):
    prompt = _prompt(100, seed=1)
    responses = await _generate(
        mesh.stub, request_id="r1", prompt_token_ids=prompt, max_tokens=8, ignore_eos=True
    )
    assert responses[0].HasField("started")
    assert responses[0].started.instance_id == INSTANCE
    assert responses[0].started.indexed_prefix_tokens == 0
    chunks = [r.tokens for r in responses[1:-1]]
    assert all(r.HasField("tokens") for r in responses[1:-1])
    token_ids = [t for c in chunks for t in c.token_ids]
    assert len(token_ids) == 8
    assert all(len(c.token_ids) == len(c.token_times_unix_ns) for c in chunks)
    times = [t for c in chunks for t in c.token_times_unix_ns]
    assert times == sorted(times) and abs(times[0] - time.time_ns()) < 30e9
    done = responses[-1].completion
    assert done.usage.prompt_tokens == 100 and done.usage.completion_tokens == 8
    assert done.finish_reason == "length"
    assert done.region == REGION and done.instance_id == INSTANCE
    assert 0 < done.timings.ttft_ms <= done.timings.e2e_ms
    assert done.timings.tpot_ms > 0

    # The engine's KV events become request-side keys on NATS.
    keys = compute_block_keys(prompt, 16)  # 6 full blocks
    await until(lambda: set(keys) <= mesh.agent.index.keys(INSTANCE))
    await asyncio.sleep(0.3)  # > the 50 ms flush interval
    seqs = [d.seq for d in mesh.deltas.items]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(d.agent_incarnation == mesh.agent.incarnation for d in mesh.deltas.items)
    index = PrefixIndex()
    for d in mesh.deltas.items:
        for inst in d.instances:
            index.apply_delta(inst)
    assert index.match(prompt)[INSTANCE] == 96

    # Snapshot: full keys, seq = last published delta seq.
    reply = await mesh.nc.request(bus.kv_snapshot_subject(REGION), b"", timeout=5)
    snapshot = state_pb2.KvIndexSnapshot.FromString(reply.data)
    assert snapshot.agent_incarnation == mesh.agent.incarnation
    assert snapshot.seq == mesh.agent.kv_seq
    await asyncio.sleep(0.2)
    assert snapshot.seq == max(d.seq for d in mesh.deltas.items)
    snap = {i.instance_id: i for i in snapshot.instances}
    assert set(keys) <= set(snap[INSTANCE].stored_keys)
    assert snap[INSTANCE].cleared and snap[INSTANCE].block_size == 16
    assert "wdc-a10g-0" in snap

    # Same prompt again: the agent's index and the engine both see the cached prefix.
    again = await _generate(mesh.stub, prompt_token_ids=prompt, max_tokens=4, ignore_eos=True)
    assert again[0].started.indexed_prefix_tokens == 96
    assert again[-1].completion.usage.cached_prompt_tokens == 96

    def settled(state):
        inst = next(i for i in state.instances if i.instance_id == INSTANCE)
        return (
            inst.num_indexed_blocks >= 6
            and inst.num_requests_outstanding == 0
            and inst.queued_prefill_tokens == 0
            and inst.queued_decode_tokens == 0
            and inst.prefill_tokens_per_s > 0
        )

    await mesh.states.wait_for(settled)


async def test_generate_validation_errors(mesh):
    cases = [
        ({"max_tokens": 4}, "prompt"),
        ({"prompt_token_ids": [1, 2], "prompt_text": "hi", "max_tokens": 4}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, 2], "max_tokens": 0}, "max_tokens"),
        ({"prompt_token_ids": [1, 2], "max_tokens": 4, "instance_id": "nope"}, "instance_id"),
    ]
    for kwargs, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(mesh.stub, **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    # The engine's own 400 (prompt longer than the context) maps to INVALID_ARGUMENT.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(mesh.stub, prompt_token_ids=[5] * 200_000, max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An unhealthy requested instance falls back to a healthy one.
    ok = await _generate(
        mesh.stub, prompt_text="hello world", max_tokens=3, instance_id="wdc-a10g-0"
    )
    assert ok[0].started.instance_id == INSTANCE
    assert ok[-1].completion.usage.completion_tokens == 3


async def test_spans_nest_and_wan_hop_is_recorded(mesh):
    from opentelemetry import trace

    SPANS.clear()
    tracer = trace.get_tracer("test")
    sent_ns = time.time_ns() - 40_000_000
    with tracer.start_as_current_span("client.generate") as root:
        metadata = [*grpc_metadata_inject(), (SENT_UNIX_NS_METADATA, str(sent_ns))]
        request = region_agent_pb2.AgentGenerateRequest(
            prompt_token_ids=_prompt(40, seed=3), max_tokens=3, origin_region="tokyo"
        )
        _ = [r async for r in mesh.stub.Generate(request, metadata=metadata, timeout=20)]
    trace_id = root.get_span_context().trace_id
    await asyncio.sleep(0.2)
    spans = [s for s in SPANS.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in spans}
    root_id = root.get_span_context().span_id
    assert by_name["agent.generate"].parent.span_id == root_id
    assert by_name["agent.forward"].parent.span_id == by_name["agent.generate"].context.span_id
    hop = by_name["wan.hop"]
    assert hop.parent.span_id == root_id
    assert hop.start_time == sent_ns
    assert hop.attributes["slomesh.origin_region"] == "tokyo"
    assert hop.attributes["slomesh.region"] == REGION
    engine = [s for s in spans if s.name == "engine.request"]
    assert engine and engine[0].parent.span_id == by_name["agent.forward"].context.span_id


async def test_client_cancellation_aborts_upstream(mesh):
    request = region_agent_pb2.AgentGenerateRequest(
        prompt_token_ids=_prompt(64, seed=4), max_tokens=5000, ignore_eos=True
    )
    call = mesh.stub.Generate(request, timeout=30)
    got = 0
    async for response in call:
        if response.HasField("tokens"):
            got += 1
            if got == 3:
                break
    call.cancel()
    deadline = time.monotonic() + 5
    runtime = mesh.agent.runtimes[INSTANCE]
    while time.monotonic() < deadline and (
        mesh.emulator.runner.num_live_requests or runtime.outstanding
    ):
        await asyncio.sleep(0.05)
    assert mesh.emulator.runner.num_live_requests == 0
    assert not runtime.outstanding


async def test_kv_gap_is_counted_and_blocks_indexed(mesh):
    tracker = mesh.agent.runtimes["wdc-a10g-0"].tracker
    tokens = list(range(10, 42))
    stored = BlockStored(
        block_hashes=(101, 102), parent_block_hash=None, token_ids=tuple(tokens), block_size=16
    )
    seq = 0
    # Wait for the subscription to be live (ZMQ slow joiner): send empty batches until one lands.
    while tracker.last_seq is None:
        await mesh.raw_pub.send_multipart(encode_multipart(seq, []))
        seq += 1
        await asyncio.sleep(0.05)
    first = tracker.last_seq
    await mesh.raw_pub.send_multipart(encode_multipart(first + 1, [stored], form="array"))
    await mesh.raw_pub.send_multipart(encode_multipart(first + 5, []))
    await mesh.raw_pub.send_multipart([b"kv", (first + 6).to_bytes(8, "big"), b"\xc1garbage"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and tracker.last_seq != first + 6:
        await asyncio.sleep(0.05)
    assert tracker.stats.gaps == 1
    assert tracker.stats.missed_batches == 3 + 1  # seq first+2..first+4, then the undecodable one
    labels = {"region": REGION, "instance": "wdc-a10g-0"}
    assert REGISTRY.get_sample_value("slomesh_agent_kv_event_gaps_total", labels) >= 1
    assert REGISTRY.get_sample_value("slomesh_agent_kv_decode_errors_total", labels) >= 1
    keys = compute_block_keys(tokens, 16)
    await mesh.deltas.wait_for(
        lambda d: any(
            i.instance_id == "wdc-a10g-0" and list(i.stored_keys) == keys for i in d.instances
        )
    )


async def test_rtt_reports_flow(mesh):
    report = await mesh.rtts.wait_for(lambda r: "frankfurt" in r.rtt_ms, timeout_s=5)
    assert 0 < report.rtt_ms["frankfurt"] < 1000
    assert report.region == REGION


async def test_agent_resumes_publishing_after_nats_restart(mesh):
    mesh.nats.stop()
    await asyncio.sleep(0.5)
    mesh.nats.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (mesh.nc.is_connected and mesh.agent.nc.is_connected):
        await asyncio.sleep(0.1)
    assert mesh.agent.nc.is_connected
    before = len(mesh.states.items)
    await asyncio.sleep(1.0)
    assert len(mesh.states.items) - before >= 5
    # Request/reply still works after the reconnect.
    reply = await mesh.nc.request(bus.kv_snapshot_subject(REGION), b"", timeout=5)
    assert state_pb2.KvIndexSnapshot.FromString(reply.data).region == REGION


async def test_graceful_shutdown_lets_in_flight_streams_finish(mesh):
    request = region_agent_pb2.AgentGenerateRequest(
        prompt_token_ids=_prompt(32, seed=5), max_tokens=60, ignore_eos=True
    )
    call = mesh.stub.Generate(request, timeout=30)
    first = await call.read()
    assert first.HasField("started")
    stopping = asyncio.create_task(mesh.agent.stop(grace_s=10))
    await asyncio.sleep(0.05)
    # Health goes NOT_SERVING (or the server already refuses new calls) while the stream runs.
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.agent.port}")
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="slomesh.v1.RegionAgent"), timeout=2
        )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
    responses = [first]
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    await stopping
    assert responses[-1].HasField("completion")
    assert responses[-1].completion.usage.completion_tokens == 60


async def test_cli_serves_and_exits_cleanly_on_sigterm(nats_server, tmp_path):
    import signal
    import sys
    import urllib.request

    emulator = EmulatorServer(
        EmulatorConfig(
            gpu_type="A10G",
            port=0,
            instance_id="wdc-a10g-0",
            kv_events_endpoint="tcp://127.0.0.1:*",
        )
    )
    await emulator.start()
    port, metrics_port = free_port(), free_port()
    nc = await bus.connect_nats(nats_server.url, "test-cli")
    states = Collector(state_pb2.RegionState)
    await nc.subscribe(bus.state_subject(REGION), cb=states.handle)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.region_agent",
        "--region",
        REGION,
        "--topology",
        "configs/topology.default.yaml",
        "--port",
        str(port),
        "--nats-url",
        nats_server.url,
        "--instance",
        f"id=wdc-a10g-0,url={emulator.url},kv_events={emulator.publisher.endpoint}",
        "--metrics-port",
        str(metrics_port),
        "--spans-out",
        str(tmp_path / "spans.jsonl"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        state = await states.wait_for(
            lambda s: s.instances and s.instances[0].healthy, timeout_s=20
        )
        assert state.agent_endpoint == f"127.0.0.1:{port}"
        assert state.instances[0].gpu_type == "A10G"
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        out = await _generate(
            region_agent_pb2_grpc.RegionAgentStub(channel), prompt_token_ids=[7] * 20, max_tokens=2
        )
        await channel.close()
        assert out[-1].completion.usage.completion_tokens == 2
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
            )
        )
        assert (
            'slomesh_agent_requests_forwarded_total{instance="wdc-a10g-0",region="washington-dc"} 1.0'
            in body
        )
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 20)
        assert rc == 0
        assert "agent.generate" in (tmp_path / "spans.jsonl").read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await nc.close()
        await emulator.stop()


async def test_online_fit_learns_the_emulators_decode_step_time(nats_server, tmp_path):
    """The agent refines a deliberately wrong prior (a profile twice as slow as the emulated
    L4) from the emulator's measured step times, publishes the coefficients, and they predict
    the emulator's decode step (its roofline) within 20 % where the load ran.

    The emulator reports modelled step times (scaled to wall time by its time_scale, which the
    agent divides out), so a slow CI machine delays the steps but does not change them."""
    from slomesh.engine.profiles import DEFAULT_MODEL, PROFILES, decode_step_time_s, step_time_s
    from slomesh.online_fit import PublishedStepTimeFit
    from tests.unit.scheduler.test_predictor import fitted_profile

    wrong = fitted_profile()
    wrong = wrong.model_copy(
        update={
            "decode": wrong.decode.model_copy(
                update={
                    "coefficients": wrong.decode.coefficients.model_copy(
                        update={
                            "intercept_ms": 125.0,
                            "per_sequence_ms": 0.0,
                            "per_context_token_ms": 1e-3,
                        }
                    )
                }
            )
        }
    )
    profile_path = str(wrong.save(tmp_path / "l4-wrong.yaml"))
    emulator = EmulatorServer(
        EmulatorConfig(gpu_type="L4", port=0, instance_id="wdc-l4-0", time_scale=0.25)
    )
    await emulator.start()
    config = AgentConfig(
        region=REGION,
        bind=f"127.0.0.1:{free_port()}",
        instances=[InstanceConfig("wdc-l4-0", emulator.url, latency_profile=profile_path)],
        nats_url=nats_server.url,
        shutdown_grace_s=1.0,
    )
    agent = RegionAgent(config, Topology.default())
    await agent.start()
    nc = await bus.connect_nats(nats_server.url, "test-online-fit")
    states = Collector(state_pb2.RegionState)
    await nc.subscribe(bus.state_subject(REGION), cb=states.handle)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.port}")
    stub = region_agent_pb2_grpc.RegionAgentStub(channel)
    try:
        await states.wait_for(lambda s: s.instances and s.instances[0].healthy, timeout_s=10)
        gpu = PROFILES["L4"]

        def truth_ms(batch: int, tokens_per_seq: float) -> float:
            return decode_step_time_s(gpu, DEFAULT_MODEL, batch, tokens_per_seq) * 1e3

        # Staggered requests: the decode batch grows to 8 and shrinks again, over 1-2k KV
        # tokens per sequence; each arrival's prefill makes its interval a mixed one.
        async def one(i: int):
            await asyncio.sleep(0.4 * i)
            return await _generate(
                stub,
                prompt_token_ids=_prompt(1000 + 100 * i, seed=100 + i),
                max_tokens=200,
                ignore_eos=True,
            )

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 120)
        assert all(r[-1].completion.usage.completion_tokens == 200 for r in results)
        await asyncio.sleep(0.3)
        last = states.items[-1].instances[0]
        fit = PublishedStepTimeFit.from_pb(last)
        assert fit is not None
        assert fit.decode_observations >= 10, fit
        assert fit.prefill_observations >= 1, fit
        model = fit.model
        prior = PublishedStepTimeFit.from_pb(states.items[0].instances[0])
        for batch, per_seq in ((2, 1300.0), (5, 1500.0), (8, 1500.0)):
            truth = truth_ms(batch, per_seq)
            got = model.decode_step_ms(batch, batch * per_seq)
            assert got == pytest.approx(truth, rel=0.2), (batch, per_seq, got, truth)
            if prior is not None and prior.decode_observations == 0:
                start = prior.model.decode_step_ms(batch, batch * per_seq)
                assert abs(start - truth) > 0.5 * truth  # the prior was far off
        # Prefill: request i's prompt of 1000 + 100 i tokens ran beside the i decoding before
        # it (about 1300 KV tokens each); the fit (compute side, as the predictor composes
        # it) against the emulator's step, looser: 8 requests of similar sizes.
        for i in (1, 4, 7):
            n, batch, context = 1000 + 100 * i, i, 1300 * i
            pairs = n * (n + 1) / 2
            truth = 1e3 * step_time_s(
                gpu, DEFAULT_MODEL, n, batch, context + n, attention_pairs=pairs + context
            )
            got = model.prefill_step_ms(n + batch, pairs + context)
            assert got == pytest.approx(truth, rel=0.25), (i, got, truth)
        labels = {"region": REGION, "instance": "wdc-l4-0", "phase": "decode"}
        observed = REGISTRY.get_sample_value(
            "slomesh_agent_instance_online_fit_observations", labels
        )
        assert observed is not None and observed >= fit.decode_observations
        assert REGISTRY.get_sample_value("slomesh_agent_instance_online_fit_r2", labels) is not None
    finally:
        await channel.close()
        await agent.stop(grace_s=1)
        await nc.close()
        await emulator.stop()
