"""One ZMQ SUB socket per engine instance: KV events -> `InstanceKvTracker` -> deltas.

The subscriber decodes each message (`slomesh.kv.events`), applies it to the instance's tracker
and hands the resulting `InstanceBlockDelta` to a callback (the agent applies it to its prefix
index and queues it for publishing). Undecodable messages are logged, counted and treated as a
lost batch (the tracker flags its index as possibly incomplete). Tracker counters are mirrored
into the agent's Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

from services.region_agent import metrics
from slomesh.kv.events import KvEventDecodeError, decode_multipart
from slomesh.kv.index import InstanceKvTracker, TrackerStats
from slomesh.v1 import state_pb2

logger = logging.getLogger(__name__)


class KvEventSubscriber:
    """Receives one instance's KV events and feeds its tracker.

    Args:
        region: this region's name (metric label).
        tracker: the instance's tracker.
        endpoint: ZMQ endpoint of the engine's publisher.
        bind: True to bind `endpoint` (the engine connects), False to connect to it.
        on_delta: called with every non-empty delta, in order.
        context: ZMQ context to use (shared by the agent's subscribers).
    """

    def __init__(
        self,
        region: str,
        tracker: InstanceKvTracker,
        endpoint: str,
        bind: bool,
        on_delta: Callable[[state_pb2.InstanceBlockDelta], None],
        context: zmq.asyncio.Context,
    ) -> None:
        self.region = region
        self.tracker = tracker
        self.endpoint = endpoint
        self.bind = bind
        self.on_delta = on_delta
        self._ctx = context
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._reported = TrackerStats()
        self.decode_errors = 0

    @property
    def instance_id(self) -> str:
        return self.tracker.instance_id

    def start(self) -> None:
        """Opens the socket and starts receiving (needs a running event loop).

        Raises:
            zmq.ZMQError: the endpoint cannot be bound or connected.
        """
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self.bind:
            sock.bind(self.endpoint)
        else:
            sock.connect(self.endpoint)
        self._socket = sock
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"kv-events-{self.instance_id}"
        )
        logger.info(
            "subscribed to kv events",
            extra={"instance_id": self.instance_id, "endpoint": self.endpoint, "bind": self.bind},
        )

    async def stop(self) -> None:
        """Stops receiving and closes the socket."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _run(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            self.handle_frames(frames)

    def handle_frames(self, frames: list[bytes]) -> None:
        """Decodes and applies one message (public for tests)."""
        try:
            batch = decode_multipart(frames)
        except KvEventDecodeError as exc:
            self.decode_errors += 1
            metrics.KV_DECODE_ERRORS.labels(self.region, self.instance_id).inc()
            seq = None
            if len(frames) == 3 and len(frames[1]) == 8:
                seq = int.from_bytes(frames[1], "big")
            logger.warning(
                "undecodable kv event message",
                extra={"instance_id": self.instance_id, "error": str(exc), "seq": seq},
            )
            self.tracker.mark_lost(seq)
            self._report_stats()
            return
        if batch.unknown_event_types:
            metrics.KV_UNKNOWN_EVENTS.labels(self.region, self.instance_id).inc(
                len(batch.unknown_event_types)
            )
        gaps_before = self.tracker.stats.gaps
        delta = self.tracker.apply_batch(batch.seq, batch.events)
        if self.tracker.stats.gaps != gaps_before:
            logger.warning(
                "kv event sequence gap; index kept and flagged possibly incomplete",
                extra={
                    "instance_id": self.instance_id,
                    "seq": batch.seq,
                    "missed_batches": self.tracker.stats.missed_batches,
                },
            )
        self._report_stats()
        if delta.cleared or delta.stored_keys or delta.removed_keys:
            self.on_delta(delta)

    def _report_stats(self) -> None:
        now, last = self.tracker.stats, self._reported
        labels = (self.region, self.instance_id)
        metrics.KV_INDEX_POSSIBLY_INCOMPLETE.labels(*labels).set(
            1 if self.tracker.possibly_incomplete else 0
        )
        pairs = (
            (metrics.KV_EVENTS_APPLIED, now.events_applied - last.events_applied),
            (metrics.KV_EVENT_GAPS, now.gaps - last.gaps),
            (metrics.KV_MISSED_BATCHES, now.missed_batches - last.missed_batches),
            (metrics.KV_PUBLISHER_RESTARTS, now.publisher_restarts - last.publisher_restarts),
        )
        for counter, diff in pairs:
            if diff > 0:
                counter.labels(*labels).inc(diff)
        for reason, count in now.skipped_blocks.items():
            diff = count - last.skipped_blocks.get(reason, 0)
            if diff > 0:
                metrics.KV_BLOCKS_SKIPPED.labels(*labels, reason).inc(diff)
        self._reported = TrackerStats(
            events_applied=now.events_applied,
            gaps=now.gaps,
            missed_batches=now.missed_batches,
            publisher_restarts=now.publisher_restarts,
            skipped_blocks=now.skipped_blocks.copy(),
        )
