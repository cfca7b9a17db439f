"""Publication of a region's WAN link statistics on NATS, and their decoding on the other side.

A region's KV transfer service holds one `LinkScheduler` per peer region. `LinkStatsPublisher`
publishes, every `period_s`, a `LinkStatsReport` on ``slomesh.region.<region>.links``
(`slomesh.bus.links_subject`) with each link's capacity, measured throughput (per class) and
spare bandwidth (capacity less the foreground's use), as the region agent publishes its state:
protobuf payload, trace context in the headers, nothing published while NATS is disconnected
(stale statistics are worse than none; the next period publishes fresh ones).

The scheduler side decodes a message with `parse_link_stats_report` and hands the report to
`ClusterView.apply_link_stats`; `ClusterView.link_spare_bytes_per_s(src, dst)` is then the
bandwidth a KV transfer that a request waits on can expect between two regions (``M_q``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from prometheus_client import Counter

from slomesh import bus
from slomesh.transfer.bandwidth import LinkScheduler
from slomesh.v1 import state_pb2

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PERIOD_S", "LinkStatsPublisher", "parse_link_stats_report"]

DEFAULT_PERIOD_S = 1.0
"""Seconds between two reports: the scheduler's throughput window (`DEFAULT_WINDOW_S`)."""

LINK_STATS_PUBLISHES = Counter(
    "slomesh_link_stats_publishes_total",
    "Link statistics reports published (outcome: ok, disconnected, error).",
    ["region", "outcome"],
)


class LinkStatsPublisher:
    """Publishes the statistics of a region's WAN links periodically.

    Args:
        region: this region's slug (the subject and `LinkStatsReport.region`).
        links: peer region -> the `LinkScheduler` of the link to it, or a callable returning
            that mapping (for a service whose links change), read at every report.
        nc: a connected nats-py client (`slomesh.bus.connect_nats`); None: `report` only.
        period_s: seconds between two reports, > 0.
        clock_ns: wall clock in Unix nanoseconds (the report's timestamp).

    Raises:
        ValueError: an empty region or a period out of range.
    """

    def __init__(
        self,
        region: str,
        links: Mapping[str, LinkScheduler] | Callable[[], Mapping[str, LinkScheduler]],
        nc: NatsClient | None = None,
        *,
        period_s: float = DEFAULT_PERIOD_S,
        clock_ns: Callable[[], int] = time.time_ns,
    ):
        if not region:
            raise ValueError("region: must not be empty")
        if not (period_s > 0 and math.isfinite(period_s)):
            raise ValueError(f"period_s: must be > 0 and finite, got {period_s}")
        self.region = region
        self._links = links
        self.nc = nc
        self.period_s = float(period_s)
        self.clock_ns = clock_ns
        self._task: asyncio.Task[None] | None = None

    @property
    def subject(self) -> str:
        """``slomesh.region.<region>.links``."""
        return bus.links_subject(self.region)

    def report(self) -> state_pb2.LinkStatsReport:
        """Every link's statistics now, as published."""
        links = self._links() if callable(self._links) else self._links
        return state_pb2.LinkStatsReport(
            region=self.region,
            timestamp_unix_ns=self.clock_ns(),
            links={peer: sched.stats().to_proto() for peer, sched in links.items()},
        )

    async def publish_once(self) -> bool:
        """Publishes one report. Returns False (logged, counted) when NATS is disconnected or
        the publish fails; never raises for a NATS failure."""
        if self.nc is None or not self.nc.is_connected:
            LINK_STATS_PUBLISHES.labels(self.region, "disconnected").inc()
            return False
        try:
            await bus.publish(self.nc, self.subject, self.report())
        except (nats.errors.Error, OSError) as exc:
            LINK_STATS_PUBLISHES.labels(self.region, "error").inc()
            logger.warning(
                "link stats publish failed", extra={"subject": self.subject, "error": repr(exc)}
            )
            return False
        LINK_STATS_PUBLISHES.labels(self.region, "ok").inc()
        return True

    async def run(self) -> None:
        """Publishes every `period_s` until cancelled (a period is not made up if late)."""
        loop = asyncio.get_running_loop()
        next_due = loop.time()
        while True:
            await self.publish_once()
            next_due = max(next_due + self.period_s, loop.time())
            await asyncio.sleep(next_due - loop.time())

    def start(self) -> asyncio.Task[None]:
        """Starts `run` in a task of the running loop (idempotent); returns it."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"link-stats-{self.region}"
            )
        return self._task

    async def stop(self) -> None:
        """Stops the periodic task (idempotent); does not close the NATS client."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def parse_link_stats_report(data: bytes, subject: str | None = None) -> state_pb2.LinkStatsReport:
    """Decodes a message of ``slomesh.region.<region>.links``.

    Args:
        data: the message payload (a serialised `LinkStatsReport`).
        subject: the message subject; fills `region` when the report has none.

    Returns:
        The report, with `region` set.

    Raises:
        ValueError: the payload is not a `LinkStatsReport`, it names no region (and the subject
            gives none), or a link's figures are negative or not finite.
    """
    try:
        report = state_pb2.LinkStatsReport.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a LinkStatsReport: {exc}") from exc
    if not report.region and subject is not None:
        report.region = bus.region_of_subject(subject)
    if not report.region:
        raise ValueError("LinkStatsReport names no region")
    for peer, link in report.links.items():
        for name in (
            "capacity_bytes_per_s",
            "throughput_bytes_per_s",
            "spare_bytes_per_s",
            "foreground_bytes_per_s",
        ):
            value = getattr(link, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"links[{peer!r}].{name}: must be >= 0 and finite, got {value}")
    return report
