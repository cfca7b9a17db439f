"""Link statistics reports: what the publisher builds and sends, how the scheduler side reads
them, and how `ClusterView` turns them into spare bandwidth per link."""

from __future__ import annotations

import asyncio
import math

import nats.errors
import pytest

from slomesh import bus
from slomesh.scheduler.view import ClusterView
from slomesh.topology import Topology
from slomesh.transfer.bandwidth import LinkScheduler, TrafficClass
from slomesh.transfer.link_stats import LinkStatsPublisher, parse_link_stats_report
from slomesh.v1 import state_pb2

from .virtual_loop import run_virtual

MIB = 1024 * 1024


class FakeNats:
    """The part of a nats-py client the publisher uses; records what it publishes."""

    def __init__(self, connected: bool = True, fail: bool = False):
        self.is_connected = connected
        self.fail = fail
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes, headers=None) -> None:
        if self.fail:
            raise nats.errors.ConnectionClosedError()
        self.published.append((subject, payload))


def test_report_holds_every_link():
    async def main():
        clock = asyncio.get_running_loop().time
        links = {
            "frankfurt": LinkScheduler(100 * MIB, clock=clock),
            "tokyo": LinkScheduler(50 * MIB, clock=clock),
        }
        await links["frankfurt"].send(4 * MIB, TrafficClass.FOREGROUND_KV)
        await links["tokyo"].send(2 * MIB, TrafficClass.PREWARM_WEIGHTS)
        pub = LinkStatsPublisher("washington-dc", links, clock_ns=lambda: 1234)
        return pub.report()

    report = run_virtual(main())
    assert report.region == "washington-dc" and report.timestamp_unix_ns == 1234
    assert set(report.links) == {"frankfurt", "tokyo"}
    fra, tyo = report.links["frankfurt"], report.links["tokyo"]
    assert fra.capacity_bytes_per_s == 100 * MIB
    assert fra.foreground_bytes_per_s == pytest.approx(4 * MIB)  # 4 MiB over a 1 s window
    assert fra.spare_bytes_per_s == pytest.approx(96 * MIB)
    assert tyo.prewarm_bytes_per_s == pytest.approx(2 * MIB)
    assert tyo.spare_bytes_per_s == pytest.approx(50 * MIB)  # prewarm does not use spare


def test_publisher_sends_on_the_links_subject_periodically():
    async def main():
        nc = FakeNats()
        sched = LinkScheduler(10 * MIB, clock=asyncio.get_running_loop().time)
        pub = LinkStatsPublisher("tokyo", lambda: {"frankfurt": sched}, nc, period_s=0.5)
        pub.start()
        await asyncio.sleep(2.25)  # virtual time: reports at 0, 0.5, 1.0, 1.5, 2.0
        await pub.stop()
        await pub.stop()  # idempotent
        return nc.published

    published = run_virtual(main())
    assert len(published) == 5
    for subject, payload in published:
        assert subject == "slomesh.region.tokyo.links" == bus.links_subject("tokyo")
        report = parse_link_stats_report(payload, subject)
        assert report.links["frankfurt"].capacity_bytes_per_s == 10 * MIB


@pytest.mark.parametrize("nc", [None, FakeNats(connected=False), FakeNats(fail=True)])
def test_publish_once_reports_failure_without_raising(nc):
    async def main():
        pub = LinkStatsPublisher("tokyo", {"frankfurt": LinkScheduler(1e6)}, nc)
        return await pub.publish_once()

    assert run_virtual(main()) is False


def test_publisher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="period_s"):
        LinkStatsPublisher("tokyo", {}, period_s=0)
    with pytest.raises(ValueError, match="region"):
        LinkStatsPublisher("", {})


class TestParse:
    def test_region_from_the_subject(self):
        payload = state_pb2.LinkStatsReport(
            links={"tokyo": state_pb2.LinkStats(capacity_bytes_per_s=1e6)}
        ).SerializeToString()
        report = parse_link_stats_report(payload, bus.links_subject("frankfurt"))
        assert report.region == "frankfurt"

    @pytest.mark.parametrize(
        ("payload", "match"),
        [
            (b"\xff\xff\xff", "not a LinkStatsReport"),
            (state_pb2.LinkStatsReport().SerializeToString(), "no region"),
            (
                state_pb2.LinkStatsReport(
                    region="a", links={"b": state_pb2.LinkStats(spare_bytes_per_s=-1.0)}
                ).SerializeToString(),
                "spare_bytes_per_s",
            ),
            (
                state_pb2.LinkStatsReport(
                    region="a", links={"b": state_pb2.LinkStats(capacity_bytes_per_s=math.inf)}
                ).SerializeToString(),
                "capacity_bytes_per_s",
            ),
        ],
    )
    def test_rejects(self, payload, match):
        with pytest.raises(ValueError, match=match):
            parse_link_stats_report(payload)


class TestClusterViewLinks:
    def _report(self, src: str, spares: dict[str, float]) -> state_pb2.LinkStatsReport:
        return state_pb2.LinkStatsReport(
            region=src,
            links={
                dst: state_pb2.LinkStats(capacity_bytes_per_s=2e8, spare_bytes_per_s=spare)
                for dst, spare in spares.items()
            },
        )

    def test_published_spare_then_topology_capacity_when_stale(self):
        now = [10**18]
        topology = Topology.default()
        view = ClusterView(topology, clock_ns=lambda: now[0])
        default = topology.link_capacity_bytes_per_s("tokyo", "frankfurt")
        assert view.link_spare_bytes_per_s("tokyo", "frankfurt") == default
        view.apply_link_stats(self._report("tokyo", {"frankfurt": 5e7}))
        assert view.link_spare_bytes_per_s("tokyo", "frankfurt") == 5e7
        # Directional: the reverse link has not been reported.
        assert view.link_spare_bytes_per_s("frankfurt", "tokyo") == default
        assert view.link_spare_bytes_per_s("tokyo", "tokyo") == math.inf
        now[0] += int((view.link_stats_staleness_ms + 1) * 1e6)
        assert view.link_spare_bytes_per_s("tokyo", "frankfurt") == default

    def test_without_topology_unknown_links_are_none_and_bad_figures_ignored(self):
        view = ClusterView(None, clock_ns=lambda: 10**18)
        assert view.link_spare_bytes_per_s("a", "b") is None
        view.apply_link_stats(self._report("a", {"b": 1e8, "c": math.nan}))
        assert view.link_spare_bytes_per_s("a", "b") == 1e8
        assert view.link_spare_bytes_per_s("a", "c") is None
