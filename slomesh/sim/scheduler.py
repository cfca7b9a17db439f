"""The global scheduler's decision path in virtual time.

`SimScheduler` does, for each request, what `services.global_scheduler`'s
``GlobalSchedulerServicer.Generate`` does before and after forwarding, with the same core
objects: `slomesh.scheduler.validation.validate_for_view` against the models, SLO classes and
regions the view knows; the policy's ``place`` on a `ClusterView`; on a placement,
``record_placement`` (optimistic load until a state stamped after the request reached the agent
arrives, one-way delay = half the predicted RTT) and ``track_inflight`` with the request's TPOT
target until its stream ends (``untrack_inflight``), when a completed request's output length
is observed into ``view.output_lengths`` as the live scheduler does when a forwarded stream
completes. The view is fed `RegionState`s and `KvIndexDelta`s as they are delivered and reads
the simulator's virtual clock. Best-effort requests the policy queues wait in the same
`slomesh.scheduler.admission.BestEffortQueue` as live (on the virtual clock): the simulator
enqueues them and runs a dispatch pass after each enqueue, each state delivered and each
expiring wait, as the live scheduler does on its events.

The view is built without a snapshot callback: the simulated agents publish every KV delta from
the first one (seq 1) on, so the view adopts them in order, as a live scheduler does after its
first snapshot.
"""

from __future__ import annotations

from collections.abc import Callable

from slomesh.scheduler.admission import BestEffortQueue, Dispatch, QueuedRequest
from slomesh.scheduler.policy import PlacementDecision, Policy
from slomesh.scheduler.validation import ValidatedRequest, validate_for_view
from slomesh.scheduler.view import ClusterView
from slomesh.slo import SloConfig
from slomesh.topology import Topology
from slomesh.v1 import scheduler_pb2, state_pb2

__all__ = ["SimScheduler"]


class SimScheduler:
    """One scheduler (acting as every region's replica, as in the local mesh).

    Args:
        topology: The mesh topology (RTT seeds, prices, the model).
        policy: The placement policy.
        slo: SLO classes and the default class.
        clock_ns: The virtual clock, Unix nanoseconds.
        staleness_ms: A region whose state is older than this is not routable.
        region: The replica's own region (default origin), or None as in the local mesh.
    """

    def __init__(
        self,
        topology: Topology,
        policy: Policy,
        slo: SloConfig,
        clock_ns: Callable[[], int],
        *,
        staleness_ms: float = 1000.0,
        region: str | None = None,
    ) -> None:
        self.topology = topology
        self.policy = policy
        self.slo = slo
        self.region = region
        self.view = ClusterView(
            topology, staleness_ms=staleness_ms, request_snapshot=None, clock_ns=clock_ns
        )
        self.best_effort = BestEffortQueue.for_profile(policy.profile, clock_ns)

    def on_state(self, state: state_pb2.RegionState) -> None:
        """A `RegionState` arrived (NATS ``slomesh.region.<r>.state``)."""
        self.view.apply_state(state)

    def on_kv(self, delta: state_pb2.KvIndexDelta) -> None:
        """A `KvIndexDelta` arrived (NATS ``slomesh.region.<r>.kv``)."""
        self.view.apply_kv_delta(delta)

    def validate(self, request: scheduler_pb2.GenerateRequest) -> ValidatedRequest:
        """Validates a request as the live scheduler does.

        Raises:
            slomesh.scheduler.validation.RequestValidationError: (INVALID_ARGUMENT).
        """
        return validate_for_view(request, self.view, self.slo, self.region)

    def place(self, request: ValidatedRequest) -> PlacementDecision:
        """Runs the policy; records a chosen placement in the view (optimistic load)."""
        decision = self.policy.place(request, self.view)
        decision.record_in(self.view)
        return decision

    def must_wait(self, request: ValidatedRequest) -> bool:
        """Whether `request` must join the best-effort queue without a placement attempt
        (earlier best-effort requests of the same or a more urgent priority wait)."""
        return self.best_effort.must_wait(request)

    def enqueue(self, request: ValidatedRequest, payload: object) -> QueuedRequest | None:
        """Queues a best-effort request (`BestEffortQueue.offer`); returns the entry it shed
        from a full queue, if any.

        Raises:
            slomesh.scheduler.admission.BestEffortQueueFull: (RESOURCE_EXHAUSTED).
            ValueError: its id is queued already.
        """
        _, shed = self.best_effort.offer(request, payload=payload)
        return shed

    def dispatch_queued(self) -> list[Dispatch]:
        """One dispatch pass over the best-effort queue; each placement is recorded in the
        view (optimistic load) before the next entry is tried."""
        return self.best_effort.dispatch(self._try_place_queued)

    def _try_place_queued(
        self, entry: QueuedRequest, exclude_instances: frozenset[str], wait_expired: bool
    ) -> PlacementDecision:
        decision = self.policy.place(
            entry.request,
            self.view,
            exclude_regions=entry.exclude_regions,
            exclude_instances=exclude_instances,
            wait_expired=wait_expired,
        )
        decision.record_in(self.view)
        return decision

    def forwarded(self, request: ValidatedRequest, region: str, instance_id: str) -> None:
        """The request's stream to its serving region opened: protect its TPOT there."""
        self.view.track_inflight(region, instance_id, request.request_id, request.slo.tpot_target_ms())

    def stream_ended(
        self,
        region: str,
        instance_id: str,
        request_id: str,
        *,
        model: str = "",
        slo_class: str = "",
        completion_tokens: int = 0,
    ) -> None:
        """The request's stream ended (completion or failure) at the scheduler.

        Args:
            region: Serving region.
            instance_id: Serving instance.
            request_id: The request.
            model: Its model (for a completion).
            slo_class: Its SLO class name (for a completion).
            completion_tokens: Tokens it generated when it completed; 0 for a failure (then
                nothing is learned).
        """
        self.view.untrack_inflight(region, instance_id, request_id)
        if completion_tokens > 0:
            self.view.output_lengths.observe(model, slo_class, completion_tokens)
