"""Soft admission's best-effort queue, shared by the live scheduler and the simulator.

DESIGN.md section 2: a request no region can serve within its SLO is refused with
RESOURCE_EXHAUSTED and a retry hint, or -- for a best-effort tier -- goes to a best-effort
queue. `slomesh.scheduler.policy.Policy.place` says ``queued`` for a best-effort request that no
candidate admits and that would push the requests already running on every candidate past their
SLO (the profile's ``best_effort_admission`` filters, by default ``protect-inflight`` and
``kv-room``: their TPOT, and KV cache room for them all). The
caller then holds it in a `BestEffortQueue` and calls `BestEffortQueue.dispatch` whenever the
cluster changes (each `RegionState` applied, a stream ending) and when a waiting request's
deadline comes (`next_deadline_unix_ns`):

- **Order**: entries are tried by priority (lower = more urgent, vLLM's convention), then
  arrival. Within one dispatch pass, an entry that still cannot be placed holds every instance
  it could run on (its candidates that passed the hard filters): the entries after it -- the
  same or a less urgent priority, or a later arrival -- do not get those instances in that
  pass (``exclude_instances``). A later best-effort request therefore never overtakes an
  earlier one of the same or a more urgent priority on capacity both could use, while one for
  another model or other regions is not held up behind it. A new best-effort request that
  finds such an entry waiting joins the queue instead of being placed at once (`must_wait`).
- **No starvation**: an entry that has waited ``max_wait_ms`` is placed with ``wait_expired``:
  on the fallback scorers' pick (lowest predicted TTFT by default) among every filter
  survivor, whatever the admission says. A flood of later SLO requests can delay it by at most
  ``max_wait_ms``.
- **Bound**: at most ``limit`` entries. A new request beyond that is refused
  (`BestEffortQueueFull`, RESOURCE_EXHAUSTED with the time until the oldest entry must leave),
  unless it is more urgent than the least urgent entry, which is then shed (refused) instead:
  under overload the less urgent go first.
- **Nothing is lost**: every entry leaves through `dispatch` (placed, or failed when even an
  expired wait finds no candidate), `remove` (a client cancel), `offer` (shed) or `drain`
  (shutdown: the caller refuses them with UNAVAILABLE).

The queue is pure logic: no I/O, no asyncio; the clock is injected (the wall clock live, the
virtual clock in the simulator), and callers attach what they need to an entry (`payload`: a
future live, a request record in the simulator).

Source: SLOs-Serve (Chen et al., 2025) soft admission control (requests that cannot meet their
SLO are served best effort with spare capacity); vLLM V1's priority request queue
(``vllm/v1/core/sched/request_queue.py``: ordered by (priority, arrival time), lower priority
value first).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slomesh.scheduler.validation import ValidatedRequest

if TYPE_CHECKING:
    from slomesh.scheduler.policy import PlacementDecision, PolicyProfile

__all__ = [
    "BestEffortQueue",
    "BestEffortQueueFull",
    "Dispatch",
    "QueuedRequest",
    "TryPlace",
]


@dataclass(slots=True, eq=False)
class QueuedRequest:
    """A best-effort request waiting in a `BestEffortQueue`.

    Attributes:
        request: The validated request.
        enqueued_unix_ns: When it joined the queue (the queue's clock), Unix ns.
        seq: Arrival order in the queue (ties of priority are broken by it).
        exclude_regions: Regions it must not be placed in (e.g. one that failed it already).
        payload: The caller's handle (a future to resolve, a record to update).
        attempts: Placements tried for it so far.
        usable_instances: The instances its last placement attempt could consider (those
            that passed the hard filters, and those held for entries ahead of it); empty
            until tried.
        usable_pass: The dispatch pass that computed `usable_instances`.
    """

    request: ValidatedRequest
    enqueued_unix_ns: int
    seq: int
    exclude_regions: frozenset[str] = frozenset()
    payload: Any = None
    attempts: int = 0
    usable_instances: frozenset[str] = frozenset()
    usable_pass: int = 0

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def priority(self) -> int:
        """The request's priority (lower = more urgent)."""
        return self.request.priority

    @property
    def order_key(self) -> tuple[int, int]:
        """Dispatch order: (priority, arrival)."""
        return (self.request.priority, self.seq)

    def waited_ms(self, now_unix_ns: int) -> float:
        """Time spent in the queue by `now_unix_ns`, ms (>= 0)."""
        return max(0, now_unix_ns - self.enqueued_unix_ns) / 1e6


@dataclass(slots=True)
class Dispatch:
    """An entry that left the queue in a dispatch pass.

    Attributes:
        entry: The entry (no longer queued).
        decision: The placement: ``decision.chosen`` is set when it was placed; ``None`` when
            it failed (its wait expired and no candidate passed even the hard filters --
            ``unavailable`` -- or the policy refused it).
        forced: It was placed because its wait expired (``wait_expired``).
        waited_ms: Time it spent queued, ms.
    """

    entry: QueuedRequest
    decision: PlacementDecision
    forced: bool
    waited_ms: float


class BestEffortQueueFull(Exception):
    """The queue holds `limit` requests and none is less urgent: refuse with
    RESOURCE_EXHAUSTED.

    Attributes:
        retry_after_ms: Time until the oldest entry's wait expires (a slot frees by then at
            the latest), ms; ``None`` when the queue holds nothing (a limit of 0).
    """

    def __init__(self, message: str, retry_after_ms: float | None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


TryPlace = Callable[[QueuedRequest, frozenset[str], bool], "PlacementDecision"]
"""``try_place(entry, exclude_instances, wait_expired) -> decision``: places ``entry.request``
with `Policy.place` (passing ``entry.exclude_regions``, ``exclude_instances`` and
``wait_expired``) and, when it chose a candidate, records the placement in the view at once
(``decision.record_in(view)``) so that the next entry of the pass sees its load. It must not
modify the queue."""


@dataclass
class BestEffortQueue:
    """Best-effort requests waiting for spare capacity (module docstring).

    Args:
        max_wait_ms: Longest an entry waits before it is placed regardless, ms (>= 0).
        limit: Most entries held (>= 0; 0 refuses every request that would wait).
        clock_ns: The clock, Unix ns (the view's: wall time live, virtual in the simulator).
        refresh_passes: A waiting entry every instance of which an entry ahead of it holds is
            not tried again (it could not be placed: the policy would find no candidate) for
            up to this many passes after its last attempt (>= 1). Its instance set is then
            recomputed, so that capacity added meanwhile (a new instance or region) reaches
            it. Keeps a pass over a long queue to about one placement per distinct set of
            instances instead of one per entry.

    Raises:
        ValueError: a negative or non-finite `max_wait_ms`, a negative `limit`, or a
            `refresh_passes` below 1.
    """

    max_wait_ms: float
    limit: int
    clock_ns: Callable[[], int]
    refresh_passes: int = 16
    _order: list[QueuedRequest] = field(default_factory=list, init=False, repr=False)
    _keys: list[tuple[int, int]] = field(default_factory=list, init=False, repr=False)
    _by_id: dict[str, QueuedRequest] = field(default_factory=dict, init=False, repr=False)
    _seq: int = field(default=0, init=False, repr=False)
    _passes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.max_wait_ms < float("inf")):
            raise ValueError(f"max_wait_ms: must be finite and >= 0, got {self.max_wait_ms}")
        if self.limit < 0:
            raise ValueError(f"limit: must be >= 0, got {self.limit}")
        if self.refresh_passes < 1:
            raise ValueError(f"refresh_passes: must be >= 1, got {self.refresh_passes}")

    @classmethod
    def for_profile(cls, profile: PolicyProfile, clock_ns: Callable[[], int]) -> BestEffortQueue:
        """The queue a policy profile configures (``best_effort_max_wait_ms``,
        ``best_effort_queue_limit``)."""
        return cls(profile.best_effort_max_wait_ms, profile.best_effort_queue_limit, clock_ns)

    # -- inspection ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __iter__(self) -> Iterator[QueuedRequest]:
        """The entries in dispatch order (priority, then arrival)."""
        return iter(list(self._order))

    def must_wait(self, request: ValidatedRequest) -> bool:
        """Whether a new request must join the queue instead of being placed at once: it is
        of a best-effort tier and an entry of the same or a more urgent priority waits (it
        must not overtake that one)."""
        return (
            request.on_infeasible == "best_effort"
            and bool(self._order)
            and self._order[0].priority <= request.priority
        )

    def expired(self, entry: QueuedRequest, now_unix_ns: int) -> bool:
        """Whether `entry` has waited `max_wait_ms` by `now_unix_ns`."""
        return now_unix_ns - entry.enqueued_unix_ns >= self.max_wait_ms * 1e6

    def next_deadline_unix_ns(self) -> int | None:
        """When the oldest entry's wait expires, Unix ns; ``None`` when empty."""
        if not self._by_id:
            return None
        oldest = min(e.enqueued_unix_ns for e in self._by_id.values())
        return oldest + round(self.max_wait_ms * 1e6)

    # -- changes -------------------------------------------------------------------------------

    def offer(
        self,
        request: ValidatedRequest,
        *,
        exclude_regions: frozenset[str] = frozenset(),
        payload: Any = None,
    ) -> tuple[QueuedRequest, QueuedRequest | None]:
        """Adds `request` to the queue.

        Args:
            request: A best-effort request that cannot be placed now.
            exclude_regions: Regions it must not go to.
            payload: The caller's handle, kept on the entry.

        Returns:
            ``(entry, shed)``: the new entry, and the least urgent entry it displaced from a
            full queue (the caller refuses that one with RESOURCE_EXHAUSTED), or ``None``.

        Raises:
            ValueError: a request with the same id is queued already (gRPC ALREADY_EXISTS).
            BestEffortQueueFull: the queue is full and no entry is less urgent
                (RESOURCE_EXHAUSTED).
        """
        if request.request_id in self._by_id:
            raise ValueError(f"request_id: {request.request_id!r} is queued already")
        now = self.clock_ns()
        shed = None
        if len(self._order) >= self.limit:
            last = self._order[-1] if self._order else None
            if last is None or last.priority <= request.priority:
                deadline = self.next_deadline_unix_ns()
                retry = None if deadline is None else max(0.0, (deadline - now) / 1e6)
                raise BestEffortQueueFull(
                    f"best-effort queue full ({self.limit} requests of priority <= "
                    f"{request.priority} waiting)",
                    retry,
                )
            shed = last
            self._remove(last)
        self._seq += 1
        entry = QueuedRequest(
            request, now, self._seq, exclude_regions=exclude_regions, payload=payload
        )
        key = entry.order_key
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self._order.insert(i, entry)
        self._by_id[entry.request_id] = entry
        return entry, shed

    def remove(self, request_id: str) -> QueuedRequest | None:
        """Takes a request out (its client cancelled); ``None`` when it is not queued."""
        entry = self._by_id.get(request_id)
        if entry is not None:
            self._remove(entry)
        return entry

    def drain(self) -> list[QueuedRequest]:
        """Empties the queue (shutdown); returns the entries in dispatch order, for the
        caller to refuse (UNAVAILABLE)."""
        entries = self._order
        self._order, self._keys, self._by_id = [], [], {}
        return entries

    def dispatch(self, try_place: TryPlace) -> list[Dispatch]:
        """One pass over the queue in dispatch order (module docstring).

        Each entry is placed with ``try_place(entry, held, expired)``: ``held`` are the
        instances the entries before it that still wait could run on (empty for an expired
        entry, which may go anywhere). An entry leaves the queue when the decision chose a
        candidate, when its wait had expired (placed, or failed: the caller answers its
        ``decision.outcome``), or when the policy refused it; otherwise (``queued``, or
        ``unavailable`` because every instance it could use is held) it stays, and holds the
        instances it could use. An entry whose instances (as of its last attempt, at most
        `refresh_passes` passes ago) are all held already is not tried: it stays.

        Args:
            try_place: See `TryPlace`.

        Returns:
            The entries that left the queue, in dispatch order.
        """
        if not self._order:
            return []
        self._passes += 1
        now = self.clock_ns()
        held: set[str] = set()
        frozen: frozenset[str] = frozenset()
        out: list[Dispatch] = []
        for entry in list(self._order):
            forced = self.expired(entry, now)
            usable = entry.usable_instances
            if (
                not forced
                and usable
                and self._passes - entry.usable_pass < self.refresh_passes
                and usable <= held
            ):
                continue  # no candidate but held ones: it stays, holding nothing new
            if len(frozen) != len(held):
                frozen = frozenset(held)
            decision = try_place(entry, frozenset() if forced else frozen, forced)
            entry.attempts += 1
            if decision.chosen is not None or forced or decision.outcome == "refused":
                self._remove(entry)
                out.append(Dispatch(entry, decision, forced, entry.waited_ms(now)))
            else:
                entry.usable_instances = frozenset(
                    c.instance_id
                    for c in decision.candidates
                    if c.prediction is not None or c.rejected_by == "queued-ahead"
                )
                entry.usable_pass = self._passes
                held.update(c.instance_id for c in decision.candidates if c.prediction is not None)
        return out

    def _remove(self, entry: QueuedRequest) -> None:
        i = bisect.bisect_left(self._keys, entry.order_key)
        assert self._order[i] is entry
        del self._keys[i]
        del self._order[i]
        del self._by_id[entry.request_id]
