"""Prometheus metrics of the region agent (`slomesh_agent_*`), in the default registry.

Every metric carries a `region` label, so several agents may share one process (tests).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS_FORWARDED = Counter(
    "slomesh_agent_requests_forwarded_total",
    "Generate requests forwarded to an engine instance.",
    ["region", "instance"],
)
MODEL_SWITCHES = Counter(
    "slomesh_agent_model_switches_total",
    "Model switches of swappable instances, by outcome (started, completed, failed).",
    ["region", "instance", "outcome"],
)
REQUEST_ERRORS = Counter(
    "slomesh_agent_request_errors_total",
    "Generate requests that ended with a gRPC error, by status code.",
    ["region", "code"],
)
REQUESTS_CANCELLED = Counter(
    "slomesh_agent_requests_cancelled_total",
    "Generate requests cancelled by the client (the upstream HTTP request was aborted).",
    ["region", "instance"],
)
TTFT_SECONDS = Histogram(
    "slomesh_agent_ttft_seconds",
    "Time to first token measured at the agent, from receipt of the Generate call.",
    ["region", "instance"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
KV_EVENTS_APPLIED = Counter(
    "slomesh_agent_kv_events_applied_total",
    "KV cache events (BlockStored/BlockRemoved/AllBlocksCleared) applied to the index.",
    ["region", "instance"],
)
KV_EVENT_GAPS = Counter(
    "slomesh_agent_kv_event_gaps_total",
    "Sequence gaps detected in an instance's KV event stream.",
    ["region", "instance"],
)
KV_MISSED_BATCHES = Counter(
    "slomesh_agent_kv_missed_batches_total",
    "KV event messages lost in gaps or that could not be decoded.",
    ["region", "instance"],
)
KV_DECODE_ERRORS = Counter(
    "slomesh_agent_kv_decode_errors_total",
    "KV event messages that could not be decoded.",
    ["region", "instance"],
)
KV_PUBLISHER_RESTARTS = Counter(
    "slomesh_agent_kv_publisher_restarts_total",
    "Times an instance's KV event sequence restarted (engine restart); the index was cleared.",
    ["region", "instance"],
)
KV_BLOCKS_SKIPPED = Counter(
    "slomesh_agent_kv_blocks_skipped_total",
    "Stored blocks that could not be given a request-side key, by reason.",
    ["region", "instance", "reason"],
)
KV_UNKNOWN_EVENTS = Counter(
    "slomesh_agent_kv_unknown_events_total",
    "KV events of unknown type that were skipped.",
    ["region", "instance"],
)
KV_INDEX_POSSIBLY_INCOMPLETE = Gauge(
    "slomesh_agent_kv_index_possibly_incomplete",
    "1 while an instance's index may miss blocks (after a sequence gap or joining a running "
    "publisher), until the engine clears its cache.",
    ["region", "instance"],
)
PUBLISHES = Counter(
    "slomesh_agent_publishes_total",
    "Messages published on NATS, by kind (state, kv, kv_snapshot, rtt).",
    ["region", "kind"],
)
PUBLISH_ERRORS = Counter(
    "slomesh_agent_publish_errors_total",
    "NATS publishes that failed, by kind.",
    ["region", "kind"],
)
SCRAPE_ERRORS = Counter(
    "slomesh_agent_scrape_errors_total",
    "Failed /metrics scrapes or /health probes of an instance.",
    ["region", "instance"],
)
INSTANCE_HEALTHY = Gauge(
    "slomesh_agent_instance_healthy", "1 when the instance is healthy.", ["region", "instance"]
)
INSTANCE_OUTSTANDING = Gauge(
    "slomesh_agent_instance_outstanding_requests",
    "Requests forwarded to the instance and not yet finished.",
    ["region", "instance"],
)
INSTANCE_QUEUED_PREFILL = Gauge(
    "slomesh_agent_instance_queued_prefill_tokens",
    "Uncached prompt tokens of forwarded requests without a first token.",
    ["region", "instance"],
)
INSTANCE_QUEUED_DECODE = Gauge(
    "slomesh_agent_instance_queued_decode_tokens",
    "Output tokens still to be produced by running forwarded requests.",
    ["region", "instance"],
)
INSTANCE_INDEXED_BLOCKS = Gauge(
    "slomesh_agent_instance_indexed_blocks",
    "Request-side KV block keys indexed for the instance.",
    ["region", "instance"],
)
INSTANCE_RUNNING = Gauge(
    "slomesh_agent_instance_num_requests_running",
    "vllm:num_requests_running as last scraped.",
    ["region", "instance"],
)
INSTANCE_WAITING = Gauge(
    "slomesh_agent_instance_num_requests_waiting",
    "vllm:num_requests_waiting as last scraped.",
    ["region", "instance"],
)
INSTANCE_KV_USAGE = Gauge(
    "slomesh_agent_instance_kv_cache_usage",
    "vllm:kv_cache_usage_perc as last scraped, in [0, 1].",
    ["region", "instance"],
)
INSTANCE_PREFILL_TPS = Gauge(
    "slomesh_agent_instance_prefill_tokens_per_s",
    "Measured prefill throughput (EWMA), prompt tokens per second.",
    ["region", "instance"],
)
INSTANCE_DECODE_TPS = Gauge(
    "slomesh_agent_instance_decode_tokens_per_s",
    "Measured decode throughput (EWMA), output tokens per second.",
    ["region", "instance"],
)
INSTANCE_ONLINE_FIT_R2 = Gauge(
    "slomesh_agent_instance_online_fit_r2",
    "R² of the online latency fit on its recent observations (forgetting-weighted; NaN while "
    "undefined), by phase (decode, prefill).",
    ["region", "instance", "phase"],
)
INSTANCE_ONLINE_FIT_OBSERVATIONS = Gauge(
    "slomesh_agent_instance_online_fit_observations",
    "Observations (scrape intervals) folded into the online latency fit, by phase.",
    ["region", "instance", "phase"],
)
PEER_RTT_MS = Gauge(
    "slomesh_agent_peer_rtt_ms", "Smoothed RTT to a peer region's agent, ms.", ["region", "peer"]
)
