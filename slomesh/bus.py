"""The NATS state plane: subject names, connection options and traced publishing.

Subjects (DESIGN.md section 3), `<region>` being the region slug:

- `slomesh.region.<region>.state`: `RegionState`, at >= 10 Hz and on change;
- `slomesh.region.<region>.kv`: `KvIndexDelta`, batched prefix-index changes;
- `slomesh.region.<region>.kv.snapshot`: request/reply; the reply is a `KvIndexSnapshot`;
- `slomesh.region.<region>.rtt`: `RttReport`;
- `slomesh.region.<region>.links`: `LinkStatsReport`, the region's KV transfer service's WAN
  links (capacity, measured throughput, spare bandwidth), periodically
  (`slomesh.transfer.link_stats`).

Payloads are serialised protobuf; the W3C trace context rides in the message headers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import nats
from google.protobuf.message import Message
from nats.aio.client import Client as NatsClient

from slomesh.telemetry import inject_headers

logger = logging.getLogger(__name__)

SUBJECT_PREFIX = "slomesh.region"


def state_subject(region: str) -> str:
    return f"{SUBJECT_PREFIX}.{region}.state"


def kv_subject(region: str) -> str:
    return f"{SUBJECT_PREFIX}.{region}.kv"


def kv_snapshot_subject(region: str) -> str:
    return f"{SUBJECT_PREFIX}.{region}.kv.snapshot"


def rtt_subject(region: str) -> str:
    return f"{SUBJECT_PREFIX}.{region}.rtt"


def links_subject(region: str) -> str:
    return f"{SUBJECT_PREFIX}.{region}.links"


# Wildcards for consumers of every region.
ALL_STATES = f"{SUBJECT_PREFIX}.*.state"
ALL_KV = f"{SUBJECT_PREFIX}.*.kv"
ALL_RTT = f"{SUBJECT_PREFIX}.*.rtt"
ALL_LINKS = f"{SUBJECT_PREFIX}.*.links"


def region_of_subject(subject: str) -> str:
    """The region slug of a `slomesh.region.<region>.<kind>` subject.

    Raises:
        ValueError: the subject is not a slomesh region subject.
    """
    parts = subject.split(".")
    if len(parts) < 4 or ".".join(parts[:2]) != SUBJECT_PREFIX:
        raise ValueError(f"not a slomesh region subject: {subject!r}")
    return parts[2]


async def connect_nats(url: str, name: str) -> NatsClient:
    """Connects to NATS with options for a long-lived service: reconnect forever.

    Args:
        url: "nats://host:port" (comma-separated list for a cluster).
        name: client name shown by the server's monitoring.

    Returns:
        The connected client.

    Raises:
        nats.errors.NoServersError: no server reachable for the initial connection.
    """

    async def _on_error(exc: Exception) -> None:
        logger.warning("nats error", extra={"error": str(exc), "client": name})

    async def _on_disconnect() -> None:
        logger.warning("nats disconnected", extra={"client": name})

    async def _on_reconnect() -> None:
        logger.info("nats reconnected", extra={"client": name})

    return await nats.connect(
        servers=url.split(","),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        ping_interval=5,
        max_outstanding_pings=3,
        error_cb=_on_error,
        disconnected_cb=_on_disconnect,
        reconnected_cb=_on_reconnect,
    )


async def publish(
    nc: NatsClient,
    subject: str,
    message: Message,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Publishes a protobuf message with the current trace context in its headers."""
    hdrs = inject_headers(dict(headers or {}))
    await nc.publish(subject, message.SerializeToString(), headers=hdrs or None)
