"""`services.global_scheduler.prefetch.PrefetchRunner`: one order's three steps (export on the
source, move on the prefetch class, import on the destination) against a fake KV transfer
service (a real gRPC server) and fake region agents; outcomes, metrics, spans, the tracker told.
The whole path on the mesh's real processes is tests/integration/test_kv_prefetch.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.global_scheduler.kv_moves import KvMover
from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.prefetch import PrefetchRunner
from services.global_scheduler.routes import Routes
from slomesh.scheduler.prefetch import HotPrefixTracker, PrefetchOrder
from slomesh.v1 import common_pb2, kv_transfer_pb2, region_agent_pb2
from tests.unit.global_scheduler.test_kv_moves import exporter, start  # noqa: F401

PREFIX = [100 + i for i in range(512)]
AGENTS = {"tokyo": "tokyo-agent:1", "frankfurt": "frankfurt-agent:1"}


class FakeAgent:
    """TEST DOUBLE of a region agent's stub: records each Generate and answers with one token
    and a completion (or, with ``complete=False``, ends the stream without one)."""

    def __init__(self, calls: list, endpoint: str, complete: bool = True):
        self.calls, self.endpoint, self.complete = calls, endpoint, complete

    def Generate(self, request, timeout=None):
        self.calls.append((self.endpoint, request))

        async def stream():
            yield region_agent_pb2.AgentGenerateResponse(
                tokens=common_pb2.TokenChunk(token_ids=[7])
            )
            if self.complete:
                yield region_agent_pb2.AgentGenerateResponse(
                    completion=common_pb2.Completion()
                )

        return stream()


class SpyTracker(HotPrefixTracker):
    def __init__(self):
        super().__init__()
        self.finished: list[PrefetchOrder] = []

    def done(self, order: PrefetchOrder) -> None:
        self.finished.append(order)
        super().done(order)


def order() -> PrefetchOrder:
    return PrefetchOrder(
        model="m",
        prefix_key=42,
        token_ids=np.asarray(PREFIX, dtype=np.uint32),
        from_tokens=0,
        source_region="tokyo",
        source_instance="tyo-l40s-0",
        dest_region="frankfurt",
        dest_instance="fra-a100-0",
        bytes=1 << 20,
    )


def runner(port: int | None, complete: bool = True):
    view = SimpleNamespace(
        instances=lambda regions: [
            SimpleNamespace(agent_endpoint="unrouted:1" if r == "tokyo" else AGENTS[r])
            for r in regions
        ],
        clock_ns=lambda: 0,
    )
    table = {} if port is None else {"frankfurt": {"frankfurt": f"127.0.0.1:{port}"}}
    metrics = SchedulerMetrics(CollectorRegistry())
    calls: list = []
    tracker = SpyTracker()
    run = PrefetchRunner(
        tracker,
        view,  # type: ignore[arg-type]
        KvMover(Routes(table), metrics),
        Routes({"tokyo": {"tokyo": AGENTS["tokyo"]}}),  # Frankfurt's from its state
        lambda endpoint: FakeAgent(calls, endpoint, complete),
        metrics,
    )
    return run, calls, tracker


def sample(run: PrefetchRunner, name: str, **labels: str) -> float:
    return run.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_prefetch_exports_moves_on_the_prefetch_class_and_imports(exporter):  # noqa: F811
    fake, server = await start("completed")
    try:
        run, calls, tracker = runner(server.port)
        assert await run.prefetch(order()) == "completed"
    finally:
        await server.stop(0)
    prompt = [*PREFIX, *PREFIX[:2]]
    # Export on the source, then import on the destination: one-token requests for P + P[:2].
    assert [(endpoint, r.instance_id) for endpoint, r in calls] == [
        ("tokyo-agent:1", "tyo-l40s-0"),
        ("frankfurt-agent:1", "fra-a100-0"),
    ]
    for _, request in calls:
        assert list(request.prompt_token_ids) == prompt and request.max_tokens == 1
    (moved,) = fake.requests
    assert moved.traffic_class == kv_transfer_pb2.PREFETCH_KV
    assert list(moved.token_ids) == prompt and moved.deadline_unix_s == 0
    assert (moved.source_region, moved.source_instance_id) == ("tokyo", "tyo-l40s-0")
    assert (moved.destination_region, moved.destination_instance_id) == (
        "frankfurt",
        "fra-a100-0",
    )
    assert sample(run, "slomesh_scheduler_kv_prefetches_total", outcome="completed") == 1
    assert sample(run, "slomesh_scheduler_kv_prefetch_bytes_total") == 1 << 20
    assert [o.prefix_key for o in tracker.finished] == [42]
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "kv_prefetch"]
    assert span.attributes["slomesh.outcome"] == "completed"
    assert span.attributes["slomesh.prefix_tokens"] == len(PREFIX)


@pytest.mark.parametrize("ending", ["failed", "refused"])
async def test_a_failed_move_ends_the_prefetch_before_the_import(exporter, ending):  # noqa: F811
    _, server = await start(ending)
    try:
        run, calls, tracker = runner(server.port)
        assert await run.prefetch(order()) == "failed"
    finally:
        await server.stop(0)
    assert [endpoint for endpoint, _ in calls] == ["tokyo-agent:1"]  # exported, not imported
    assert sample(run, "slomesh_scheduler_kv_prefetches_total", outcome="failed") == 1
    assert sample(run, "slomesh_scheduler_kv_prefetch_bytes_total") == 0
    assert [o.prefix_key for o in tracker.finished] == [42]  # may be planned again
    span = [s for s in exporter.get_finished_spans() if s.name == "kv_prefetch"][-1]
    assert not span.status.is_ok


async def test_an_export_without_a_completion_fails_the_prefetch(exporter):  # noqa: F811
    fake, server = await start("completed")
    try:
        run, calls, _ = runner(server.port, complete=False)
        assert await run.prefetch(order()) == "failed"
    finally:
        await server.stop(0)
    assert len(calls) == 1 and fake.requests == []


async def test_no_route_to_the_destination_moves_nothing():
    run, calls, tracker = runner(None)
    assert await run.prefetch(order()) == "no_endpoint"
    assert calls == []
    assert [o.prefix_key for o in tracker.finished] == [42]
    assert sample(run, "slomesh_scheduler_kv_prefetches_total", outcome="no_endpoint") == 1
