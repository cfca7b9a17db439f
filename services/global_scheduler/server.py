"""The global scheduler service: gRPC `GlobalScheduler` wired to NATS, Redis and the core policy.

- `GlobalSchedulerServicer` implements the RPCs:

  * ``Generate`` (server streaming): validate -> place -> yield ``placement`` -> forward to
    the chosen region's agent (`RegionAgent.Generate`, with ``instance_id``, the trace context
    in ``traceparent``, the send time in ``slomesh-sent-unix-ns`` and the caller's deadline)
    -> relay ``tokens`` -> yield ``completion`` with timings measured here (from the receipt
    of the call to the arrival of the first / last token) -> ledger. If the serving region
    fails before the first token, the request is placed once more with that region excluded
    and a second ``placement`` precedes the tokens (clients should use the last placement).
    A placement that carries a prefix move (``kv_transfer_source_region`` set) first waits,
    in a ``kv_transfer`` span, for the destination region's KV transfer service to move the
    prefix (`services.global_scheduler.kv_moves`), bounded by the TTFT SLO; a failed or late
    move is logged and counted, and the request is forwarded all the same.
  * ``Place`` (unary): the same decision; the placement carries the agent address as
    reachable from the request's origin (``--routes-json``) and is recorded in the ledger.
  * ``ReportOutcome``: the client's measured timings of a placed request, for the ledger.

  A completed request teaches the view's output-length predictor (``view.output_lengths``)
  its ``usage.completion_tokens`` under its (model, SLO class): when a forwarded ``Generate``
  stream completes, and when a client reports ``ok`` with a completion for a request this
  replica placed (one it has forgotten, or another replica placed, has no model and class here
  and teaches nothing). Each length also goes to Redis through the ledger, off the request's
  path; a starting replica loads the windows from there (`SchedulerService.start`).

  Soft admission (DESIGN.md section 2): a best-effort-tier request the policy ``queued`` (no
  placement meets its SLO, and it would push the requests running on every candidate past
  theirs), or one that finds earlier best-effort requests waiting ahead of it, waits in the
  replica's `slomesh.scheduler.admission.BestEffortQueue` (span
  ``scheduler.best_effort_queue``; metrics ``slomesh_scheduler_best_effort_queue_*``): its
  ``Generate`` stream (or ``Place`` reply) starts once a dispatch pass -- on every region
  state applied, every stream end, every enqueue, and when the oldest wait expires -- places
  it; the time queued is part of its TTFT. A client cancel takes it out of the queue.

  Errors: INVALID_ARGUMENT (the message starts with the field), RESOURCE_EXHAUSTED with
  trailing metadata ``retry-after-ms`` (no placement meets the SLO; the best-effort queue is
  full, or shed the request for a more urgent one), UNAVAILABLE (no routable region, or the
  serving region failed before the first token and no other could take it, or the replica
  shut down while the request was queued), ALREADY_EXISTS (a request with the same id is
  queued). A client cancelling ``Generate`` cancels the upstream call.

- `SchedulerService` owns the lifecycle: NATS subscriptions (``slomesh.region.*.state``,
  ``.kv``, ``.rtt``, ``.links``: the KV transfer services' link statistics, applied to the
  view's spare bandwidth per link; KV snapshots by request/reply), the Redis ledger, the gRPC
  server with health checking and reflection, Prometheus metrics, the best-effort queue's
  timer, and graceful shutdown (queued best-effort requests refused with UNAVAILABLE,
  NOT_SERVING, grace period, NATS drain, ledger flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import RedisError

from services.global_scheduler.kv_moves import DEFAULT_MAX_WAIT_MS, KvMover
from services.global_scheduler.ledger import Ledger
from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.prefetch import PrefetchRunner
from services.global_scheduler.routes import Routes
from slomesh import bus
from slomesh.scheduler.admission import BestEffortQueue, BestEffortQueueFull, QueuedRequest
from slomesh.scheduler.output_length import DEFAULT_OUTPUT_LENGTH_WINDOW, OutputLengthPredictor
from slomesh.scheduler.policy import PlacementDecision, Policy, make_policy
from slomesh.scheduler.prefetch import HotPrefixTracker
from slomesh.scheduler.validation import (
    REQUEST_ID_PATTERN,
    RequestValidationError,
    ValidatedRequest,
    validate_for_view,
)
from slomesh.scheduler.view import ClusterView
from slomesh.service import GrpcServerHandle, start_grpc_server, start_metrics_server
from slomesh.slo import SloClass, SloConfig, load_slo_config
from slomesh.telemetry import get_tracer, grpc_metadata_extract, grpc_metadata_inject
from slomesh.topology import Topology
from slomesh.transfer.link_stats import parse_link_stats_report
from slomesh.v1 import (
    common_pb2,
    region_agent_pb2,
    region_agent_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    state_pb2,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SENT_UNIX_NS_METADATA",
    "SERVICE_NAME",
    "GlobalSchedulerServicer",
    "SchedulerConfig",
    "SchedulerService",
]

SERVICE_NAME = "slomesh.v1.GlobalScheduler"
#: gRPC metadata key carrying the sender's wall clock (Unix ns) at send time.
SENT_UNIX_NS_METADATA = "slomesh-sent-unix-ns"
#: Trailing metadata key of a refusal's retry hint (milliseconds, integer).
RETRY_AFTER_METADATA = "retry-after-ms"

#: Service config of channels to region agents: unary calls retry on UNAVAILABLE.
AGENT_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "slomesh.v1.RegionAgent", "method": "Ping"},
                    {"service": "slomesh.v1.RegionAgent", "method": "GetState"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

#: Shortest time a request placed with Place counts as running on its instance, seconds.
PLACE_INFLIGHT_MIN_S = 10.0

#: Upstream errors after which Generate may retry on another region (before the first token).
_RETRIABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    }
)
#: Upstream errors passed to the client with their own code.
_PASS_THROUGH = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass
class SchedulerConfig:
    """Configuration of one scheduler replica.

    Attributes:
        nats_url: NATS server(s), ``nats://host:port`` (comma-separated for a cluster).
        redis_url: Redis for the ledger, ``redis://host:port/db``.
        topology: The mesh topology (RTT seeds, prices, the model).
        policy: Built-in policy name or YAML profile path.
        slo_config_path: SLO classes YAML (None = built-in defaults).
        region: This replica's own region (default origin of requests that name none).
        routes: Agent addresses as reached from each origin.
        staleness_ms: A region whose state is older than this is not routable.
        host: Address the gRPC server binds.
        port: gRPC port (0 = pick a free one).
        metrics_port: Prometheus port (None = no metrics server, 0 = pick a free one).
        ledger_ttl_s: Expiry of ledger request hashes, seconds.
        ledger_retry_max_s: Largest backoff of ledger writes while Redis is down, seconds.
        ledger_max_backlog: Ledger operations kept while Redis is down.
        grace_s: Grace period for in-flight calls on shutdown, seconds.
        flush_timeout_s: How long shutdown waits for the ledger to flush, seconds.
        snapshot_timeout_s: Timeout of a KV snapshot request, seconds.
        nats_connect_timeout_s: How long start-up keeps trying to reach NATS, seconds.
        forward_retry: Retry Generate once on another region when the serving region fails
            before the first token.
        registry: Prometheus registry for the metrics (default: the process-wide one).
        output_length_window: Completed requests per (model, SLO class) whose output lengths
            the predictor keeps (in memory and in Redis).
        output_length_load_timeout_s: How long start-up waits for the output-length windows
            from Redis before starting with empty ones, seconds.
        kv_transfer_routes: KV transfer service addresses as reached from each origin (the
            routes' format; `services.global_scheduler.kv_moves`): where a placement's prefix
            move is started. A region without one gets no moves.
        kv_transfer_max_wait_ms: Longest wait of a Generate call for its prefix move, ms.
    """

    nats_url: str
    redis_url: str
    topology: Topology
    policy: str = "slomesh"
    slo_config_path: str | None = None
    region: str | None = None
    routes: Routes = field(default_factory=Routes)
    staleness_ms: float = 1000.0
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    ledger_ttl_s: int = 7 * 24 * 3600
    ledger_retry_max_s: float = 5.0
    ledger_max_backlog: int = 200_000
    grace_s: float = 5.0
    flush_timeout_s: float = 5.0
    snapshot_timeout_s: float = 2.0
    nats_connect_timeout_s: float = 30.0
    forward_retry: bool = True
    registry: CollectorRegistry = REGISTRY
    output_length_window: int = DEFAULT_OUTPUT_LENGTH_WINDOW
    output_length_load_timeout_s: float = 2.0
    kv_transfer_routes: Routes = field(default_factory=Routes)
    kv_transfer_max_wait_ms: float = DEFAULT_MAX_WAIT_MS


class _RpcFailure(Exception):
    """Ends an RPC with a status code (raised inside handlers, turned into `context.abort`)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        trailing: tuple[tuple[str, str], ...] = (),
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = trailing


@dataclass(slots=True)
class _PlacedRequest:
    """What the scheduler remembers of a Place'd request until its outcome is reported."""

    model: str
    slo: SloClass
    prompt_tokens: int
    region: str
    instance_id: str
    predicted_ttft_ms: float


@dataclass(slots=True)
class _QueueWaiter:
    """The live side of a best-effort queue entry: the waiting call's future (resolved with
    ``(decision, agent endpoint)`` or failed with an `_RpcFailure`), its queue span, and the
    endpoint of its placement once dispatched."""

    future: asyncio.Future[tuple[PlacementDecision, str]]
    span: Any
    endpoint: str = ""


@dataclass(slots=True)
class _StreamProgress:
    first_token_unix_ns: int | None = None
    last_token_unix_ns: int | None = None
    tokens: int = 0


class GlobalSchedulerServicer(scheduler_pb2_grpc.GlobalSchedulerServicer):
    """The `GlobalScheduler` RPCs (see the module docstring).

    Args:
        view: The cluster view (fed by NATS).
        policy: The placement policy.
        slo: SLO classes and the default class.
        ledger: The Redis ledger.
        metrics: Prometheus metrics.
        routes: Agent addresses per origin.
        region: This replica's region (default origin), or None.
        forward_retry: Retry once on another region before the first token.
        max_remembered: Place'd requests remembered for ReportOutcome (oldest forgotten).
        kv_mover: Runs the prefix moves placements ask for (default: one without routes,
            i.e. no moves).

    Attributes:
        prefetcher: The hot-prefix prefetch (`services.global_scheduler.prefetch`) when the
            policy has a ``kv_prefetch``, else None; `SchedulerService` runs its plans.
    """

    def __init__(
        self,
        *,
        view: ClusterView,
        policy: Policy,
        slo: SloConfig,
        ledger: Ledger,
        metrics: SchedulerMetrics,
        routes: Routes,
        region: str | None = None,
        forward_retry: bool = True,
        max_remembered: int = 100_000,
        kv_mover: KvMover | None = None,
    ):
        self.view = view
        self.policy = policy
        self.slo = slo
        self.ledger = ledger
        self.metrics = metrics
        self.routes = routes
        self.region = region
        self.forward_retry = forward_retry
        self.max_remembered = max_remembered
        self.kv_mover = kv_mover or KvMover(Routes(), metrics)
        self.prefetcher = (
            PrefetchRunner(
                HotPrefixTracker(policy.prefetch_config),
                view,
                self.kv_mover,
                routes,
                self.agent_stub,
                metrics,
            )
            if policy.prefetch_config is not None
            else None
        )
        self.tracer = get_tracer("slomesh.scheduler")
        self._channels: dict[
            str, tuple[grpc.aio.Channel, region_agent_pb2_grpc.RegionAgentStub]
        ] = {}
        self._placed: OrderedDict[str, _PlacedRequest] = OrderedDict()
        self.best_effort = BestEffortQueue.for_profile(policy.profile, view.clock_ns)
        self._best_effort_wakeup = asyncio.Event()
        self._closing = False

    # -- helpers -------------------------------------------------------------------------------

    def validate(self, request: scheduler_pb2.GenerateRequest) -> ValidatedRequest:
        """Validates a request against the models, SLO classes and regions the mesh knows.

        Raises:
            RequestValidationError: (INVALID_ARGUMENT) naming the field.
        """
        return validate_for_view(request, self.view, self.slo, self.region)

    def agent_stub(self, endpoint: str) -> region_agent_pb2_grpc.RegionAgentStub:
        """A cached stub of the region agent at `endpoint` (one channel per address)."""
        entry = self._channels.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(
                endpoint,
                options=[
                    ("grpc.enable_retries", 1),
                    ("grpc.service_config", AGENT_SERVICE_CONFIG),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ],
            )
            entry = (channel, region_agent_pb2_grpc.RegionAgentStub(channel))
            self._channels[endpoint] = entry
        return entry[1]

    async def close_channels(self) -> None:
        """Closes every cached agent and KV transfer service channel."""
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        await self.kv_mover.close()

    def _place(
        self, request: ValidatedRequest, exclude_regions: frozenset[str] = frozenset()
    ) -> tuple[PlacementDecision, str]:
        """Runs the policy inside a ``scheduler.place`` span; records a chosen placement."""
        with self.tracer.start_as_current_span("scheduler.place") as span:
            t0 = time.perf_counter()
            decision = self.policy.place(request, self.view, exclude_regions=exclude_regions)
            endpoint = self._record_decision(request, decision, t0, span)
        return decision, endpoint

    def _record_decision(
        self, request: ValidatedRequest, decision: PlacementDecision, t0: float, span: Any
    ) -> str:
        """Records `decision` (view, ledger, metrics, span attributes); returns the agent
        endpoint of the chosen instance as reached from the request's origin ("" if none).

        Args:
            request: The request.
            decision: The policy's decision.
            t0: `time.perf_counter` before the policy ran (for the latency histogram).
            span: The ``scheduler.place`` span.
        """
        chosen = decision.chosen
        endpoint = ""
        if chosen is not None and chosen.prediction is not None:
            endpoint = self.routes.resolve(
                request.origin_region, chosen.region, chosen.instance.agent_endpoint
            )
        decision.record_in(self.view)
        if chosen is not None and self.prefetcher is not None:
            self.prefetcher.observe(request)
        self.ledger.record_decision(decision, endpoint)
        self.metrics.place_latency.labels(decision.policy).observe(time.perf_counter() - t0)
        self.metrics.placements.labels(
            decision.policy, decision.outcome, chosen.region if chosen else ""
        ).inc()
        if span.is_recording():
            span.set_attribute("slomesh.request_id", request.request_id)
            span.set_attribute("slomesh.policy", decision.policy)
            span.set_attribute("slomesh.outcome", decision.outcome)
            span.set_attribute("slomesh.origin_region", request.origin_region)
            span.set_attribute("slomesh.slo_class", request.slo_class)
            span.set_attribute("slomesh.priority", request.priority)
            span.set_attribute("slomesh.prompt_tokens", request.prompt_tokens)
            span.set_attribute("slomesh.candidates", len(decision.candidates))
            span.set_attribute("slomesh.decision_ms", decision.decision_ms)
            if chosen is not None and chosen.prediction is not None:
                p = chosen.prediction
                span.set_attribute("slomesh.region", chosen.region)
                span.set_attribute("slomesh.instance_id", chosen.instance_id)
                span.set_attribute("slomesh.slo_feasible", chosen.feasible)
                span.set_attribute("slomesh.predicted_ttft_ms", p.ttft_ms)
                span.set_attribute("slomesh.predicted_tpot_ms", p.tpot_ms)
                span.set_attribute("slomesh.predicted_e2e_ms", p.e2e_ms)
                span.set_attribute("slomesh.cached_prefix_tokens", p.cached_prefix_tokens)
            if decision.retry_after_ms is not None:
                span.set_attribute("slomesh.retry_after_ms", decision.retry_after_ms)
            for cand in decision.candidates:
                span.add_event(
                    "candidate",
                    {k: v for k, v in cand.audit().items() if v is not None},
                )
        return endpoint

    async def _decide(
        self, request: ValidatedRequest, exclude_regions: frozenset[str]
    ) -> tuple[PlacementDecision, str]:
        """Places `request`, waiting in the best-effort queue when the policy queues it or
        when earlier best-effort requests wait ahead of it (`BestEffortQueue.must_wait`).

        Returns:
            The decision (``chosen`` is None when refused or unavailable) and the endpoint.

        Raises:
            _RpcFailure: from `_wait_best_effort`.
        """
        if self.best_effort.must_wait(request):
            return await self._wait_best_effort(request, exclude_regions, None)
        decision, endpoint = self._place(request, exclude_regions)
        if decision.outcome == "queued":
            return await self._wait_best_effort(request, exclude_regions, decision)
        return decision, endpoint

    def _refusal(self, request: ValidatedRequest, decision: PlacementDecision) -> _RpcFailure:
        if decision.outcome == "refused":
            retry_ms = decision.retry_after_ms or 0.0
            self.ledger.record_outcome(request.request_id, "refused", error=decision.reason)
            return _RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{decision.reason}; retry after {retry_ms:.0f} ms",
                ((RETRY_AFTER_METADATA, str(math.ceil(retry_ms))),),
            )
        self.ledger.record_outcome(request.request_id, "unavailable", error=decision.reason)
        return _RpcFailure(grpc.StatusCode.UNAVAILABLE, f"no routable region: {decision.reason}")

    def _remember(self, request: ValidatedRequest, decision: PlacementDecision) -> None:
        chosen = decision.chosen
        if chosen is None or chosen.prediction is None:
            return
        p = chosen.prediction
        self._placed[request.request_id] = _PlacedRequest(
            request.model,
            request.slo,
            request.prompt_tokens,
            chosen.region,
            chosen.instance_id,
            p.ttft_ms,
        )
        while len(self._placed) > self.max_remembered:
            self._placed.popitem(last=False)
        # The client runs it itself: protect its TPOT until it reports the outcome, or for
        # twice its predicted E2E (at least PLACE_INFLIGHT_MIN_S) if it never does.
        hold_s = max(PLACE_INFLIGHT_MIN_S, 2.0 * p.e2e_ms / 1000.0)
        self.view.track_inflight(
            chosen.region,
            chosen.instance_id,
            request.request_id,
            request.slo.tpot_target_ms(),
            expires_unix_ns=decision.decided_unix_ns + int(hold_s * 1e9),
        )

    def _learn_output_length(self, model: str, slo_class: str, completion_tokens: int) -> None:
        """A request completed with `completion_tokens`: the view's predictor learns it and the
        ledger queues it for Redis (no I/O here). Nothing is learned from 0 tokens."""
        if completion_tokens > 0:
            self.view.output_lengths.observe(model, slo_class, completion_tokens)
            self.ledger.record_output_length(model, slo_class, completion_tokens)

    def _finish_metrics(
        self,
        slo: SloClass,
        prompt_tokens: int,
        region: str,
        predicted_ttft_ms: float,
        timings: common_pb2.Timings,
    ) -> bool:
        attained = slo.attained(timings.ttft_ms, timings.tpot_ms, timings.e2e_ms, prompt_tokens)
        self.metrics.slo_attained.labels(slo.name, "true" if attained else "false").inc()
        self.metrics.ttft.labels(region).observe(timings.ttft_ms / 1000.0)
        self.metrics.e2e.labels(region).observe(timings.e2e_ms / 1000.0)
        self.metrics.ttft_error.labels(region).observe(timings.ttft_ms - predicted_ttft_ms)
        return attained

    # -- best-effort queue ---------------------------------------------------------------------

    async def _wait_best_effort(
        self,
        request: ValidatedRequest,
        exclude_regions: frozenset[str],
        decision: PlacementDecision | None,
    ) -> tuple[PlacementDecision, str]:
        """Queues a best-effort request (`slomesh.scheduler.admission.BestEffortQueue`) and
        waits, inside a ``scheduler.best_effort_queue`` span, until a dispatch pass places it.

        Args:
            request: The request.
            exclude_regions: Regions it must not go to.
            decision: Its ``queued`` decision, or ``None`` when it joined the queue without one
                (`BestEffortQueue.must_wait`: earlier requests wait ahead of it).

        Returns:
            The placement decision (a chosen candidate) and the agent endpoint.

        Raises:
            _RpcFailure: RESOURCE_EXHAUSTED (queue full, or shed for a more urgent request;
                with retry-after-ms), UNAVAILABLE (no candidate once its wait expired, or the
                scheduler is shutting down), ALREADY_EXISTS (a request with its id is queued).
            asyncio.CancelledError: the client went away (it is taken out of the queue).
        """
        if self._closing:
            raise _RpcFailure(grpc.StatusCode.UNAVAILABLE, "scheduler is shutting down")
        future: asyncio.Future[tuple[PlacementDecision, str]] = (
            asyncio.get_running_loop().create_future()
        )
        with self.tracer.start_as_current_span("scheduler.best_effort_queue") as span:
            waiter = _QueueWaiter(future, span)
            try:
                entry, shed = self.best_effort.offer(
                    request, exclude_regions=exclude_regions, payload=waiter
                )
            except ValueError as err:
                raise _RpcFailure(grpc.StatusCode.ALREADY_EXISTS, str(err)) from None
            except BestEffortQueueFull as full:
                self.metrics.best_effort_queue_full.inc()
                # A slot frees when the oldest entry's wait expires; capacity may free sooner.
                hints = [full.retry_after_ms]
                if decision is not None:
                    hints.append(decision.retry_after_ms)
                retry_ms = min((h for h in hints if h is not None), default=0.0)
                failure = self._exhausted(request, str(full), retry_ms)
                span.set_status(Status(StatusCode.ERROR, failure.message))
                raise failure from None
            if shed is not None:
                failure = self._exhausted(
                    shed.request,
                    f"shed from the best-effort queue for a more urgent request (priority "
                    f"{request.priority} < {shed.priority})",
                    self.best_effort.max_wait_ms,
                )
                self._leave_queue(shed, "shed", failure)
            self.ledger.record_queued(request.request_id, entry.enqueued_unix_ns)
            self.metrics.best_effort_queue_depth.set(len(self.best_effort))
            if span.is_recording():
                span.set_attribute("slomesh.request_id", request.request_id)
                span.set_attribute("slomesh.priority", request.priority)
                span.set_attribute("slomesh.slo_class", request.slo_class)
                span.set_attribute("slomesh.queue_depth", len(self.best_effort))
                span.set_attribute("slomesh.queued_behind", decision is None)
            self.dispatch_best_effort()
            self._best_effort_wakeup.set()
            try:
                return await future
            except asyncio.CancelledError:
                if self.best_effort.remove(request.request_id) is not None:
                    self._leave_queue(entry, "cancelled", None)
                    self.ledger.record_outcome(
                        request.request_id, "cancelled", error="client cancelled the call"
                    )
                raise

    def dispatch_best_effort(self) -> None:
        """One dispatch pass over the best-effort queue (on each region state applied, each
        stream end, each enqueue and when the oldest entry's wait expires): resolves the
        waiting calls of the entries that leave it."""
        if not len(self.best_effort):
            return
        for dispatch in self.best_effort.dispatch(self._try_place_queued):
            entry, decision = dispatch.entry, dispatch.decision
            if decision.chosen is not None:
                self._leave_queue(entry, "forced" if dispatch.forced else "placed", decision)
            else:
                self._leave_queue(entry, "failed", self._refusal(entry.request, decision))

    def _try_place_queued(
        self, entry: QueuedRequest, exclude_instances: frozenset[str], wait_expired: bool
    ) -> PlacementDecision:
        """`slomesh.scheduler.admission.TryPlace` of the live scheduler: a decision that lets
        the entry leave the queue is recorded (view, ledger, metrics, a ``scheduler.place``
        span under the entry's queue span); one that keeps it queued is not."""
        t0 = time.perf_counter()
        decision = self.policy.place(
            entry.request,
            self.view,
            exclude_regions=entry.exclude_regions,
            exclude_instances=exclude_instances,
            wait_expired=wait_expired,
        )
        if decision.chosen is not None or wait_expired or decision.outcome == "refused":
            waiter: _QueueWaiter = entry.payload
            parent = trace.set_span_in_context(waiter.span)
            with self.tracer.start_as_current_span("scheduler.place", context=parent) as span:
                waiter.endpoint = self._record_decision(entry.request, decision, t0, span)
        return decision

    def _leave_queue(
        self,
        entry: QueuedRequest,
        result: str,
        outcome: PlacementDecision | _RpcFailure | None,
    ) -> None:
        """An entry left the best-effort queue: metrics, ledger, its span, and its waiting
        call resumed with the decision or failed with `outcome` (nothing for a cancel)."""
        waited_ms = entry.waited_ms(self.view.clock_ns())
        self.metrics.best_effort_queue_wait.labels(result).observe(waited_ms / 1000.0)
        self.metrics.best_effort_queue_depth.set(len(self.best_effort))
        self.ledger.record_dequeued(entry.request_id, waited_ms, result)
        waiter: _QueueWaiter = entry.payload
        span = waiter.span
        if span.is_recording():
            span.set_attribute("slomesh.best_effort_wait_ms", waited_ms)
            span.set_attribute("slomesh.best_effort_result", result)
            span.set_attribute("slomesh.best_effort_attempts", entry.attempts)
        if waiter.future.done() or outcome is None:
            return
        if isinstance(outcome, _RpcFailure):
            span.set_status(Status(StatusCode.ERROR, outcome.message))
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result((outcome, waiter.endpoint))

    def _exhausted(self, request: ValidatedRequest, reason: str, retry_ms: float) -> _RpcFailure:
        """A RESOURCE_EXHAUSTED refusal of `request` with a retry hint clamped to the policy's
        [min_retry_after_ms, max_retry_after_ms]; recorded in the ledger."""
        profile = self.policy.profile
        retry_ms = min(profile.max_retry_after_ms, max(profile.min_retry_after_ms, retry_ms))
        self.ledger.record_outcome(request.request_id, "refused", error=reason)
        return _RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{reason}; retry after {retry_ms:.0f} ms",
            ((RETRY_AFTER_METADATA, str(math.ceil(retry_ms))),),
        )

    async def run_best_effort_timer(self) -> None:
        """Runs a dispatch pass whenever the oldest queued request's wait expires (and when
        woken by an enqueue, which may move that deadline); runs until cancelled."""
        wakeup = self._best_effort_wakeup
        while True:
            wakeup.clear()
            deadline = self.best_effort.next_deadline_unix_ns()
            timeout = None
            if deadline is not None:
                # 1 ms past the deadline, so that the entry counts as expired.
                timeout = max(0.0, (deadline - self.view.clock_ns()) / 1e9) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout)
            self.dispatch_best_effort()

    def close_best_effort(self) -> None:
        """Shutdown: refuses every queued request with UNAVAILABLE (a retry reaches another
        replica) and every later one."""
        self._closing = True
        for entry in self.best_effort.drain():
            failure = _RpcFailure(grpc.StatusCode.UNAVAILABLE, "scheduler is shutting down; retry")
            self.ledger.record_outcome(entry.request_id, "unavailable", error=failure.message)
            self._leave_queue(entry, "shutdown", failure)

    # -- Generate ------------------------------------------------------------------------------

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        """Places the request, forwards it and streams placement, tokens and completion."""
        received_ns = time.time_ns()
        parent = grpc_metadata_extract(context.invocation_metadata())
        code = grpc.StatusCode.OK
        self.metrics.inflight.inc()
        try:
            with self.tracer.start_as_current_span(
                "scheduler.generate", context=parent, kind=SpanKind.SERVER
            ) as span:
                try:
                    async with contextlib.aclosing(
                        self._generate(request, context, received_ns, span)
                    ) as stream:
                        async for response in stream:
                            yield response
                except _RpcFailure as failure:
                    code = failure.code
                    span.set_status(Status(StatusCode.ERROR, failure.message))
                    span.set_attribute("rpc.grpc.status_code", failure.code.value[0])
                    if failure.trailing:
                        context.set_trailing_metadata(failure.trailing)
                    await context.abort(failure.code, failure.message)
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels("Generate", code.name).inc()

    async def _generate(
        self,
        request: scheduler_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        received_ns: int,
        span: Any,
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        try:
            vreq = self.validate(request)
        except RequestValidationError as err:
            raise _RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        span.set_attribute("slomesh.request_id", vreq.request_id)
        self.ledger.record_admitted(vreq, received_ns, "generate")

        excluded: set[str] = set()
        attempts = 2 if self.forward_retry else 1
        failure_note = ""
        for attempt in range(attempts):
            decision, endpoint = await self._decide(vreq, frozenset(excluded))
            if decision.chosen is None:
                failure = self._refusal(vreq, decision)
                if failure_note and decision.outcome == "unavailable":
                    failure.message = f"{failure_note}; {failure.message}"
                raise failure
            chosen = decision.chosen
            progress = _StreamProgress()
            try:
                # aclosing: a client that goes away closes the upstream call at once.
                async with contextlib.aclosing(
                    self._forward(vreq, decision, endpoint, context, received_ns, progress)
                ) as stream:
                    async for response in stream:
                        yield response
                return
            except grpc.aio.AioRpcError as err:
                upstream = err.code()
                detail = (
                    f"serving region {chosen.region} ({endpoint}) failed: "
                    f"{upstream.name}: {err.details()}"
                )
                if (
                    progress.first_token_unix_ns is None
                    and upstream in _RETRIABLE
                    and attempt + 1 < attempts
                ):
                    logger.warning(
                        "serving region failed before the first token; placing again",
                        extra={
                            "request_id": vreq.request_id,
                            "region": chosen.region,
                            "error": detail,
                        },
                    )
                    self.metrics.forward_retries.inc()
                    excluded.add(chosen.region)
                    failure_note = detail
                    continue
                code = upstream if upstream in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE
                self.ledger.record_outcome(vreq.request_id, "error", error=detail)
                raise _RpcFailure(code, detail) from None
            except _RpcFailure as failure:
                self.ledger.record_outcome(vreq.request_id, "error", error=failure.message)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self.ledger.record_outcome(
                    vreq.request_id, "cancelled", error="client cancelled the call"
                )
                raise

    async def _forward(
        self,
        vreq: ValidatedRequest,
        decision: PlacementDecision,
        endpoint: str,
        context: grpc.aio.ServicerContext,
        received_ns: int,
        progress: _StreamProgress,
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        chosen = decision.chosen
        assert chosen is not None and chosen.prediction is not None
        if not endpoint:
            raise _RpcFailure(
                grpc.StatusCode.UNAVAILABLE, f"region {chosen.region} has no agent endpoint"
            )
        placement = decision.to_placement(endpoint)
        # "Move the prefix, then run here": wait for the move (bounded by the TTFT SLO); a
        # failed or late one only means the instance computes the prefix itself.
        await self.kv_mover.run(vreq, placement, received_ns, context.time_remaining())
        stub = self.agent_stub(endpoint)
        agent_request = region_agent_pb2.AgentGenerateRequest(
            request_id=vreq.request_id,
            model=vreq.model,
            prompt_token_ids=vreq.prompt_token_ids.tolist(),
            prompt_text=vreq.prompt_text,
            max_tokens=vreq.max_tokens,
            ignore_eos=vreq.ignore_eos,
            instance_id=chosen.instance_id,
            slo_class=vreq.slo_class,
            origin_region=vreq.origin_region,
        )
        with self.tracer.start_as_current_span(
            "scheduler.forward",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "slomesh.v1.RegionAgent",
                "rpc.method": "Generate",
                "server.address": endpoint,
                "slomesh.region": chosen.region,
                "slomesh.instance_id": chosen.instance_id,
                "slomesh.request_id": vreq.request_id,
            },
        ) as span:
            timeout = context.time_remaining()
            if timeout is not None and timeout <= 0:
                raise _RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            metadata = (
                *grpc_metadata_inject(),
                (SENT_UNIX_NS_METADATA, str(time.time_ns())),
            )
            call = stub.Generate(agent_request, metadata=metadata, timeout=timeout)
            self.view.track_inflight(
                chosen.region, chosen.instance_id, vreq.request_id, vreq.slo.tpot_target_ms()
            )
            try:
                # The upstream call is under way (grpc.aio sends it from a task of its own)
                # before the placement goes to the client: the client's write does not delay it.
                yield scheduler_pb2.GenerateResponse(placement=placement)
                async for message in call:
                    kind = message.WhichOneof("event")
                    if kind == "tokens":
                        now = time.time_ns()
                        if progress.first_token_unix_ns is None:
                            progress.first_token_unix_ns = now
                            span.add_event("first_token")
                            self.view.note_serving(
                                chosen.region, chosen.instance_id, vreq.model, now
                            )
                        progress.last_token_unix_ns = now
                        progress.tokens += len(message.tokens.token_ids)
                        yield scheduler_pb2.GenerateResponse(tokens=message.tokens)
                    elif kind == "completion":
                        completion = self._client_completion(
                            message.completion,
                            received_ns,
                            progress,
                            chosen.region,
                            chosen.instance_id,
                        )
                        span.set_attribute("slomesh.ttft_ms", completion.timings.ttft_ms)
                        span.set_attribute("slomesh.e2e_ms", completion.timings.e2e_ms)
                        # Learned before the yield: a client closing the stream on the
                        # completion must not keep the scheduler from learning it.
                        self._learn_output_length(
                            vreq.model, vreq.slo_class, completion.usage.completion_tokens
                        )
                        yield scheduler_pb2.GenerateResponse(completion=completion)
                        attained = self._finish_metrics(
                            vreq.slo,
                            vreq.prompt_tokens,
                            chosen.region,
                            chosen.prediction.ttft_ms,
                            completion.timings,
                        )
                        self.ledger.record_outcome(
                            vreq.request_id, "ok", completion=completion, slo_attained=attained
                        )
                        return
                    elif kind == "started":
                        span.set_attribute(
                            "slomesh.indexed_prefix_tokens", message.started.indexed_prefix_tokens
                        )
            finally:
                self.view.untrack_inflight(chosen.region, chosen.instance_id, vreq.request_id)
                if not call.done():
                    call.cancel()
                # Its TPOT no longer binds the instance: queued best-effort work may fit.
                self.dispatch_best_effort()
        # The agent closed the stream without a completion.
        raise _RpcFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"serving region {chosen.region} ended the stream without a completion",
        )

    @staticmethod
    def _client_completion(
        upstream: common_pb2.Completion,
        received_ns: int,
        progress: _StreamProgress,
        region: str,
        instance_id: str,
    ) -> common_pb2.Completion:
        """The completion with timings as the client of this scheduler sees them."""
        now = time.time_ns()
        completion = common_pb2.Completion()
        completion.CopyFrom(upstream)
        if not completion.region:
            completion.region = region
        if not completion.instance_id:
            completion.instance_id = instance_id
        first = progress.first_token_unix_ns or now
        last = progress.last_token_unix_ns or now
        ttft_ms = (first - received_ns) / 1e6
        e2e_ms = (last - received_ns) / 1e6
        n = completion.usage.completion_tokens or progress.tokens
        completion.timings.ttft_ms = ttft_ms
        completion.timings.e2e_ms = e2e_ms
        completion.timings.tpot_ms = (e2e_ms - ttft_ms) / (n - 1) if n > 1 else 0.0
        return completion

    # -- Place / ReportOutcome -----------------------------------------------------------------

    async def Place(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Placement:
        """Decides where the request runs, for clients that forward it themselves."""
        received_ns = time.time_ns()
        parent = grpc_metadata_extract(context.invocation_metadata())
        code = grpc.StatusCode.OK
        try:
            with self.tracer.start_as_current_span(
                "scheduler.Place", context=parent, kind=SpanKind.SERVER
            ) as span:
                try:
                    try:
                        vreq = self.validate(request)
                    except RequestValidationError as err:
                        raise _RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
                    self.ledger.record_admitted(vreq, received_ns, "place")
                    decision, endpoint = await self._decide(vreq, frozenset())
                    if decision.chosen is None:
                        raise self._refusal(vreq, decision)
                    self._remember(vreq, decision)
                    return decision.to_placement(endpoint)
                except _RpcFailure as failure:
                    code = failure.code
                    span.set_status(Status(StatusCode.ERROR, failure.message))
                    if failure.trailing:
                        context.set_trailing_metadata(failure.trailing)
                    await context.abort(failure.code, failure.message)
        finally:
            self.metrics.requests.labels("Place", code.name).inc()

    async def ReportOutcome(
        self, request: scheduler_pb2.OutcomeReport, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.OutcomeAck:
        """Records the outcome a client measured for a request it ran after `Place`.

        Errors: INVALID_ARGUMENT for a malformed ``request_id`` or an ``outcome`` other than
        ``ok``/``error`` (empty = ``ok``).
        """
        code = grpc.StatusCode.OK
        try:
            if not REQUEST_ID_PATTERN.match(request.request_id):
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, f"request_id: must match {REQUEST_ID_PATTERN.pattern}")
            outcome = request.outcome or "ok"
            if outcome not in ("ok", "error"):
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, f"outcome: must be 'ok' or 'error', got {outcome!r}")
            placed = self._placed.pop(request.request_id, None)
            if placed is not None:
                self.view.untrack_inflight(placed.region, placed.instance_id, request.request_id)
                self.dispatch_best_effort()
            attained: bool | None = None
            has_completion = request.HasField("completion")
            if placed is not None and has_completion and outcome == "ok":
                attained = self._finish_metrics(
                    placed.slo,
                    placed.prompt_tokens,
                    request.completion.region or placed.region,
                    placed.predicted_ttft_ms,
                    request.completion.timings,
                )
                self._learn_output_length(
                    placed.model, placed.slo.name, request.completion.usage.completion_tokens
                )
            self.ledger.record_outcome(
                request.request_id,
                outcome,
                completion=request.completion if has_completion else None,
                error=request.error,
                slo_attained=attained,
            )
            return scheduler_pb2.OutcomeAck()
        finally:
            self.metrics.requests.labels("ReportOutcome", code.name).inc()


class SchedulerService:
    """One global scheduler replica: gRPC server, NATS state plane, Redis ledger, metrics.

    Usage::

        service = SchedulerService(SchedulerConfig(nats_url=..., redis_url=..., topology=...))
        await service.start()        # service.port is the bound gRPC port
        ...
        await service.stop()

    Raises (from `start`):
        slomesh.slo.SloConfigError, slomesh.scheduler.policy.PolicyConfigError: bad config.
        TimeoutError: NATS unreachable for `nats_connect_timeout_s`.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.metrics = SchedulerMetrics.for_registry(config.registry)
        self.slo = load_slo_config(config.slo_config_path)
        self.policy = make_policy(config.policy)
        if config.region is not None and config.region not in config.topology.region_names:
            raise ValueError(
                f"region: {config.region!r} is not in the topology "
                f"({', '.join(config.topology.region_names)})"
            )
        self.view = ClusterView(
            config.topology,
            staleness_ms=config.staleness_ms,
            request_snapshot=self._request_snapshot,
            snapshot_retry_ms=max(2000.0, 2 * config.snapshot_timeout_s * 1000.0),
            output_lengths=OutputLengthPredictor(config.output_length_window),
        )
        self.ledger = Ledger(
            config.redis_url,
            ttl_s=config.ledger_ttl_s,
            retry_max_s=config.ledger_retry_max_s,
            max_backlog=config.ledger_max_backlog,
            metrics=self.metrics,
            output_length_window=config.output_length_window,
        )
        self.servicer = GlobalSchedulerServicer(
            view=self.view,
            policy=self.policy,
            slo=self.slo,
            ledger=self.ledger,
            metrics=self.metrics,
            routes=config.routes,
            region=config.region,
            forward_retry=config.forward_retry,
            kv_mover=KvMover(
                config.kv_transfer_routes, self.metrics, config.kv_transfer_max_wait_ms
            ),
        )
        self.nc: NatsClient | None = None
        self.grpc: GrpcServerHandle | None = None
        self.metrics_port: int | None = None
        self._subscriptions: list[Any] = []
        self._snapshot_tasks: dict[str, asyncio.Task[None]] = {}
        self._gauge_task: asyncio.Task[None] | None = None
        self._best_effort_task: asyncio.Task[None] | None = None
        self._prefetch_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound gRPC port (after `start`)."""
        if self.grpc is None:
            raise RuntimeError("scheduler not started")
        return self.grpc.port

    async def start(self) -> None:
        """Loads the output-length windows from Redis, connects NATS, starts the ledger writer,
        the gRPC server and the metrics server."""
        await self._load_output_lengths()
        self.ledger.start()
        self.nc = await self._connect_nats()
        self._subscriptions = [
            await self.nc.subscribe(bus.ALL_STATES, cb=self._on_state),
            await self.nc.subscribe(bus.ALL_KV, cb=self._on_kv),
            await self.nc.subscribe(bus.ALL_RTT, cb=self._on_rtt),
            await self.nc.subscribe(bus.ALL_LINKS, cb=self._on_links),
        ]
        self.grpc = await start_grpc_server(
            [(scheduler_pb2_grpc.add_GlobalSchedulerServicer_to_server, self.servicer)],
            [SERVICE_NAME],
            bind=f"{self.config.host}:{self.config.port}",
        )
        if self.config.metrics_port is not None:
            self.metrics_port = start_metrics_server(
                self.config.metrics_port, host=self.config.host, registry=self.config.registry
            )
        self._gauge_task = asyncio.get_running_loop().create_task(
            self._update_gauges(), name="scheduler-gauges"
        )
        self._best_effort_task = asyncio.get_running_loop().create_task(
            self.servicer.run_best_effort_timer(), name="scheduler-best-effort-timer"
        )
        if self.servicer.prefetcher is not None:
            self._prefetch_task = asyncio.get_running_loop().create_task(
                self.servicer.prefetcher.run(), name="scheduler-kv-prefetch"
            )
        logger.info(
            "global scheduler started",
            extra={
                "port": self.grpc.port,
                "policy": self.policy.name,
                "region": self.config.region,
                "nats_url": self.config.nats_url,
                "metrics_port": self.metrics_port,
            },
        )

    async def stop(self) -> None:
        """Graceful shutdown: queued best-effort requests refused (UNAVAILABLE), NOT_SERVING,
        grace period, NATS drain, ledger flush."""
        self.servicer.close_best_effort()
        if self._best_effort_task is not None:
            self._best_effort_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._best_effort_task
            self._best_effort_task = None
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prefetch_task
            self._prefetch_task = None
        if self.servicer.prefetcher is not None:
            await self.servicer.prefetcher.close()
        if self.grpc is not None:
            await self.grpc.stop(self.config.grace_s)
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauge_task
            self._gauge_task = None
        for task in list(self._snapshot_tasks.values()):
            task.cancel()
        for task in list(self._snapshot_tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._snapshot_tasks.clear()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), timeout=5.0)
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.close()
            self.nc = None
        await self.servicer.close_channels()
        await self.ledger.close(self.config.flush_timeout_s)
        logger.info("global scheduler stopped")

    async def _load_output_lengths(self) -> None:
        """Seeds the view's output-length predictor from Redis; on any Redis trouble logs and
        starts with empty windows (placement then uses the SLO classes' defaults)."""
        timeout_s = self.config.output_length_load_timeout_s
        try:
            windows = await asyncio.wait_for(self.ledger.load_output_lengths(), timeout_s)
        except (TimeoutError, RedisError, OSError) as err:
            logger.warning(
                "output-length windows not loaded from Redis; starting empty",
                extra={"error": f"{type(err).__name__}: {err}", "timeout_s": timeout_s},
            )
            return
        predictor = self.view.output_lengths
        for (model, slo_class), lengths in windows.items():
            predictor.observe_many(model, slo_class, lengths)
        logger.info(
            "output-length windows loaded from Redis",
            extra={
                "windows": len(windows),
                "observations": sum(len(v) for v in windows.values()),
            },
        )

    # -- NATS ----------------------------------------------------------------------------------

    async def _connect_nats(self) -> NatsClient:
        deadline = time.monotonic() + self.config.nats_connect_timeout_s
        delay = 0.1
        while True:
            try:
                return await bus.connect_nats(self.config.nats_url, "slomesh-global-scheduler")
            except (TimeoutError, nats.errors.NoServersError, OSError) as err:
                if time.monotonic() + delay > deadline:
                    raise TimeoutError(
                        f"NATS at {self.config.nats_url} unreachable for "
                        f"{self.config.nats_connect_timeout_s} s: {err}"
                    ) from None
                logger.warning(
                    "NATS not reachable yet; retrying",
                    extra={"nats_url": self.config.nats_url, "error": str(err)},
                )
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _on_state(self, msg: Msg) -> None:
        try:
            state = state_pb2.RegionState.FromString(msg.data)
        except DecodeError:
            self.metrics.state_messages.labels("invalid").inc()
            return
        if not state.region:
            state.region = bus.region_of_subject(msg.subject)
        self.view.apply_state(state)
        self.metrics.state_messages.labels("state").inc()
        self.servicer.dispatch_best_effort()

    async def _on_kv(self, msg: Msg) -> None:
        try:
            delta = state_pb2.KvIndexDelta.FromString(msg.data)
        except DecodeError:
            self.metrics.state_messages.labels("invalid").inc()
            return
        if not delta.region:
            delta.region = bus.region_of_subject(msg.subject)
        self.view.apply_kv_delta(delta)
        self.metrics.state_messages.labels("kv").inc()

    async def _on_rtt(self, msg: Msg) -> None:
        try:
            report = state_pb2.RttReport.FromString(msg.data)
        except DecodeError:
            self.metrics.state_messages.labels("invalid").inc()
            return
        if not report.region:
            report.region = bus.region_of_subject(msg.subject)
        self.view.apply_rtt(report)
        self.metrics.state_messages.labels("rtt").inc()

    async def _on_links(self, msg: Msg) -> None:
        """A region's KV transfer service's link statistics: the view's spare bandwidth of
        each of its WAN links, which the predictor's transfer times use."""
        try:
            report = parse_link_stats_report(msg.data, msg.subject)
        except ValueError as err:
            self.metrics.state_messages.labels("invalid").inc()
            logger.warning("invalid link stats", extra={"subject": msg.subject, "error": str(err)})
            return
        self.view.apply_link_stats(report)
        self.metrics.state_messages.labels("links").inc()

    def _request_snapshot(self, region: str) -> None:
        """View callback: fetch a region's KV index snapshot in the background."""
        if region in self._snapshot_tasks or self.nc is None:
            return
        self.metrics.kv_snapshots_requested.inc()
        task = asyncio.get_running_loop().create_task(
            self._fetch_snapshot(region), name=f"kv-snapshot-{region}"
        )
        self._snapshot_tasks[region] = task

    async def _fetch_snapshot(self, region: str) -> None:
        try:
            assert self.nc is not None
            reply = await self.nc.request(
                bus.kv_snapshot_subject(region), b"", timeout=self.config.snapshot_timeout_s
            )
            snapshot = state_pb2.KvIndexSnapshot.FromString(reply.data)
            if not snapshot.region:
                snapshot.region = region
            self.view.apply_kv_snapshot(snapshot)
            self.metrics.state_messages.labels("kv_snapshot").inc()
            logger.info(
                "kv index snapshot applied",
                extra={
                    "region": region,
                    "seq": snapshot.seq,
                    "incarnation": snapshot.agent_incarnation,
                    "instances": len(snapshot.instances),
                },
            )
        except asyncio.CancelledError:
            raise
        except (TimeoutError, nats.errors.Error, DecodeError, OSError) as err:
            logger.warning(
                "kv index snapshot request failed",
                extra={"region": region, "error": f"{type(err).__name__}: {err}"},
            )
            self.view.snapshot_failed(region)
        finally:
            self._snapshot_tasks.pop(region, None)

    async def _update_gauges(self) -> None:
        while True:
            now = time.time_ns()
            self.metrics.routable_regions.set(len(self.view.routable_regions(now)))
            for region in self.view.regions():
                self.metrics.region_state_age.labels(region).set(
                    self.view.state_age_ms(region, now) / 1000.0
                )
            self.metrics.ledger_backlog.set(self.ledger.backlog)
            await asyncio.sleep(0.5)
