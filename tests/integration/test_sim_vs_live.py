"""The live global scheduler and the simulator place alike when they see the same state.

A short simulation of a Mooncake slice (prefix sharing, loaded instances) records every
`RegionState` and `KvIndexDelta` its agents deliver. The messages delivered up to a moment in
the middle of the run are fed, in order and at their delivery times, to (a) the simulator's
scheduler (`SimScheduler`) and (b) the view of a live `GlobalSchedulerServicer` served over
gRPC with a real Redis ledger, whose view asks for KV snapshots as the live service's does
(answered with what the agent would reply then). Then the same requests are placed by both --
`Place` over gRPC on the live side -- and every decision must match: outcome, region,
instance, predicted TTFT and SLO verdict.
"""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.global_scheduler.ledger import Ledger
from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.routes import Routes
from services.global_scheduler.server import GlobalSchedulerServicer
from slomesh.scheduler.policy import make_policy
from slomesh.scheduler.registry import PROFILES
from slomesh.scheduler.validation import RequestValidationError
from slomesh.scheduler.view import ClusterView
from slomesh.sim import EPOCH_UNIX_NS, Simulator
from slomesh.sim.scheduler import SimScheduler
from slomesh.sim.simulator import generate_request
from slomesh.slo import load_slo_config
from slomesh.topology import Topology, shared_data_dir
from slomesh.traces import load_trace
from slomesh.v1 import scheduler_pb2_grpc, state_pb2

pytestmark = pytest.mark.integration

MOONCAKE = shared_data_dir() / "traces" / "mooncake_conversation_part1.jsonl"
N_REQUESTS = 120
CUT = 60  # the views see what was delivered up to request CUT's arrival
COMPARED = 30


def _ns(t_s: float) -> int:
    return EPOCH_UNIX_NS + round(t_s * 1e9)


@pytest.fixture(scope="module")
def recorded():
    """(topology, trace, delivered messages) of a short simulation under load."""
    topo = Topology.default()
    trace = load_trace(MOONCAKE, limit=N_REQUESTS, rate_scale=2.0, regions=topo.region_names)
    messages: list[tuple[float, object]] = []
    Simulator(topo, "slomesh", on_delivery=lambda t, m: messages.append((t, m))).run(trace)
    return topo, trace, messages


@pytest.mark.parametrize("policy", PROFILES.names())
async def test_same_state_same_placements(recorded, redis_server, policy):
    topo, trace, messages = recorded
    slo = load_slo_config()
    now = {"ns": 0}

    def clock() -> int:
        return now["ns"]

    sim_side = SimScheduler(topo, make_policy(policy), slo, clock)
    asked: list[str] = []
    live_view = ClusterView(topo, staleness_ms=1000.0, request_snapshot=asked.append, clock_ns=clock)
    kv_published: dict[str, int] = {}

    cut_s = trace.requests[CUT].arrival_s
    fed = 0
    for t, msg in messages:
        if t > cut_s:
            break
        now["ns"] = _ns(t)
        if isinstance(msg, state_pb2.RegionState):
            sim_side.on_state(msg)
            live_view.apply_state(msg)
        else:
            assert isinstance(msg, state_pb2.KvIndexDelta)
            sim_side.on_kv(msg)
            live_view.apply_kv_delta(msg)
            kv_published[msg.region] = msg.seq
        while asked:
            # The live scheduler asks each region's agent for a snapshot when it first sees it;
            # the agent replies with its index as of its last delta (none yet here).
            region = asked.pop()
            assert kv_published.get(region, 0) == 0
            state = live_view.region_state(region)
            live_view.apply_kv_snapshot(
                state_pb2.KvIndexSnapshot(
                    region=region, seq=0, agent_incarnation=state.agent_incarnation
                )
            )
        fed += 1
    assert fed > 50 and len(kv_published) == 3
    assert live_view.prefix_index.instance_ids()  # the KV index is populated

    ledger = Ledger(redis_server.url)
    ledger.start()
    servicer = GlobalSchedulerServicer(
        view=live_view,
        policy=make_policy(policy),
        slo=slo,
        ledger=ledger,
        metrics=SchedulerMetrics.for_registry(CollectorRegistry()),
        routes=Routes(),
    )
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_GlobalSchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    now["ns"] = _ns(cut_s)
    decisions = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_pb2_grpc.GlobalSchedulerStub(channel)
            for tr in trace.requests[CUT : CUT + COMPARED]:
                request = generate_request(tr, topo.model.name)
                try:
                    p = await stub.Place(request)
                    live = ("placed", p.region, p.instance_id, p.predicted.ttft_ms, p.slo_feasible)
                except grpc.aio.AioRpcError as err:
                    live = (err.code().name,)
                try:
                    vreq = sim_side.validate(request)
                except RequestValidationError:
                    sim = ("INVALID_ARGUMENT",)
                else:
                    d = sim_side.place(vreq)
                    if d.chosen is None:
                        sim = ("RESOURCE_EXHAUSTED" if d.outcome == "refused" else "UNAVAILABLE",)
                    else:
                        sim_side.forwarded(vreq, d.chosen.region, d.chosen.instance_id)
                        sim = (
                            "placed",
                            d.chosen.region,
                            d.chosen.instance_id,
                            d.chosen.prediction.ttft_ms,
                            d.chosen.feasible,
                        )
                assert live == sim, f"{tr.request_id}: live {live} != sim {sim}"
                decisions.append(sim)
    finally:
        await server.stop(None)
        await ledger.close(2.0)
    placed = [d for d in decisions if d[0] == "placed"]
    assert placed, "nothing was placed: the comparison would be vacuous"
    if policy != "round-robin":
        # Load-aware policies do not all pick one instance under this load.
        assert len({d[2] for d in placed}) >= 2 or len(placed) == 1
