"""Prometheus metrics of the KV transfer service (every series labelled with its region, so two
services in one process, as in the tests, keep theirs apart)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPCS = Counter(
    "slomesh_kv_transfer_rpcs",
    "KVTransfer RPCs served, by method and gRPC status code.",
    ["region", "method", "code"],
)
RPC_LATENCY = Histogram(
    "slomesh_kv_transfer_rpc_duration_seconds",
    "Time to answer a unary KVTransfer RPC (streams: until the stream ends).",
    ["region", "method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0),
)
TRANSFERS = Counter(
    "slomesh_kv_transfer_transfers",
    "Transfers run by this (destination) service, by kind and final state.",
    ["region", "kind", "state"],
)
TRANSFERS_ACTIVE = Gauge(
    "slomesh_kv_transfer_transfers_active",
    "Transfers queued or running at this destination.",
    ["region", "kind"],
)
TRANSFER_DURATION = Histogram(
    "slomesh_kv_transfer_transfer_duration_seconds",
    "From queued to committed, completed transfers.",
    ["region", "kind"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
)
BYTES_RECEIVED = Counter(
    "slomesh_kv_transfer_received_bytes",
    "Verified bytes written to staging, by source region and traffic class.",
    ["region", "peer", "traffic_class"],
)
BYTES_SENT = Counter(
    "slomesh_kv_transfer_sent_bytes",
    "Bytes sent in FetchChunks streams, by requesting region and traffic class.",
    ["region", "peer", "traffic_class"],
)
CORRUPT_CHUNKS = Counter(
    "slomesh_kv_transfer_corrupt_chunks",
    "Chunks whose checksum failed at this destination (re-requested, never stored).",
    ["region", "peer"],
)
CORRUPT_FILES = Counter(
    "slomesh_kv_transfer_corrupt_files",
    "Staged files whose whole-file digest failed (fetched again from the start).",
    ["region", "peer"],
)
FETCH_RETRIES = Counter(
    "slomesh_kv_transfer_fetch_retries",
    "FetchChunks streams restarted from the last verified chunk, by reason.",
    ["region", "peer", "reason"],
)
RESUMED_BYTES = Counter(
    "slomesh_kv_transfer_resumed_bytes",
    "Verified bytes found in the staging journal at a restart (not fetched again).",
    ["region", "kind"],
)
