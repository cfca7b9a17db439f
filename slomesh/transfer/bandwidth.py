"""Bandwidth scheduler of one WAN link: strict priority, weighted fair sharing, EDF, pacing.

A region's KV transfer service holds one `LinkScheduler` per peer region (the link this
region -> that region, of a configured capacity in bytes/s). Every chunk the service sends
over the link first asks the scheduler for its bytes (`await scheduler.send(nbytes, cls)`) and
goes on the wire once granted. Three traffic classes share the link (issue 5):

- `TrafficClass.FOREGROUND_KV`: KV that a placed request waits on (its TTFT pays for it, the
  ``M_q`` of DESIGN.md section 2). **Strict priority** for the whole life of a foreground
  transfer: its sender opens a foreground flow (`LinkScheduler.open_flow`) before its first
  chunk and closes it after its last, and while any foreground flow is open no background
  chunk is granted, whether or not a foreground chunk is waiting at that moment (the sender
  may be reading the next chunk, or held back by the receiver's flow control). A foreground
  transfer thus sees the link as if it were idle, less at most the chunk already granted to
  the background when its flow opened. Background gets no share at all meanwhile rather than
  a small one: any share is taken from the foreground's completion time, which is what a
  placed request's TTFT pays, and a foreground flow is short (one prefix move; its stream ends
  at the request's deadline if not before). A chunk sent without a flow has strict priority
  only while it waits.
- `TrafficClass.PREFETCH_KV` (hot-prefix prefetch) and `TrafficClass.PREWARM_WEIGHTS` (model
  weight prewarm): only on the bandwidth the foreground leaves, shared between them by
  **weighted fair queueing** with the configured weights: under contention each class gets
  bytes in proportion to its weight, and a class alone gets everything the foreground leaves
  (work-conserving).
- Within a class: **earliest deadline first**; chunks without a deadline come last, in arrival
  order.

Fair queueing is start-time fair queueing over the two background classes: a class's next
chunk of ``n`` bytes gets the start tag ``S = max(v, F_c)`` and the finish tag
``F = S + n / w_c`` (``F_c`` the finish tag of the class's previous grant, ``v`` the start tag
of the last background grant); the class with the smallest start tag (then finish tag) is
granted. Tags are byte-exact, so the shares hold for chunks of any size and after few grants;
deficit round robin would serve the same shares in O(1) per chunk but with a per-round quantum
of at least one chunk, i.e. coarser interleaving, which buys nothing with two classes.

Pacing is a **token bucket** of rate ``capacity_bytes_per_s`` and depth ``burst_bytes``: a chunk
of ``n <= burst_bytes`` bytes is granted when the bucket holds ``n`` tokens and removes them; a
chunk larger than the bucket is granted when the bucket is full and leaves it in debt. Over any
interval of ``T`` seconds the link therefore grants at most ``capacity * T + max(burst_bytes,
largest chunk)`` bytes (the conformance bound of a token-bucket flow, RFC 2215), and a link
kept busy is granted its full capacity: a sender that resumes up to
``(burst_bytes - chunk) / capacity`` seconds late (event-loop jitter) loses no tokens. The
default depth, `DEFAULT_BURST_BYTES` = 2 MiB, is two 1 MiB chunks: one chunk plus one chunk of
slack, i.e. ~5 ms of jitter absorbed at 200 MB/s, while the bytes sent above the rate stay
about 1 % of a second's worth at that rate.

Grants are made in the units the caller asks for (the transfer service sends chunks of e.g.
1 MiB); the scheduler never splits a chunk. Measured throughput is the bytes granted (and
taken: a grant whose sender was cancelled is refunded) over the last `window_s` seconds.

Sources:
    - Weighted fair queueing: A. Demers, S. Keshav, S. Shenker, "Analysis and Simulation of a
      Fair Queueing Algorithm", SIGCOMM 1989; start-time fair queueing (the tags above):
      P. Goyal, H. M. Vin, H. Cheng, "Start-time Fair Queueing: A Scheduling Algorithm for
      Integrated Services Packet Switching Networks", SIGCOMM 1996.
    - Deficit round robin (the O(1) alternative): M. Shreedhar, G. Varghese, "Efficient Fair
      Queuing using Deficit Round Robin", SIGCOMM 1995.
    - Token bucket: J. Turner, "New directions in communications (or which way to the
      information age?)", IEEE Communications Magazine 1986; its (r, b) conformance bound as in
      RFC 2215 (token bucket TSpec).
    - Earliest deadline first: C. L. Liu, J. W. Layland, "Scheduling Algorithms for
      Multiprogramming in a Hard-Real-Time Environment", JACM 1973.

The scheduler does no I/O, is not thread-safe (use it from one asyncio loop) and takes its clock
as an argument; that clock must agree with the running loop's (`loop.time`, which is
`time.monotonic` for the default loops), since waits are scheduled with `loop.call_later`.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Self

from slomesh.v1 import state_pb2

__all__ = [
    "BACKGROUND_CLASSES",
    "DEFAULT_BURST_BYTES",
    "DEFAULT_CLASS_WEIGHTS",
    "DEFAULT_WINDOW_S",
    "LinkFlow",
    "LinkScheduler",
    "LinkStats",
    "TrafficClass",
]


class TrafficClass(enum.IntEnum):
    """What a chunk on a WAN link is for; a lower value is served first (see the module doc)."""

    FOREGROUND_KV = 0
    """KV a placed request waits on: strict priority."""
    PREFETCH_KV = 1
    """Hot-prefix KV prefetched to a region before requests need it: background."""
    PREWARM_WEIGHTS = 2
    """Model weights copied to a region before an instance switches to them: background."""


BACKGROUND_CLASSES: tuple[TrafficClass, ...] = (
    TrafficClass.PREFETCH_KV,
    TrafficClass.PREWARM_WEIGHTS,
)
"""The classes served on the bandwidth the foreground leaves, by weighted fair queueing."""

DEFAULT_CLASS_WEIGHTS: Mapping[TrafficClass, float] = MappingProxyType(
    {TrafficClass.PREFETCH_KV: 1.0, TrafficClass.PREWARM_WEIGHTS: 1.0}
)
"""Equal shares of the leftover bandwidth for prefetch and prewarm."""

DEFAULT_BURST_BYTES = 2 * 1024 * 1024
"""Token-bucket depth: two 1 MiB chunks (one chunk + one chunk of jitter slack; module doc)."""

DEFAULT_WINDOW_S = 1.0
"""Window over which `LinkScheduler.stats` measures throughput, seconds."""

_GRANT_SLACK_S = 1e-6
"""A grant may come this early (in tokens' worth of time), so that a timer firing within the
clock's resolution of its due time grants instead of re-arming itself forever."""


@dataclass(frozen=True)
class LinkStats:
    """A snapshot of one link's scheduler.

    Attributes:
        capacity_bytes_per_s: configured capacity, bytes/s.
        throughput_bytes_per_s: bytes/s granted over the last `window_s`, every class.
        class_throughput_bytes_per_s: the same per traffic class.
        foreground_bytes_per_s: bytes/s granted to `TrafficClass.FOREGROUND_KV`.
        spare_bytes_per_s: ``max(0, capacity - foreground)``: what a new foreground transfer
            could get (the background yields to it), bytes/s.
        queued_bytes: bytes waiting for a grant, per traffic class.
        granted_bytes_total: bytes granted since the scheduler started, per traffic class.
        window_s: the measurement window, seconds.
        open_flows: flows open now (`LinkScheduler.open_flow`), per traffic class; while
            ``open_flows[FOREGROUND_KV] > 0`` no background chunk is granted.
    """

    capacity_bytes_per_s: float
    throughput_bytes_per_s: float
    class_throughput_bytes_per_s: Mapping[TrafficClass, float]
    foreground_bytes_per_s: float
    spare_bytes_per_s: float
    queued_bytes: Mapping[TrafficClass, int]
    granted_bytes_total: Mapping[TrafficClass, int]
    window_s: float
    open_flows: Mapping[TrafficClass, int] = field(
        default_factory=lambda: MappingProxyType(dict.fromkeys(TrafficClass, 0))
    )

    @property
    def total_queued_bytes(self) -> int:
        """Bytes waiting for a grant, every class."""
        return sum(self.queued_bytes.values())

    def to_proto(self) -> state_pb2.LinkStats:
        """The `slomesh.v1.LinkStats` message published on ``slomesh.region.<r>.links``."""
        rates = self.class_throughput_bytes_per_s
        return state_pb2.LinkStats(
            capacity_bytes_per_s=self.capacity_bytes_per_s,
            throughput_bytes_per_s=self.throughput_bytes_per_s,
            spare_bytes_per_s=self.spare_bytes_per_s,
            foreground_bytes_per_s=self.foreground_bytes_per_s,
            queued_bytes=self.total_queued_bytes,
            prefetch_bytes_per_s=rates[TrafficClass.PREFETCH_KV],
            prewarm_bytes_per_s=rates[TrafficClass.PREWARM_WEIGHTS],
            queued_foreground_bytes=self.queued_bytes[TrafficClass.FOREGROUND_KV],
            window_s=self.window_s,
        )


@dataclass(eq=False)
class _Waiter:
    """One chunk waiting for its grant; ordered by (deadline, arrival) within its class."""

    nbytes: int
    traffic_class: TrafficClass
    key: tuple[float, int]
    future: asyncio.Future[None]
    queued: bool = True
    granted: bool = False

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


@dataclass
class _Window:
    """Bytes taken per class over a sliding window of time."""

    window_s: float
    events: deque[tuple[float, TrafficClass, int]] = field(default_factory=deque)
    bytes: dict[TrafficClass, int] = field(default_factory=lambda: dict.fromkeys(TrafficClass, 0))

    def add(self, now: float, traffic_class: TrafficClass, nbytes: int) -> None:
        self.events.append((now, traffic_class, nbytes))
        self.bytes[traffic_class] += nbytes
        self.prune(now)

    def prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self.events and self.events[0][0] <= horizon:
            _, cls, nbytes = self.events.popleft()
            self.bytes[cls] -= nbytes


class LinkFlow:
    """One transfer's chunks on a link, from before its first chunk to after its last.

    Made by `LinkScheduler.open_flow`. While a `TrafficClass.FOREGROUND_KV` flow is open the
    link grants nothing to the background classes (module doc). A context manager: leaving
    the ``with`` block closes it however the block ends (return, exception, cancellation).
    `close` is idempotent, so it may also be tied to the end of an RPC (a gRPC context's done
    callback) as a second guarantee.

    Attributes:
        traffic_class: the class of the transfer's chunks.
    """

    __slots__ = ("_open", "_scheduler", "traffic_class")

    def __init__(self, scheduler: LinkScheduler, traffic_class: TrafficClass):
        self._scheduler = scheduler
        self._open = True
        self.traffic_class = traffic_class

    @property
    def closed(self) -> bool:
        """True once `close` has run."""
        return not self._open

    def close(self) -> None:
        """Ends the flow (a second call does nothing); the background resumes if it was the
        link's last open foreground flow."""
        if self._open:
            self._open = False
            self._scheduler._close_flow(self.traffic_class)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LinkScheduler:
    """Grants the bytes of one WAN link (this region -> a peer region) to three traffic classes.

    See the module docstring for the policy (strict priority, start-time fair queueing, EDF)
    and the pacing (token bucket) with their sources.

    Args:
        capacity_bytes_per_s: configured capacity of the link, bytes/s, > 0 and finite.
        class_weights: weights of `TrafficClass.PREFETCH_KV` and
            `TrafficClass.PREWARM_WEIGHTS` in the fair share of what the foreground leaves,
            each > 0; a class left out weighs 1.0. The foreground has no weight (strict
            priority): naming it is an error.
        burst_bytes: token-bucket depth, bytes, >= 1 (`DEFAULT_BURST_BYTES`). Set it to at
            least the chunk size plus the sender's wake-up jitter times the capacity, or the
            link will not reach its capacity when busy.
        clock: monotonic clock in seconds; must agree with the event loop's clock.
        window_s: window of the throughput measurement in `stats`, seconds, > 0.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self,
        capacity_bytes_per_s: float,
        *,
        class_weights: Mapping[TrafficClass, float] = DEFAULT_CLASS_WEIGHTS,
        burst_bytes: int = DEFAULT_BURST_BYTES,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = DEFAULT_WINDOW_S,
    ):
        _check_capacity(capacity_bytes_per_s)
        burst = operator.index(burst_bytes)
        if burst < 1:
            raise ValueError(f"burst_bytes: must be >= 1, got {burst_bytes}")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s: must be > 0 and finite, got {window_s}")
        weights = dict.fromkeys(BACKGROUND_CLASSES, 1.0)
        for cls, weight in class_weights.items():
            cls = TrafficClass(cls)
            if cls not in BACKGROUND_CLASSES:
                raise ValueError(
                    f"class_weights: {cls.name} has strict priority and takes no weight"
                )
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"class_weights[{cls.name}]: must be > 0, got {weight}")
            weights[cls] = float(weight)
        self._capacity = float(capacity_bytes_per_s)
        self._burst = burst
        self._weights = weights
        self._clock = clock
        self._tokens = float(burst)
        self._refilled_at = clock()
        self._queues: dict[TrafficClass, list[_Waiter]] = {c: [] for c in TrafficClass}
        self._queued_bytes: dict[TrafficClass, int] = dict.fromkeys(TrafficClass, 0)
        self._finish_tag: dict[TrafficClass, float] = dict.fromkeys(BACKGROUND_CLASSES, 0.0)
        self._virtual_time = 0.0
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._window = _Window(float(window_s))
        self._granted_total: dict[TrafficClass, int] = dict.fromkeys(TrafficClass, 0)
        self._open_flows: dict[TrafficClass, int] = dict.fromkeys(TrafficClass, 0)

    # -- configuration ---------------------------------------------------------------------

    @property
    def capacity_bytes_per_s(self) -> float:
        """Configured capacity, bytes/s."""
        return self._capacity

    @property
    def burst_bytes(self) -> int:
        """Token-bucket depth, bytes."""
        return self._burst

    @property
    def class_weights(self) -> Mapping[TrafficClass, float]:
        """Fair-share weights of the background classes."""
        return MappingProxyType(self._weights)

    def set_capacity(self, capacity_bytes_per_s: float) -> None:
        """Changes the link's capacity from now on (tokens earned so far are kept).

        Args:
            capacity_bytes_per_s: new capacity, bytes/s, > 0 and finite.

        Raises:
            ValueError: a capacity out of range (the scheduler is left unchanged).
        """
        _check_capacity(capacity_bytes_per_s)
        self._refill(self._clock())
        self._capacity = float(capacity_bytes_per_s)
        if self._loop is not None and any(self._queues.values()):
            self._dispatch()

    # -- granting --------------------------------------------------------------------------

    async def send(
        self,
        nbytes: int,
        traffic_class: TrafficClass,
        deadline_unix_s: float | None = None,
    ) -> None:
        """Waits until the link grants `nbytes` to `traffic_class`; then send them at once.

        Args:
            nbytes: bytes of the chunk, >= 1 (grants are never split).
            traffic_class: what the chunk is for (a `TrafficClass` or its int value).
            deadline_unix_s: when the transfer this chunk belongs to must be done, Unix
                seconds; orders chunks of one class (earliest first). None: after every chunk
                with a deadline, in arrival order.

        Raises:
            ValueError: a bad argument (nothing is queued; INVALID_ARGUMENT for a service).
            asyncio.CancelledError: the caller was cancelled; the chunk is withdrawn, and a
                grant it had already received is refunded to the link.
        """
        n = operator.index(nbytes)
        if n < 1:
            raise ValueError(f"nbytes: must be >= 1, got {nbytes}")
        cls = TrafficClass(traffic_class)
        if deadline_unix_s is not None and not math.isfinite(deadline_unix_s):
            raise ValueError(f"deadline_unix_s: must be finite, got {deadline_unix_s}")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loop = loop
        deadline = math.inf if deadline_unix_s is None else float(deadline_unix_s)
        waiter = _Waiter(n, cls, (deadline, next(self._seq)), loop.create_future())
        heapq.heappush(self._queues[cls], waiter)
        self._queued_bytes[cls] += n
        self._dispatch()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.granted:
                self._refund(waiter)
            else:
                self._withdraw(waiter)
            raise
        now = self._clock()
        self._window.add(now, cls, n)
        self._granted_total[cls] += n

    def open_flow(self, traffic_class: TrafficClass) -> LinkFlow:
        """Opens a flow of `traffic_class`: one transfer, from its first chunk to its last.

        While a `TrafficClass.FOREGROUND_KV` flow is open no background chunk is granted, even
        when none of its chunks waits at the scheduler (strict priority for the transfer's
        whole life, module doc); flows of the background classes are only counted
        (`LinkStats.open_flows`). The flow's chunks still ask for their bytes with `send`.

        Args:
            traffic_class: the class of the transfer's chunks (a `TrafficClass` or its value).

        Returns:
            The open flow. Close it when the transfer ends, however it ends (use it as a
            context manager), or the background is held back until it is.

        Raises:
            ValueError: an unknown traffic class (no flow is opened).
        """
        cls = TrafficClass(traffic_class)
        self._open_flows[cls] += 1
        return LinkFlow(self, cls)

    def stats(self) -> LinkStats:
        """The link's capacity, measured throughput, spare bandwidth and queues, now."""
        now = self._clock()
        self._window.prune(now)
        window_s = self._window.window_s
        rates = {cls: self._window.bytes[cls] / window_s for cls in TrafficClass}
        foreground = rates[TrafficClass.FOREGROUND_KV]
        return LinkStats(
            capacity_bytes_per_s=self._capacity,
            throughput_bytes_per_s=sum(rates.values()),
            class_throughput_bytes_per_s=MappingProxyType(rates),
            foreground_bytes_per_s=foreground,
            spare_bytes_per_s=max(0.0, self._capacity - foreground),
            queued_bytes=MappingProxyType(dict(self._queued_bytes)),
            granted_bytes_total=MappingProxyType(dict(self._granted_total)),
            window_s=window_s,
            open_flows=MappingProxyType(dict(self._open_flows)),
        )

    # -- internals -------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        elapsed = now - self._refilled_at
        if elapsed > 0:
            self._tokens = min(float(self._burst), self._tokens + elapsed * self._capacity)
            self._refilled_at = now

    def _dispatch(self) -> None:
        """Grants every chunk the bucket allows now, in policy order; arms a timer for the next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._refill(self._clock())
        slack = self._capacity * _GRANT_SLACK_S
        while (waiter := self._head()) is not None:
            need = min(waiter.nbytes, self._burst)
            if self._tokens + slack < need:
                assert self._loop is not None
                delay_s = (need - self._tokens) / self._capacity
                self._timer = self._loop.call_later(delay_s, self._dispatch)
                return
            self._grant(waiter)

    def _head(self) -> _Waiter | None:
        """The chunk to grant next: foreground first (EDF), else (no foreground flow open) the
        fair-queueing pick."""
        for cls in TrafficClass:
            self._drop_cancelled(cls)
        fg = self._queues[TrafficClass.FOREGROUND_KV]
        if fg:
            return fg[0]
        if self._open_flows[TrafficClass.FOREGROUND_KV]:
            return None  # a foreground transfer holds the link between its chunks
        best: tuple[float, float, int] | None = None
        pick: _Waiter | None = None
        for cls in BACKGROUND_CLASSES:
            queue = self._queues[cls]
            if not queue:
                continue
            start = max(self._virtual_time, self._finish_tag[cls])
            finish = start + queue[0].nbytes / self._weights[cls]
            key = (start, finish, int(cls))
            if best is None or key < best:
                best, pick = key, queue[0]
        return pick

    def _close_flow(self, cls: TrafficClass) -> None:
        """Counts a flow closed (`LinkFlow.close`); the last foreground one unblocks the
        background."""
        self._open_flows[cls] -= 1
        if (
            cls is TrafficClass.FOREGROUND_KV
            and not self._open_flows[cls]
            and self._loop is not None
            and not self._loop.is_closed()
            and any(self._queues.values())
        ):
            self._dispatch()

    def _drop_cancelled(self, cls: TrafficClass) -> None:
        # A waiter whose task was cancelled has a cancelled future before its `except` runs.
        queue = self._queues[cls]
        while queue and queue[0].future.done():
            self._withdraw(queue[0])

    def _grant(self, waiter: _Waiter) -> None:
        cls = waiter.traffic_class
        popped = heapq.heappop(self._queues[cls])
        assert popped is waiter
        waiter.queued = False
        waiter.granted = True
        self._queued_bytes[cls] -= waiter.nbytes
        self._tokens -= waiter.nbytes
        if cls in self._finish_tag:
            start = max(self._virtual_time, self._finish_tag[cls])
            self._finish_tag[cls] = start + waiter.nbytes / self._weights[cls]
            self._virtual_time = start
        waiter.future.set_result(None)

    def _withdraw(self, waiter: _Waiter) -> None:
        """Removes a waiter that was not granted (idempotent); re-plans the next grant."""
        if not waiter.queued:
            return
        waiter.queued = False
        queue = self._queues[waiter.traffic_class]
        if queue and queue[0] is waiter:
            heapq.heappop(queue)
        else:
            queue.remove(waiter)
            heapq.heapify(queue)
        self._queued_bytes[waiter.traffic_class] -= waiter.nbytes
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(self._dispatch)

    def _refund(self, waiter: _Waiter) -> None:
        """Returns a grant its (cancelled) sender never used: tokens and fair-queueing tag."""
        self._refill(self._clock())
        self._tokens = min(float(self._burst), self._tokens + waiter.nbytes)
        cls = waiter.traffic_class
        if cls in self._finish_tag:
            self._finish_tag[cls] -= waiter.nbytes / self._weights[cls]
        if any(self._queues.values()):
            self._dispatch()


def _check_capacity(capacity_bytes_per_s: float) -> None:
    if not (capacity_bytes_per_s > 0 and math.isfinite(capacity_bytes_per_s)):
        raise ValueError(
            f"capacity_bytes_per_s: must be > 0 and finite, got {capacity_bytes_per_s}"
        )
