"""Live model switches: the region agent switches an idle swappable emulator instance to the
model a request names, holds the requests for that model meanwhile, and publishes the switch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from services.region_agent.config import AgentConfig, InstanceConfig
from services.region_agent.server import RegionAgent
from slomesh import bus
from slomesh.emulator.server import EmulatorConfig, EmulatorServer
from slomesh.engine.profiles import MODELS, model_load_time_s
from slomesh.launcher import Mesh
from slomesh.telemetry import setup_telemetry
from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology
from slomesh.v1 import (
    region_agent_pb2,
    region_agent_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    state_pb2,
)
from tests.helpers import free_port
from tests.integration.test_region_agent import Collector, until

pytestmark = pytest.mark.integration

REGION = "washington-dc"
INSTANCE = "wdc-a10g-0"  # swappable in the multi-model topology, serving Llama at start
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
TIME_SCALE = 0.02  # the ~27.6 s modelled load takes ~0.55 s
SPANS = InMemorySpanExporter()
setup_telemetry("test-model-switch", extra_exporters=[SPANS])


def switches(outcome: str) -> float:
    return REGISTRY.get_sample_value(
        "slomesh_agent_model_switches_total",
        {"region": REGION, "instance": INSTANCE, "outcome": outcome},
    ) or 0.0


@pytest.fixture
async def region(nats_server):
    topology = Topology.load(DEFAULT_TOPOLOGY_PATH.parent / "topology.multimodel.yaml")
    emulator = EmulatorServer(
        EmulatorConfig(
            gpu_type="A10G",
            model=LLAMA,
            max_model_len=32768,
            port=0,
            instance_id=INSTANCE,
            kv_events_endpoint="tcp://127.0.0.1:*",
            time_scale=TIME_SCALE,
        )
    )
    await emulator.start()
    config = AgentConfig(
        region=REGION,
        bind=f"127.0.0.1:{free_port()}",
        instances=[
            InstanceConfig(INSTANCE, emulator.url, kv_events=emulator.publisher.endpoint)
        ],
        nats_url=nats_server.url,
        shutdown_grace_s=2.0,
    )
    agent = RegionAgent(config, topology)
    await agent.start()
    nc = await bus.connect_nats(nats_server.url, "test-model-switch")
    states = Collector(state_pb2.RegionState)
    await nc.subscribe(bus.state_subject(REGION), cb=states.handle)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.port}")
    ns = type("Region", (), {})()
    ns.topology, ns.emulator, ns.agent, ns.states = topology, emulator, agent, states
    ns.stub = region_agent_pb2_grpc.RegionAgentStub(channel)
    yield ns
    await channel.close()
    await agent.stop(grace_s=1)
    with contextlib.suppress(Exception):
        await nc.close()
    await emulator.stop()


async def generate(stub, model, request_id, max_tokens=4, instance_id=INSTANCE):
    request = region_agent_pb2.AgentGenerateRequest(
        request_id=request_id,
        model=model,
        instance_id=instance_id,
        prompt_token_ids=list(range(100, 164)),
        max_tokens=max_tokens,
    )
    return [r async for r in stub.Generate(request, timeout=30)]


def instance(state):
    return next(i for i in state.instances if i.instance_id == INSTANCE)


async def test_a_request_for_another_model_switches_the_idle_instance(region):
    states = region.states
    first = await states.wait_for(lambda s: instance(s).healthy and instance(s).swappable)
    inst = instance(first)
    assert inst.model == LLAMA and inst.model_load_remaining_s == 0
    assert inst.model_load_overhead_s == 20.0
    # The region's weight cache: the model it serves, then its `weight_cache:` list.
    assert list(first.weight_cache_models) == [LLAMA, QWEN]
    assert first.weight_cache_gb_per_s == 2.0 and first.remote_weights_gb_per_s == 0.5
    completed_before = switches("completed")

    # Qwen's weights come from Washington DC's cache: 20 s + 15.2 GB / 2 GB/s, as predicted.
    load_s, from_cache = region.topology.model_load_s(INSTANCE, QWEN, [LLAMA, QWEN])
    assert from_cache
    assert load_s == pytest.approx(
        model_load_time_s(MODELS[QWEN].weight_bytes, load_gb_per_s=2.0, overhead_s=20.0)
    )
    first_request = asyncio.create_task(generate(region.stub, QWEN, "switch-1"))
    loading = await states.wait_for(lambda s: instance(s).model == QWEN)
    assert 0 < instance(loading).model_load_remaining_s <= load_s
    # During the load: another request for Qwen is held, one for Llama is refused.
    second_request = asyncio.create_task(generate(region.stub, QWEN, "switch-2"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await generate(region.stub, LLAMA, "other-model")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "busy" in refused.value.details()

    for responses in (await first_request, await second_request):
        assert responses[0].started.instance_id == INSTANCE
        assert responses[-1].completion.usage.completion_tokens == 4
    # The first waited for the whole load (~load_s * TIME_SCALE of wall time).
    ttft_ms = (await first_request)[-1].completion.timings.ttft_ms
    assert ttft_ms >= 0.8 * load_s * TIME_SCALE * 1000
    assert region.emulator.served_model_name == QWEN
    assert switches("completed") == completed_before + 1
    served = await states.wait_for(
        lambda s: instance(s).model == QWEN and instance(s).model_load_remaining_s == 0
    )
    assert instance(served).max_model_len == 32768
    load_spans = [s for s in SPANS.get_finished_spans() if s.name == "agent.model_load"]
    assert {s.attributes["slomesh.model"] for s in load_spans} == {QWEN}
    assert load_spans[0].attributes["slomesh.weights_from_cache"] is True

    # A busy instance does not switch: a long Qwen request holds it.
    long_request = asyncio.create_task(generate(region.stub, QWEN, "long", max_tokens=2000))
    await until(lambda: region.agent.runtimes[INSTANCE].outstanding)
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await generate(region.stub, LLAMA, "busy")
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await long_request

    # Back to Llama once idle (the engine's gauges scraped idle too); a model the topology
    # does not list is refused.
    await until(lambda: region.agent.runtimes[INSTANCE].can_switch)
    back = await generate(region.stub, LLAMA, "back")
    assert back[-1].completion.usage.completion_tokens == 4
    assert region.emulator.served_model_name == LLAMA
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await generate(region.stub, "acme/unknown-model", "unknown")
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def write_two_instance_topology(path: Path) -> Path:
    """Washington DC alone: an H100 serving Llama and a swappable A10G serving Llama too, with
    Qwen in the region's weight cache and served nowhere."""
    path.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": LLAMA, "max_model_len": 32768},
                    {"name": QWEN, "max_model_len": 32768},
                ],
                "regions": [
                    {
                        "name": REGION,
                        "location": "Washington DC",
                        "cloud_region": "us-east-1",
                        "weight_cache": [QWEN],
                        "instances": [
                            {"id": "wdc-h100-0", "gpu_type": "H100"},
                            {"id": INSTANCE, "gpu_type": "A10G", "swappable": True},
                        ],
                    }
                ],
            }
        )
    )
    return path


@pytest.mark.timeout(400)
async def test_scheduler_places_a_model_switch_and_the_agent_runs_it(
    nats_server, redis_server, tmp_path
):
    """The whole path on the local mesh's processes: a request for a model no instance serves
    is placed on the idle swappable instance with the switch (``loads_model``, ``M_q`` in its
    predicted TTFT), the agent loads the model and serves it; the next request for it runs
    there without a switch."""
    topology_path = write_two_instance_topology(tmp_path / "topology.yaml")
    topology = Topology.load(topology_path)
    mesh = Mesh(
        topology_path,
        tmp_path / "run",
        nats_url=nats_server.url,
        redis_url=redis_server.url,
        startup_timeout_s=240,
        extra_args={"emulator": ["--time-scale", str(TIME_SCALE)]},
    )
    await asyncio.to_thread(mesh.start)
    try:
        async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.GlobalSchedulerStub(channel)

            async def ask(request_id: str) -> list:
                request = scheduler_pb2.GenerateRequest(
                    request_id=request_id,
                    model=QWEN,
                    prompt_token_ids=list(range(200, 456)),
                    max_tokens=3,
                    slo_class="batch",  # E2E 60 s: room for a ~28 s load
                    origin_region=REGION,
                )
                return [e async for e in stub.Generate(request, timeout=120)]

            deadline = time.monotonic() + 60
            while True:  # until the scheduler has the region's state with the A10G swappable
                try:
                    events = await ask("switch-1")
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            placement = events[0].placement
            assert placement.instance_id == INSTANCE and placement.loads_model
            load_s, from_cache = topology.model_load_s(INSTANCE, QWEN, [LLAMA, QWEN])
            assert from_cache
            assert placement.predicted.model_load_ms == pytest.approx(load_s * 1000.0)
            assert events[-1].completion.usage.completion_tokens == 3
            again = await ask("switch-2")
            assert again[0].placement.instance_id == INSTANCE
            assert not again[0].placement.loads_model
            assert again[0].placement.predicted.model_load_ms == 0
            assert again[-1].completion.usage.completion_tokens == 3
    finally:
        await asyncio.to_thread(mesh.stop)
