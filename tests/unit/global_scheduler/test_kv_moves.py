"""`services.global_scheduler.kv_moves`: the wait's deadline, and `KvMover` against a KV
transfer service test double (a real gRPC server on loopback whose transfers end as told)."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from services.global_scheduler.kv_moves import KvMove, KvMover, move_deadline_unix_ns
from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.routes import Routes
from slomesh.service import start_grpc_server
from slomesh.telemetry import setup_telemetry
from slomesh.v1 import common_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc, scheduler_pb2
from tests.unit.scheduler.factories import MODEL, make_request, prompt

_P = kv_transfer_pb2.TransferProgress
S = 1_000_000_000  # ns per second
#: A request of a class without a TTFT target: its moves may take up to max_wait_ms.
BATCH = make_request(slo_class="batch")


class TestMoveDeadline:
    def test_slo_less_the_rest_of_the_predicted_ttft(self):
        # Target 2000 ms; the rest (RTT, queue, prefill) is 1500 - 300 = 1200 ms: 800 ms left.
        deadline = move_deadline_unix_ns(10 * S, 2000.0, 1500.0, 300.0, now_unix_ns=10 * S)
        assert deadline == 10 * S + 800_000_000

    def test_time_already_spent_counts(self):
        deadline = move_deadline_unix_ns(10 * S, 2000.0, 1500.0, 300.0, now_unix_ns=10 * S + 100)
        assert deadline == 10 * S + 800_000_000

    def test_no_slo_time_left_still_gets_the_predicted_move(self):
        deadline = move_deadline_unix_ns(10 * S, 500.0, 1500.0, 300.0, now_unix_ns=11 * S)
        assert deadline == 11 * S + 300_000_000

    def test_no_ttft_target_waits_at_most_max_wait(self):
        deadline = move_deadline_unix_ns(
            10 * S, math.inf, 1500.0, 300.0, max_wait_ms=2000.0, now_unix_ns=10 * S
        )
        assert deadline == 12 * S

    def test_max_wait_caps_a_generous_slo(self):
        deadline = move_deadline_unix_ns(
            10 * S, 60_000.0, 1500.0, 300.0, max_wait_ms=1000.0, now_unix_ns=10 * S
        )
        assert deadline == 11 * S

    def test_non_positive_max_wait_is_refused(self):
        with pytest.raises(ValueError, match="max_wait_ms"):
            move_deadline_unix_ns(0, 1000.0, 0.0, 0.0, max_wait_ms=0.0)


def test_move_from_placement():
    placement = scheduler_pb2.Placement(
        region="frankfurt",
        instance_id="fra-a100-0",
        kv_transfer_source_region="tokyo",
        kv_transfer_source_instance="tyo-l40s-0",
        kv_transfer_prefix_tokens=32,
        kv_transfer_bytes=4096,
    )
    move = KvMove.from_placement(placement)
    assert move == KvMove("tokyo", "tyo-l40s-0", "frankfurt", "fra-a100-0", 32, 4096)
    assert move.token_ids(prompt(100)) == prompt(32)
    assert KvMove.from_placement(scheduler_pb2.Placement(region="frankfurt")) is None


class FakeTransferService(kv_transfer_pb2_grpc.KVTransferServicer):
    """TEST DOUBLE of a region's KV transfer service: every transfer ends as `ending` says
    ("completed", "already_present", "failed", "refused": TransferPrefix NOT_FOUND, "hang":
    never ends); it records the TransferPrefix and Cancel requests."""

    def __init__(self, ending: str):
        self.ending = ending
        self.requests: list[kv_transfer_pb2.TransferPrefixRequest] = []
        self.cancelled: list[str] = []
        self.cancel_received = asyncio.Event()
        self.watching = asyncio.Event()

    async def TransferPrefix(self, request, context):
        self.requests.append(request)
        if self.ending == "refused":
            await context.abort(grpc.StatusCode.NOT_FOUND, "source holds no prefix")
        return kv_transfer_pb2.TransferHandle(
            transfer_id=request.transfer_id,
            region="frankfurt",
            prefix_tokens=len(request.token_ids),
            bytes_total=1 << 20,
            already_present=self.ending == "already_present",
        )

    async def Watch(self, request, context):
        self.watching.set()
        yield _P(transfer_id=request.transfer_id, state=_P.RUNNING)
        if self.ending == "hang":
            await asyncio.Event().wait()
        state = _P.COMPLETED if self.ending == "completed" else _P.FAILED
        yield _P(
            transfer_id=request.transfer_id,
            state=state,
            error="" if state == _P.COMPLETED else "source's folder is gone",
            error_code="" if state == _P.COMPLETED else "NOT_FOUND",
        )

    async def Cancel(self, request, context):
        self.cancelled.append(request.transfer_id)
        self.cancel_received.set()
        return _P(transfer_id=request.transfer_id, state=_P.CANCELLED)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    setup_telemetry("test-kv-moves", extra_exporters=[exporter])
    return exporter


async def start(ending: str):
    fake = FakeTransferService(ending)
    handle = await start_grpc_server(
        [(kv_transfer_pb2_grpc.add_KVTransferServicer_to_server, fake)],
        ["slomesh.v1.KVTransfer"],
    )
    return fake, handle


def mover_for(port: int | None, max_wait_ms: float = 10_000.0) -> KvMover:
    table = {} if port is None else {"washington-dc": {"frankfurt": f"127.0.0.1:{port}"}}
    return KvMover(Routes(table), SchedulerMetrics(CollectorRegistry()), max_wait_ms)


def moving_placement(prefix_tokens: int = 64) -> scheduler_pb2.Placement:
    return scheduler_pb2.Placement(
        region="frankfurt",
        instance_id="fra-a100-0",
        predicted=common_pb2.PredictedTimings(ttft_ms=400.0, transfer_ms=100.0),
        kv_transfer_source_region="tokyo",
        kv_transfer_source_instance="tyo-l40s-0",
        kv_transfer_prefix_tokens=prefix_tokens,
        kv_transfer_bytes=1 << 20,
    )


def count(mover: KvMover, outcome: str) -> float:
    return mover.metrics.registry.get_sample_value(
        "slomesh_scheduler_kv_transfers_total", {"outcome": outcome}
    ) or 0.0


def kv_spans(exporter: InMemorySpanExporter) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == "kv_transfer"]


async def test_placement_without_a_move_moves_nothing(exporter):
    mover = mover_for(None)
    placement = scheduler_pb2.Placement(region="frankfurt", instance_id="fra-a100-0")
    assert await mover.run(make_request(), placement, 0) == ""
    assert kv_spans(exporter) == []


async def test_completed_move_sends_the_prefix_as_foreground_kv(exporter):
    fake, handle = await start("completed")
    mover = mover_for(handle.port)
    request = make_request(prompt(200), slo_class="batch")
    try:
        outcome = await mover.run(request, moving_placement(64), received_unix_ns=0)
    finally:
        await mover.close()
        await handle.stop(0)
    assert outcome == "completed"
    (sent,) = fake.requests
    assert list(sent.token_ids) == prompt(64)
    assert sent.traffic_class == kv_transfer_pb2.FOREGROUND_KV
    assert (sent.source_region, sent.source_instance_id) == ("tokyo", "tyo-l40s-0")
    assert (sent.destination_region, sent.destination_instance_id) == ("frankfurt", "fra-a100-0")
    assert sent.model == MODEL and sent.deadline_unix_s > 0
    assert count(mover, "completed") == 1
    (span,) = kv_spans(exporter)
    assert span.attributes["slomesh.outcome"] == "completed"
    assert span.attributes["slomesh.bytes"] == 1 << 20
    assert span.attributes["slomesh.transfer_id"] == sent.transfer_id


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [("already_present", "already_present"), ("failed", "failed"), ("refused", "failed")],
)
async def test_outcomes(exporter, ending, outcome):
    fake, handle = await start(ending)
    mover = mover_for(handle.port)
    try:
        outcome_seen = await mover.run(BATCH, moving_placement(), received_unix_ns=0)
        assert outcome_seen == outcome
    finally:
        await mover.close()
        await handle.stop(0)
    assert count(mover, outcome) == 1
    (span,) = kv_spans(exporter)
    assert span.attributes["slomesh.outcome"] == outcome
    if outcome == "failed":
        assert "NOT_FOUND" in span.status.description
    assert fake.cancelled == []


async def test_no_route_to_the_destination_is_no_endpoint(exporter):
    mover = mover_for(None)
    assert await mover.run(BATCH, moving_placement(), 0) == "no_endpoint"
    assert count(mover, "no_endpoint") == 1


async def test_late_move_times_out_and_is_cancelled(exporter):
    fake, handle = await start("hang")
    mover = mover_for(handle.port, max_wait_ms=500.0)
    try:
        # A class without a TTFT target: the wait is max_wait_ms.
        outcome = await mover.run(BATCH, moving_placement(), 0)
        await asyncio.wait_for(fake.cancel_received.wait(), 10)
    finally:
        await mover.close()
        await handle.stop(0)
    assert outcome == "timeout"
    (span,) = kv_spans(exporter)
    # Cancelled by the id the scheduler chose (whether or not TransferPrefix got there first).
    assert fake.cancelled == [span.attributes["slomesh.transfer_id"]]
    assert count(mover, "timeout") == 1


async def test_client_cancel_cancels_the_transfer(exporter):
    fake, handle = await start("hang")
    mover = mover_for(handle.port)
    try:
        task = asyncio.create_task(mover.run(BATCH, moving_placement(), 0))
        await asyncio.wait_for(fake.watching.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(fake.cancel_received.wait(), 10)
    finally:
        await mover.close()
        await handle.stop(0)
    (span,) = kv_spans(exporter)
    assert fake.cancelled == [span.attributes["slomesh.transfer_id"]]
    assert count(mover, "cancelled") == 1
    assert span.attributes["slomesh.outcome"] == "cancelled"


def test_non_positive_max_wait_is_refused():
    with pytest.raises(ValueError, match="kv_transfer_max_wait_ms"):
        mover_for(None, max_wait_ms=0.0)
