"""Prometheus metrics of the global scheduler (all named ``slomesh_scheduler_*``)."""

from __future__ import annotations

from typing import ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["SchedulerMetrics"]

_LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
_REQUEST_BUCKETS_S = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_ERROR_BUCKETS_MS = (
    -5000,
    -2000,
    -1000,
    -500,
    -250,
    -100,
    -50,
    -25,
    0,
    25,
    50,
    100,
    250,
    500,
    1000,
    2000,
    5000,
)


class SchedulerMetrics:
    """The scheduler's metrics, registered in one collector registry.

    Metrics:
        slomesh_scheduler_requests_total{rpc, code}: RPCs finished, by gRPC status code name.
        slomesh_scheduler_placements_total{policy, outcome, region}: placement decisions
            (outcome: placed, best_effort, queued, refused, unavailable). A queued request
            counts once as ``queued`` and once more when it leaves the queue.
        slomesh_scheduler_best_effort_queue_depth: best-effort requests waiting.
        slomesh_scheduler_best_effort_queue_wait_seconds{result}: time best-effort requests
            spent queued, by how they left (placed: admission found spare capacity; forced:
            placed after best_effort_max_wait_ms; failed: no candidate even then; cancelled:
            the client went away; shed: refused for a more urgent request; shutdown).
        slomesh_scheduler_best_effort_queue_full_total: best-effort requests refused because
            the queue was full.
        slomesh_scheduler_place_latency_seconds{policy}: time to decide one placement
            (validation + policy, in process).
        slomesh_scheduler_ttft_seconds{region}: client-side TTFT of Generate calls.
        slomesh_scheduler_e2e_seconds{region}: client-side E2E of Generate calls.
        slomesh_scheduler_ttft_prediction_error_ms{region}: actual minus predicted TTFT.
        slomesh_scheduler_slo_attained_total{slo_class, attained}: finished requests by SLO
            attainment.
        slomesh_scheduler_forward_retries_total: Generate calls retried on another region.
        slomesh_scheduler_kv_transfers_total{outcome}: prefix moves a placement asked for,
            by how the wait for them ended (completed, already_present, failed, timeout,
            no_endpoint, cancelled); the request is forwarded whatever the outcome.
        slomesh_scheduler_kv_transfer_wait_seconds{outcome}: time a Generate call waited
            for its prefix move, by outcome.
        slomesh_scheduler_kv_prefetches_total{outcome}: hot-prefix prefetches, by how they
            ended (completed, failed, no_endpoint, cancelled).
        slomesh_scheduler_kv_prefetch_bytes_total: KV bytes the completed prefetches moved.
        slomesh_scheduler_inflight_requests: Generate streams in progress.
        slomesh_scheduler_routable_regions: regions with fresh state and a healthy instance.
        slomesh_scheduler_region_state_age_seconds{region}: age of each region's last state.
        slomesh_scheduler_state_messages_total{kind}: NATS messages applied
            (state, kv, rtt, links, kv_snapshot, invalid).
        slomesh_scheduler_kv_snapshots_requested_total: KV index snapshots requested.
        slomesh_scheduler_ledger_backlog: ledger operations not yet written to Redis.
        slomesh_scheduler_ledger_writes_total{result}: ledger operations written (ok) or
            failed round trips (error).
        slomesh_scheduler_ledger_dropped_total: ledger operations dropped (backlog full).

    Args:
        registry: Where to register (default: the process-wide registry). Building two
            `SchedulerMetrics` on one registry raises; use `for_registry`.
    """

    _cache: ClassVar[dict[int, SchedulerMetrics]] = {}

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        r = registry
        self.requests = Counter(
            "slomesh_scheduler_requests",
            "RPCs finished by status code.",
            ["rpc", "code"],
            registry=r,
        )
        self.placements = Counter(
            "slomesh_scheduler_placements",
            "Placement decisions.",
            ["policy", "outcome", "region"],
            registry=r,
        )
        self.best_effort_queue_depth = Gauge(
            "slomesh_scheduler_best_effort_queue_depth",
            "Best-effort requests waiting in the queue.",
            registry=r,
        )
        self.best_effort_queue_wait = Histogram(
            "slomesh_scheduler_best_effort_queue_wait_seconds",
            "Time best-effort requests spent queued, by how they left.",
            ["result"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.best_effort_queue_full = Counter(
            "slomesh_scheduler_best_effort_queue_full",
            "Best-effort requests refused because the queue was full.",
            registry=r,
        )
        self.place_latency = Histogram(
            "slomesh_scheduler_place_latency_seconds",
            "Time to decide one placement.",
            ["policy"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "slomesh_scheduler_ttft_seconds",
            "Client-side TTFT of Generate calls.",
            ["region"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "slomesh_scheduler_e2e_seconds",
            "Client-side E2E latency of Generate calls.",
            ["region"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.ttft_error = Histogram(
            "slomesh_scheduler_ttft_prediction_error_ms",
            "Actual minus predicted TTFT, ms.",
            ["region"],
            buckets=_ERROR_BUCKETS_MS,
            registry=r,
        )
        self.slo_attained = Counter(
            "slomesh_scheduler_slo_attained",
            "Finished requests by SLO attainment.",
            ["slo_class", "attained"],
            registry=r,
        )
        self.forward_retries = Counter(
            "slomesh_scheduler_forward_retries",
            "Generate calls retried on another region.",
            registry=r,
        )
        self.kv_transfers = Counter(
            "slomesh_scheduler_kv_transfers",
            "Prefix moves placements asked for, by outcome of the wait.",
            ["outcome"],
            registry=r,
        )
        self.kv_transfer_wait = Histogram(
            "slomesh_scheduler_kv_transfer_wait_seconds",
            "Time Generate calls waited for their prefix move, by outcome.",
            ["outcome"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.kv_prefetches = Counter(
            "slomesh_scheduler_kv_prefetches",
            "Hot-prefix prefetches, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.kv_prefetch_bytes = Counter(
            "slomesh_scheduler_kv_prefetch_bytes",
            "KV bytes moved by completed hot-prefix prefetches.",
            registry=r,
        )
        self.inflight = Gauge(
            "slomesh_scheduler_inflight_requests", "Generate streams in progress.", registry=r
        )
        self.routable_regions = Gauge(
            "slomesh_scheduler_routable_regions",
            "Regions with fresh state and a healthy instance.",
            registry=r,
        )
        self.region_state_age = Gauge(
            "slomesh_scheduler_region_state_age_seconds",
            "Age of each region's last state.",
            ["region"],
            registry=r,
        )
        self.state_messages = Counter(
            "slomesh_scheduler_state_messages",
            "NATS state-plane messages applied.",
            ["kind"],
            registry=r,
        )
        self.kv_snapshots_requested = Counter(
            "slomesh_scheduler_kv_snapshots_requested",
            "KV index snapshots requested.",
            registry=r,
        )
        self.ledger_backlog = Gauge(
            "slomesh_scheduler_ledger_backlog", "Ledger operations not yet written.", registry=r
        )
        self.ledger_writes = Counter(
            "slomesh_scheduler_ledger_writes",
            "Ledger operations written or failed batches.",
            ["result"],
            registry=r,
        )
        self.ledger_dropped = Counter(
            "slomesh_scheduler_ledger_dropped",
            "Ledger operations dropped (backlog full).",
            registry=r,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry = REGISTRY) -> SchedulerMetrics:
        """The metrics registered in `registry`, created on first use (one set per registry)."""
        found = cls._cache.get(id(registry))
        if found is None or found.registry is not registry:
            found = cls._cache[id(registry)] = cls(registry)
        return found
