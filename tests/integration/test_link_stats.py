"""Link statistics over a real nats-server: a region's publisher to a scheduler's view."""

from __future__ import annotations

import asyncio

import pytest

from slomesh import bus
from slomesh.scheduler.view import ClusterView
from slomesh.transfer.bandwidth import LinkScheduler, TrafficClass
from slomesh.transfer.link_stats import LinkStatsPublisher, parse_link_stats_report

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


async def test_published_spare_bandwidth_reaches_the_view(nats_server):
    link = LinkScheduler(100 * MIB, window_s=10.0)
    view = ClusterView(None)
    received: list[str] = []
    sub_nc = await bus.connect_nats(nats_server.url, "test-scheduler")
    pub_nc = await bus.connect_nats(nats_server.url, "test-kv-transfer")
    got = asyncio.Event()

    async def on_links(msg) -> None:
        report = parse_link_stats_report(msg.data, msg.subject)
        view.apply_link_stats(report)
        received.append(report.region)
        got.set()

    try:
        await sub_nc.subscribe(bus.ALL_LINKS, cb=on_links)
        await sub_nc.flush()
        await link.send(10 * MIB, TrafficClass.FOREGROUND_KV)
        await link.send(MIB, TrafficClass.PREFETCH_KV)
        publisher = LinkStatsPublisher("tokyo", {"frankfurt": link}, pub_nc, period_s=0.2)
        publisher.start()
        await asyncio.wait_for(got.wait(), timeout=10)
        await publisher.stop()
    finally:
        await pub_nc.drain()
        await sub_nc.drain()
    assert received[0] == "tokyo"
    spare = view.link_spare_bytes_per_s("tokyo", "frankfurt")
    # 10 MiB of foreground within the 10 s window (the prefetch does not count against spare).
    assert spare == pytest.approx(100 * MIB - MIB, rel=1e-6)
