"""The global scheduler in process against real nats-server and Redis.

Region agents here are minimal real `RegionAgent` gRPC servicers defined in this file (test
doubles: they stream `max_tokens` tokens and record what they received); the region state they
would publish is published on real NATS by a small publisher task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from services.global_scheduler.ledger import (
    DECISIONS_STREAM,
    Ledger,
    output_lengths_key,
    request_key,
)
from services.global_scheduler.routes import Routes
from services.global_scheduler.server import SchedulerConfig, SchedulerService
from slomesh import bus
from slomesh.kv.hashing import compute_block_keys
from slomesh.scheduler.policy import BUILTIN_PROFILES
from slomesh.service import GrpcServerHandle, start_grpc_server
from slomesh.telemetry import setup_telemetry
from slomesh.topology import Topology
from slomesh.v1 import (
    common_pb2,
    region_agent_pb2,
    region_agent_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    state_pb2,
)

pytestmark = pytest.mark.integration

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
REGIONS = ("washington-dc", "frankfurt", "tokyo")
TOPOLOGY_PATH = Path(__file__).resolve().parents[2] / "configs" / "topology.default.yaml"


class FakeAgent(region_agent_pb2_grpc.RegionAgentServicer):
    """A real RegionAgent gRPC servicer that streams `max_tokens` tokens (test double)."""

    def __init__(self, region: str, token_interval_s: float = 0.002, fail: bool = False):
        self.region = region
        self.token_interval_s = token_interval_s
        self.fail = fail
        self.requests: list[region_agent_pb2.AgentGenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        self.started.set()
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "instance failed")
        t0 = time.time_ns()
        yield region_agent_pb2.AgentGenerateResponse(
            started=region_agent_pb2.Started(region=self.region, instance_id=request.instance_id)
        )
        try:
            for i in range(request.max_tokens):
                await asyncio.sleep(self.token_interval_s)
                yield region_agent_pb2.AgentGenerateResponse(
                    tokens=common_pb2.TokenChunk(
                        token_ids=[i + 1], token_times_unix_ns=[time.time_ns()]
                    )
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise
        e2e_ms = (time.time_ns() - t0) / 1e6
        yield region_agent_pb2.AgentGenerateResponse(
            completion=common_pb2.Completion(
                usage=common_pb2.Usage(
                    prompt_tokens=len(request.prompt_token_ids),
                    completion_tokens=request.max_tokens,
                ),
                timings=common_pb2.Timings(ttft_ms=1.0, e2e_ms=e2e_ms, queue_ms=0.5),
                finish_reason="length",
                region=self.region,
                instance_id=request.instance_id,
            )
        )


@dataclass
class RegionSim:
    """What one region publishes: its instances' state, KV snapshot and publication switch."""

    name: str
    endpoint: str
    instances: list[state_pb2.InstanceState]
    publishing: bool = True
    seq: int = 0
    snapshot_keys: dict[str, list[int]] = field(default_factory=dict)


def instance(iid: str, gpu: str, **kw) -> state_pb2.InstanceState:
    return state_pb2.InstanceState(
        instance_id=iid,
        gpu_type=gpu,
        model=MODEL,
        healthy=True,
        block_size=16,
        max_model_len=32768,
        **kw,
    )


class Mesh:
    """Scheduler + fake agents + state publisher on real NATS/Redis."""

    def __init__(self, nats_url: str, redis_url: str):
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.topology = Topology.default()
        self.agents: dict[str, FakeAgent] = {}
        self.agent_servers: dict[str, GrpcServerHandle] = {}
        self.regions: dict[str, RegionSim] = {}
        self.service: SchedulerService | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: scheduler_pb2_grpc.GlobalSchedulerStub | None = None
        self._publisher: asyncio.Task | None = None
        self.nc = None

    async def start(
        self,
        regions: Sequence[str] = REGIONS,
        staleness_ms: float = 1000.0,
        routes=None,
        failing: Sequence[str] = (),
        **config: object,
    ) -> Mesh:
        for region in regions:
            agent = FakeAgent(region, fail=region in failing)
            handle = await start_grpc_server(
                [(region_agent_pb2_grpc.add_RegionAgentServicer_to_server, agent)],
                ["slomesh.v1.RegionAgent"],
            )
            self.agents[region] = agent
            self.agent_servers[region] = handle
            spec = self.topology.region(region)
            self.regions[region] = RegionSim(
                region,
                f"127.0.0.1:{handle.port}",
                [instance(i.id, i.gpu_type) for i in spec.instances],
            )
        self.nc = await bus.connect_nats(self.nats_url, "test-publisher")
        await self.nc.subscribe("slomesh.region.*.kv.snapshot", cb=self._on_snapshot_request)
        self._publisher = asyncio.create_task(self._publish_loop())
        self.service = SchedulerService(
            SchedulerConfig(
                nats_url=self.nats_url,
                redis_url=self.redis_url,
                topology=self.topology,
                staleness_ms=staleness_ms,
                routes=routes or Routes(),
                ledger_retry_max_s=0.3,
                grace_s=1.0,
                registry=CollectorRegistry(),
                **config,
            )
        )
        await self.service.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.service.port}")
        self.stub = scheduler_pb2_grpc.GlobalSchedulerStub(self.channel)
        await self.wait_routable(len([r for r in self.regions.values() if r.publishing]))
        return self

    async def wait_routable(self, n: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.service.view.routable_regions()) != n:
            assert time.monotonic() < deadline, self.service.view.routable_regions()
            await asyncio.sleep(0.02)

    async def _publish_loop(self) -> None:
        while True:
            for sim in self.regions.values():
                if not sim.publishing:
                    continue
                sim.seq += 1
                await bus.publish(
                    self.nc,
                    bus.state_subject(sim.name),
                    state_pb2.RegionState(
                        region=sim.name,
                        seq=sim.seq,
                        timestamp_unix_ns=time.time_ns(),
                        agent_endpoint=sim.endpoint,
                        instances=sim.instances,
                        agent_incarnation=f"{sim.name}-1",
                        egress_usd_per_gb=0.02,
                    ),
                )
            await asyncio.sleep(0.05)

    async def _on_snapshot_request(self, msg) -> None:
        region = bus.region_of_subject(msg.subject)
        sim = self.regions[region]
        snap = state_pb2.KvIndexSnapshot(
            region=region,
            seq=0,
            agent_incarnation=f"{region}-1",
            instances=[
                state_pb2.InstanceBlockDelta(
                    instance_id=iid, stored_keys=keys, cleared=True, block_size=16
                )
                for iid, keys in sim.snapshot_keys.items()
            ],
        )
        await msg.respond(snap.SerializeToString())

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        if self.channel is not None:
            await self.channel.close()
        if self.service is not None:
            await self.service.stop()
        for handle in self.agent_servers.values():
            await handle.stop(0.1)
        if self.nc is not None:
            await self.nc.drain()


@pytest.fixture
async def mesh(nats_server, redis_server):
    m = Mesh(nats_server.url, redis_server.url)
    yield m
    await m.stop()


def request(**kw) -> scheduler_pb2.GenerateRequest:
    base = {
        "model": MODEL,
        "prompt_token_ids": list(range(1, 201)),
        "max_tokens": 8,
        "slo_class": "chat",
        "origin_region": "washington-dc",
    }
    base.update(kw)
    return scheduler_pb2.GenerateRequest(**base)


async def test_place_returns_routable_region_with_route(mesh):
    routes = Routes({"tokyo": {"frankfurt": "127.0.0.1:1"}})
    await mesh.start(regions=("frankfurt",), routes=routes)
    placement = first = await mesh.stub.Place(request(request_id="p-1", origin_region="tokyo"))
    assert placement.region == "frankfurt"
    assert placement.instance_id in {"fra-a100-0", "fra-l40s-0"}
    assert placement.agent_endpoint == "127.0.0.1:1"  # the route, as reached from tokyo
    assert placement.predicted.rtt_ms == mesh.topology.rtt_ms("tokyo", "frankfurt")
    assert placement.predicted.ttft_ms > placement.predicted.rtt_ms
    assert placement.slo_feasible and placement.policy == "slomesh"
    # Without a route the agent's own endpoint is returned.
    placement = await mesh.stub.Place(request(request_id="p-2", origin_region="frankfurt"))
    assert placement.agent_endpoint == mesh.regions["frankfurt"].endpoint
    assert placement.predicted.rtt_ms == 0.0
    view = mesh.service.view
    assert view.tightest_inflight_tpot_ms("frankfurt", placement.instance_id) == 100.0
    await mesh.stub.ReportOutcome(
        scheduler_pb2.OutcomeReport(
            request_id="p-2",
            outcome="ok",
            completion=common_pb2.Completion(
                timings=common_pb2.Timings(ttft_ms=120.0, tpot_ms=20.0, e2e_ms=260.0),
                usage=common_pb2.Usage(completion_tokens=8),
            ),
        )
    )
    assert await mesh.service.ledger.flush(5)
    # p-2 no longer counts as running; p-1 (never reported) still does where it was placed.
    still = 100.0 if first.instance_id == placement.instance_id else float("inf")
    assert view.tightest_inflight_tpot_ms("frankfurt", placement.instance_id) == still
    row = await mesh.service.ledger.redis.hgetall(request_key("p-2"))
    assert row["rpc"] == "place" and row["region"] == "frankfurt"
    assert float(row["ttft_ms"]) == 120.0 and row["outcome"] == "ok"
    assert row["slo_attained"] == "1"


async def test_generate_streams_and_records_ledger(mesh):
    exporter = InMemorySpanExporter()
    setup_telemetry("test-scheduler", extra_exporters=[exporter])
    await mesh.start()
    events = []
    async for response in mesh.stub.Generate(request(request_id="g-1", max_tokens=6)):
        events.append(response)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "placement" and kinds[-1] == "completion"
    assert kinds[1:-1] == ["tokens"] * 6
    placement, completion = events[0].placement, events[-1].completion
    agent = mesh.agents[placement.region]
    assert agent.requests[-1].instance_id == placement.instance_id
    md = agent.metadata[-1]
    assert "traceparent" in md and int(md["slomesh-sent-unix-ns"]) > 0
    # Timings are re-computed at the scheduler: TTFT to the first token, not the agent's.
    t = completion.timings
    assert completion.usage.completion_tokens == 6
    assert t.ttft_ms > 1.0 and t.e2e_ms >= t.ttft_ms
    assert t.tpot_ms == pytest.approx((t.e2e_ms - t.ttft_ms) / 5)
    assert completion.region == placement.region

    assert await mesh.service.ledger.flush(5)
    row = await mesh.service.ledger.redis.hgetall(request_key("g-1"))
    assert row["rpc"] == "generate" and row["outcome"] == "ok"
    assert row["region"] == placement.region and row["instance_id"] == placement.instance_id
    assert float(row["ttft_ms"]) == pytest.approx(t.ttft_ms, rel=1e-4)
    assert float(row["predicted_ttft_ms"]) == pytest.approx(placement.predicted.ttft_ms, rel=1e-4)
    assert row["slo_class"] == "chat" and int(row["prompt_tokens"]) == 200
    assert 0 < await mesh.service.ledger.redis.ttl(request_key("g-1")) <= 7 * 24 * 3600
    entries = await mesh.service.ledger.redis.xrange(DECISIONS_STREAM)
    assert any(e[1]["request_id"] == "g-1" for e in entries)

    registry = mesh.service.config.registry
    labels = {"rpc": "Generate", "code": "OK"}
    for _ in range(50):  # counted just after the stream ends
        if registry.get_sample_value("slomesh_scheduler_requests_total", labels) == 1.0:
            break
        await asyncio.sleep(0.02)
    assert registry.get_sample_value("slomesh_scheduler_requests_total", labels) == 1.0
    placed = {"policy": "slomesh", "outcome": "placed", "region": placement.region}
    assert registry.get_sample_value("slomesh_scheduler_placements_total", placed) == 1.0
    assert (
        registry.get_sample_value(
            "slomesh_scheduler_place_latency_seconds_count", {"policy": "slomesh"}
        )
        == 1.0
    )

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"scheduler.generate", "scheduler.place", "scheduler.forward"} <= set(spans)
    gen, place, fwd = (
        spans["scheduler.generate"],
        spans["scheduler.place"],
        spans["scheduler.forward"],
    )
    assert place.parent.span_id == gen.context.span_id
    assert fwd.parent.span_id == gen.context.span_id
    assert len([e for e in place.events if e.name == "candidate"]) == 6
    # The agent received the forward span's context.
    assert format(fwd.context.trace_id, "032x") in md["traceparent"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": "nope"}, "model"),
        ({"slo_class": "gold"}, "slo_class"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"request_id": "bad id!"}, "request_id"),
        ({"origin_region": "mars"}, "origin_region"),
    ],
)
async def test_invalid_argument_names_the_field(mesh, overrides, field):
    await mesh.start(regions=("washington-dc",))
    for call in (mesh.stub.Place, mesh.stub.Generate):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            result = call(request(**overrides))
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}:")


async def test_stale_region_is_not_chosen(mesh, tmp_path):
    # Latency decides (no cost-first band: with SLO slack to spare, money might pick a cheaper
    # GPU abroad), so from Tokyo, Tokyo is the obvious choice while it is fresh...
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump({**BUILTIN_PROFILES["slomesh"], "cost_first_slo_usage": 0.0})
    )
    await mesh.start(staleness_ms=300, policy=str(policy))
    placement = await mesh.stub.Place(request(origin_region="tokyo"))
    assert placement.region == "tokyo"
    # ...and never once its state goes stale.
    mesh.regions["tokyo"].publishing = False
    await mesh.wait_routable(2)
    for i in range(5):
        placement = await mesh.stub.Place(request(request_id=f"s-{i}", origin_region="tokyo"))
        assert placement.region != "tokyo"


async def test_overload_is_refused_with_retry_after(mesh):
    await mesh.start(regions=("washington-dc",))
    sim = mesh.regions["washington-dc"]
    sim.instances = [
        instance(
            i.instance_id, i.gpu_type, queued_prefill_tokens=2_000_000, prefill_tokens_per_s=20_000
        )
        for i in sim.instances
    ]
    await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Place(request(request_id="r-1"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata() or ())
    assert 100 <= int(trailing["retry-after-ms"]) <= 30_000
    # The batch class is placed best effort instead.
    placement = await mesh.stub.Place(request(request_id="r-2", slo_class="batch"))
    assert placement.region == "washington-dc" and not placement.slo_feasible


# -- soft admission: the best-effort queue ----------------------------------------------------

#: "interactive": an SLO class whose TPOT target (20 ms) an H100 meets; "bulk": a best-effort
#: tier at priority 2 with an unreachable target. The profile lets a priority-2 request slow
#: the requests running on an instance to at most 20 % of their TPOT target (4 ms): no
#: instance running an interactive request can take a bulk one, which waits in the queue.
BEST_EFFORT_SLO = {
    "classes": {
        "interactive": {"ttft_base_ms": 500, "ttft_per_prompt_token_ms": 0.25, "tpot_ms": 20},
        "bulk": {"tpot_ms": 1, "on_infeasible": "best_effort", "priority": 2},
    }
}


async def start_best_effort_mesh(mesh: Mesh, tmp_path: Path, **profile) -> None:
    """Washington DC publishing its H100 only, with the SLO classes and profile above."""
    slo_path = tmp_path / "slo.yaml"
    slo_path.write_text(yaml.safe_dump(BEST_EFFORT_SLO))
    policy_path = tmp_path / "policy.yaml"
    data = {**BUILTIN_PROFILES["slomesh"], "priority_slo_margins": {2: 0.2}, **profile}
    policy_path.write_text(yaml.safe_dump(data))
    await mesh.start(
        regions=("washington-dc",), policy=str(policy_path), slo_config_path=str(slo_path)
    )
    mesh.regions["washington-dc"].instances = [instance("wdc-h100-0", "H100")]
    view = mesh.service.view
    for _ in range(100):
        if [i.instance_id for i in view.instances()] == ["wdc-h100-0"]:
            break
        await asyncio.sleep(0.02)
    assert [i.instance_id for i in view.instances()] == ["wdc-h100-0"]


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_best_effort_request_is_queued_then_served(mesh, tmp_path):
    exporter = InMemorySpanExporter()
    setup_telemetry("test-scheduler", extra_exporters=[exporter])
    await start_best_effort_mesh(mesh, tmp_path)
    service = mesh.service
    queue = service.servicer.best_effort
    registry = service.config.registry

    interactive = mesh.stub.Generate(
        request(request_id="i-1", slo_class="interactive", max_tokens=300)
    )
    first = await interactive.read()
    assert first.placement.instance_id == "wdc-h100-0" and first.placement.slo_feasible
    assert service.view.tightest_inflight_tpot_ms("washington-dc", "wdc-h100-0") == 20.0

    bulk_events: list[tuple[float, scheduler_pb2.GenerateResponse]] = []

    async def run_bulk() -> None:
        call = mesh.stub.Generate(request(request_id="b-1", slo_class="bulk", max_tokens=4))
        async for event in call:
            bulk_events.append((time.monotonic(), event))

    sent = time.monotonic()
    bulk = asyncio.create_task(run_bulk())
    await wait_until(lambda: "b-1" in queue)
    # It waits while the interactive request runs, through several state updates.
    await asyncio.sleep(0.3)
    assert "b-1" in queue and not bulk_events
    assert registry.get_sample_value("slomesh_scheduler_best_effort_queue_depth") == 1.0

    while (event := await interactive.read()) is not grpc.aio.EOF:
        last = event
    interactive_done = time.monotonic()
    assert last.WhichOneof("event") == "completion"
    await asyncio.wait_for(bulk, 10)

    kinds = [e.WhichOneof("event") for _, e in bulk_events]
    assert kinds == ["placement"] + ["tokens"] * 4 + ["completion"]
    placed_at, placement = bulk_events[0][0], bulk_events[0][1].placement
    assert placed_at >= interactive_done - 0.05  # not before the interactive stream ended
    assert placement.instance_id == "wdc-h100-0" and not placement.slo_feasible
    # The time queued is part of its TTFT.
    completion = bulk_events[-1][1].completion
    assert completion.timings.ttft_ms >= (interactive_done - sent) * 1000.0 - 50.0
    assert len(queue) == 0

    assert await service.ledger.flush(5)
    row = await service.ledger.redis.hgetall(request_key("b-1"))
    assert row["placement_outcome"] == "best_effort" and row["outcome"] == "ok"
    assert row["best_effort_result"] == "placed" and row["priority"] == "2"
    assert float(row["best_effort_wait_ms"]) >= 300.0
    assert int(row["queued_at_unix_ns"]) > 0
    placements = {
        (e[1]["request_id"], e[1]["outcome"])
        for e in await service.ledger.redis.xrange(DECISIONS_STREAM)
    }
    assert {("b-1", "queued"), ("b-1", "best_effort")} <= placements

    wait = registry.get_sample_value(
        "slomesh_scheduler_best_effort_queue_wait_seconds_count", {"result": "placed"}
    )
    assert wait == 1.0
    assert registry.get_sample_value("slomesh_scheduler_best_effort_queue_depth") == 0.0
    queued = {"policy": "slomesh", "outcome": "queued", "region": ""}
    assert registry.get_sample_value("slomesh_scheduler_placements_total", queued) == 1.0

    spans = exporter.get_finished_spans()
    (queue_span,) = [s for s in spans if s.name == "scheduler.best_effort_queue"]
    assert queue_span.attributes["slomesh.best_effort_result"] == "placed"
    assert queue_span.attributes["slomesh.best_effort_wait_ms"] >= 300.0
    assert queue_span.attributes["slomesh.priority"] == 2
    gen = next(
        s
        for s in spans
        if s.name == "scheduler.generate" and s.context.trace_id == queue_span.context.trace_id
    )
    assert queue_span.parent.span_id == gen.context.span_id
    dispatched = [
        s
        for s in spans
        if s.name == "scheduler.place"
        and s.parent is not None
        and s.parent.span_id == queue_span.context.span_id
    ]
    assert [s.attributes["slomesh.outcome"] for s in dispatched] == ["best_effort"]


async def test_queued_requests_are_cancelled_refused_when_full_and_refused_on_shutdown(
    mesh, tmp_path
):
    await start_best_effort_mesh(mesh, tmp_path, best_effort_queue_limit=1)
    service = mesh.service
    queue = service.servicer.best_effort
    registry = service.config.registry
    interactive = mesh.stub.Generate(
        request(request_id="i-2", slo_class="interactive", max_tokens=5000)
    )
    assert (await interactive.read()).WhichOneof("event") == "placement"

    # A client cancel takes a queued Generate out of the queue.
    cancelled = mesh.stub.Generate(request(request_id="b-2", slo_class="bulk", max_tokens=4))
    reader = asyncio.create_task(cancelled.read())
    await wait_until(lambda: "b-2" in queue)
    cancelled.cancel()
    await wait_until(lambda: "b-2" not in queue)
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await reader
    await wait_until(
        lambda: (
            registry.get_sample_value(
                "slomesh_scheduler_best_effort_queue_wait_seconds_count", {"result": "cancelled"}
            )
            == 1.0
        )
    )
    assert await service.ledger.flush(5)
    row = await service.ledger.redis.hgetall(request_key("b-2"))
    assert row["outcome"] == "cancelled" and row["best_effort_result"] == "cancelled"

    # A queued Place waits too; with the queue full (limit 1) the next one is refused.
    place = asyncio.ensure_future(
        mesh.stub.Place(request(request_id="b-3", slo_class="bulk", max_tokens=4))
    )
    await wait_until(lambda: "b-3" in queue)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Place(request(request_id="b-4", slo_class="bulk", max_tokens=4))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in info.value.details()
    retry_ms = int(dict(info.value.trailing_metadata() or ())["retry-after-ms"])
    assert 100 <= retry_ms <= 10_000
    assert registry.get_sample_value("slomesh_scheduler_best_effort_queue_full_total") == 1.0

    # Shutdown refuses what is still queued with UNAVAILABLE at once (a retry reaches a
    # replica that is up), while the running stream gets the grace period (1 s).
    assert "b-3" in queue
    stopping = asyncio.create_task(service.stop())
    mesh.service = None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await place
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.details()
    assert not stopping.done() and len(queue) == 0
    interactive.cancel()
    await asyncio.wait_for(stopping, 10)


async def test_kv_snapshot_makes_prefix_hits(mesh):
    prompt = list(range(5000, 5000 + 4096))
    keys = compute_block_keys(prompt[:4000], 16)
    await mesh.start(regions=("washington-dc",))
    # The scheduler asked for a snapshot at first sight of the region (it was empty); the
    # agent's index now holds the prompt's prefix on the A10G instance.
    view = mesh.service.view
    for _ in range(100):
        if view.kv_sequence("washington-dc") == ("washington-dc-1", 0, False):
            break
        await asyncio.sleep(0.02)
    assert view.kv_sequence("washington-dc") == ("washington-dc-1", 0, False)
    mesh.regions["washington-dc"].snapshot_keys = {"wdc-a10g-0": keys}
    # A delta with a sequence gap makes the scheduler ask for a fresh snapshot.
    await bus.publish(
        mesh.nc,
        bus.kv_subject("washington-dc"),
        state_pb2.KvIndexDelta(region="washington-dc", seq=7, agent_incarnation="washington-dc-1"),
    )
    for _ in range(100):
        if view.prefix_index.num_blocks("wdc-a10g-0") == len(keys):
            break
        await asyncio.sleep(0.02)
    assert view.prefix_index.num_blocks("wdc-a10g-0") == len(keys)
    placement = await mesh.stub.Place(request(request_id="kv-1", prompt_token_ids=prompt))
    assert placement.instance_id == "wdc-a10g-0"
    assert placement.cached_prefix_tokens == 4000 // 16 * 16


async def test_client_cancel_cancels_upstream(mesh):
    await mesh.start(regions=("washington-dc",))
    call = mesh.stub.Generate(request(request_id="c-1", max_tokens=2000))
    got = 0
    view = mesh.service.view
    async for response in call:
        if response.WhichOneof("event") == "placement":
            instance_id = response.placement.instance_id
        if response.WhichOneof("event") == "tokens":
            got += 1
            if got == 3:
                break
    # While it streams, its TPOT target protects the instance from overload.
    assert view.tightest_inflight_tpot_ms("washington-dc", instance_id) == 100.0
    call.cancel()
    await asyncio.wait_for(mesh.agents["washington-dc"].cancelled.wait(), 5)
    for _ in range(50):
        if view.tightest_inflight_tpot_ms("washington-dc", instance_id) == float("inf"):
            break
        await asyncio.sleep(0.02)
    assert view.tightest_inflight_tpot_ms("washington-dc", instance_id) == float("inf")
    assert await mesh.service.ledger.flush(5)
    row = await mesh.service.ledger.redis.hgetall(request_key("c-1"))
    assert row["outcome"] == "cancelled"


async def test_failed_region_before_first_token_is_retried_elsewhere(mesh):
    await mesh.start(regions=("washington-dc", "frankfurt"), failing=("washington-dc",))
    events = [e async for e in mesh.stub.Generate(request(request_id="f-1", max_tokens=3))]
    placements = [e.placement for e in events if e.WhichOneof("event") == "placement"]
    assert [p.region for p in placements] == ["washington-dc", "frankfurt"]
    assert events[-1].completion.region == "frankfurt"
    assert mesh.agents["washington-dc"].requests  # it was tried first


async def test_redis_outage_does_not_fail_requests(mesh, redis_server):
    await mesh.start(regions=("washington-dc",))
    redis_server.stop()
    for i in range(3):
        events = [e async for e in mesh.stub.Generate(request(request_id=f"o-{i}", max_tokens=2))]
        assert events[-1].WhichOneof("event") == "completion"
    ledger = mesh.service.ledger
    assert ledger.backlog > 0
    redis_server.start()
    assert await ledger.flush(10)
    for i in range(3):
        row = await ledger.redis.hgetall(request_key(f"o-{i}"))
        assert row["outcome"] == "ok" and float(row["ttft_ms"]) > 0


async def test_output_lengths_are_learned_persisted_and_loaded(mesh, nats_server, redis_server):
    """Completed Generate streams and a reported Place'd request teach the predictor; the
    lengths reach Redis; a new scheduler replica starts from the same window and quantiles."""
    await mesh.start(regions=("washington-dc",))
    lengths = [3, 9, 4, 7, 5]
    for i, n in enumerate(lengths):
        events = [e async for e in mesh.stub.Generate(request(request_id=f"ol-{i}", max_tokens=n))]
        assert events[-1].completion.usage.completion_tokens == n
    await mesh.stub.Place(request(request_id="ol-place", max_tokens=50))
    await mesh.stub.ReportOutcome(
        scheduler_pb2.OutcomeReport(
            request_id="ol-place",
            completion=common_pb2.Completion(
                timings=common_pb2.Timings(ttft_ms=50.0, tpot_ms=5.0, e2e_ms=300.0),
                usage=common_pb2.Usage(completion_tokens=11),
            ),
        )
    )
    # A report of a request this replica never placed has no model or class: nothing learned.
    await mesh.stub.ReportOutcome(
        scheduler_pb2.OutcomeReport(
            request_id="ol-unknown",
            completion=common_pb2.Completion(usage=common_pb2.Usage(completion_tokens=999)),
        )
    )
    learned = mesh.service.view.output_lengths
    assert learned.samples(MODEL, "chat") == [*lengths, 11]
    assert learned.quantile(MODEL, "chat", 0.5) == 5  # 3rd smallest of 3, 4, 5, 7, 9, 11
    assert await mesh.service.ledger.flush(5)
    key = output_lengths_key(MODEL, "chat")
    assert key.startswith("slomesh:")
    assert await mesh.service.ledger.redis.lrange(key, 0, -1) == ["11", "5", "7", "4", "9", "3"]
    assert 0 < await mesh.service.ledger.redis.ttl(key) <= 7 * 24 * 3600

    replica = SchedulerService(
        SchedulerConfig(
            nats_url=nats_server.url,
            redis_url=redis_server.url,
            topology=mesh.topology,
            registry=CollectorRegistry(),
            grace_s=0.5,
        )
    )
    await replica.start()
    try:
        loaded = replica.view.output_lengths
        assert loaded.samples(MODEL, "chat") == [*lengths, 11]
        for q in (0.1, 0.5, 0.9, 1.0):
            assert loaded.quantile(MODEL, "chat", q) == learned.quantile(MODEL, "chat", q)
    finally:
        await replica.stop()


async def test_output_length_window_is_trimmed_in_redis(redis_server):
    ledger = Ledger(redis_server.url, output_length_window=3)
    ledger.start()
    try:
        for n in (10, 20, 30, 40, 50):
            ledger.record_output_length("m:with:colons", "coding", n)
        ledger.record_output_length(MODEL, "chat", 8)
        assert await ledger.flush(5)
        assert await ledger.redis.lrange(output_lengths_key("m:with:colons", "coding"), 0, -1) == [
            "50",
            "40",
            "30",
        ]
        await ledger.redis.rpush(output_lengths_key(MODEL, "chat"), "junk", "0")
        assert await ledger.load_output_lengths() == {
            ("m:with:colons", "coding"): [30, 40, 50],
            (MODEL, "chat"): [8],
        }
    finally:
        await ledger.close(1.0)


async def test_scheduler_starts_without_redis(nats_server):
    from slomesh.procs import free_port

    service = SchedulerService(
        SchedulerConfig(
            nats_url=nats_server.url,
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            topology=Topology.default(),
            registry=CollectorRegistry(),
            output_length_load_timeout_s=0.5,
            flush_timeout_s=0.2,
            grace_s=0.2,
        )
    )
    t0 = time.monotonic()
    await service.start()
    try:
        assert time.monotonic() - t0 < 5.0
        assert service.view.output_lengths.keys() == []
    finally:
        await service.stop()


async def test_real_region_agent_and_emulator(nats_server, redis_server):
    """Scheduler -> real RegionAgent -> real emulator; KV events flow back into placement."""
    from services.region_agent.config import AgentConfig, InstanceConfig
    from services.region_agent.server import RegionAgent
    from slomesh.emulator.server import EmulatorConfig, EmulatorServer

    topology = Topology.default()
    emulators = []
    for iid, gpu in (("wdc-h100-0", "H100"), ("wdc-a10g-0", "A10G")):
        emulator = EmulatorServer(
            EmulatorConfig(
                gpu_type=gpu,
                port=0,
                instance_id=iid,
                kv_events_endpoint="tcp://127.0.0.1:*",
                num_gpu_blocks=4096,
            )
        )
        await emulator.start()
        emulators.append(emulator)
    agent = RegionAgent(
        AgentConfig(
            region="washington-dc",
            instances=[
                InstanceConfig(e.instance_id, e.url, kv_events=e.publisher.endpoint)
                for e in emulators
            ],
            nats_url=nats_server.url,
            shutdown_grace_s=2.0,
        ),
        topology,
    )
    await agent.start()
    service = SchedulerService(
        SchedulerConfig(
            nats_url=nats_server.url,
            redis_url=redis_server.url,
            topology=topology,
            registry=CollectorRegistry(),
            grace_s=1.0,
        )
    )
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    stub = scheduler_pb2_grpc.GlobalSchedulerStub(channel)
    try:
        deadline = time.monotonic() + 10
        while not (
            service.view.routable_regions() == ["washington-dc"]
            and all(i.healthy for i in service.view.instances())
        ):
            assert time.monotonic() < deadline, "agent state never reached the scheduler"
            await asyncio.sleep(0.05)

        prompt = list(range(100, 100 + 2048))
        first = [
            e
            async for e in stub.Generate(
                request(request_id="e-1", prompt_token_ids=prompt, max_tokens=4)
            )
        ]
        placement = first[0].placement
        completion = first[-1].completion
        assert completion.usage.completion_tokens == 4
        assert completion.instance_id == placement.instance_id
        assert completion.timings.ttft_ms > 0

        # The emulator's KV events reach the scheduler through the agent and NATS.
        deadline = time.monotonic() + 10
        while (
            service.view.cached_prefix_tokens([placement.instance_id], prompt)[
                placement.instance_id
            ]
            < 2032
        ):
            assert time.monotonic() < deadline, "KV events never reached the scheduler"
            await asyncio.sleep(0.05)
        second = await stub.Place(request(request_id="e-2", prompt_token_ids=prompt + [7] * 64))
        assert second.instance_id == placement.instance_id
        assert second.cached_prefix_tokens >= 2032
        assert await service.ledger.flush(5)
        row = await service.ledger.redis.hgetall(request_key("e-1"))
        assert row["outcome"] == "ok" and row["served_instance_id"] == placement.instance_id
    finally:
        await channel.close()
        await service.stop()
        await agent.stop()
        for emulator in emulators:
            await emulator.stop()


async def test_cli_serves_health_and_shuts_down_gracefully(nats_server, redis_server, tmp_path):
    import signal
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from slomesh.procs import free_port, wait_for_port

    port, metrics_port = free_port(), free_port()
    routes = tmp_path / "routes.json"
    routes.write_text('{"tokyo": {"frankfurt": "127.0.0.1:9"}}')
    args = [
        "--port", str(port), "--nats-url", nats_server.url, "--redis-url", redis_server.url,
        "--topology", str(TOPOLOGY_PATH), "--routes-json", str(routes),
        "--metrics-port", str(metrics_port), "--region", "tokyo", "--grace-s", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(  # noqa: ASYNC220 - starts the process, does not wait
        [sys.executable, "-m", "services.global_scheduler", *args],
        cwd=TOPOLOGY_PATH.parents[1],
        stderr=subprocess.PIPE,
    )
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 20.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="slomesh.v1.GlobalScheduler")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # No region has published state: UNAVAILABLE, origin defaulted to --region.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await scheduler_pb2_grpc.GlobalSchedulerStub(channel).Place(
                    request(origin_region="")
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.to_thread(wait_for_port, "127.0.0.1", metrics_port, 5.0)
        import urllib.request

        expected = b'slomesh_scheduler_requests_total{code="UNAVAILABLE",rpc="Place"} 1.0'
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        body = b""
        for _ in range(50):  # the server counts the call just after the client sees its end
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
            if expected in body:
                break
            await asyncio.sleep(0.05)
        assert expected in body
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_configuration(tmp_path):
    from services.global_scheduler.__main__ import main

    common = ["--nats-url", "nats://127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"]
    assert main([*common, "--topology", str(tmp_path / "missing.yaml")]) == 2
    topo = str(TOPOLOGY_PATH)
    assert main([*common, "--topology", topo, "--policy", "fastest"]) == 2
    assert main([*common, "--topology", topo, "--region", "mars"]) == 2
    assert main([*common, "--topology", topo, "--output-length-window", "0"]) == 2
    bad_routes = tmp_path / "routes.json"
    bad_routes.write_text('{"tokyo": {"frankfurt": "no-port"}}')
    assert main([*common, "--topology", topo, "--routes-json", str(bad_routes)]) == 2
