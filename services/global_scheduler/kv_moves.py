"""Prefix moves a placement asks for: "move the prefix, then run here" (issue 5).

A `Placement` whose ``kv_transfer_source_region`` is set says: the first
``kv_transfer_prefix_tokens`` prompt tokens' KV blocks are cached on
``kv_transfer_source_instance`` in that region; move them to the chosen instance before the
request runs. `KvMover.run` does it for the scheduler's ``Generate``: it calls the destination
region's KV transfer service (``KVTransfer.TransferPrefix``, traffic class FOREGROUND_KV, the
prefix's token ids, from the source instance's store to the chosen instance's store: store ids
are instance ids), follows it with ``Watch`` until it ends, and returns how it ended. The wait
is bounded by `move_deadline_unix_ns` (the TTFT SLO less the rest of the predicted TTFT),
which is also the transfer's ``deadline_unix_s`` (the link scheduler orders foreground chunks by
it; the service fails the transfer past it). The caller forwards the request whatever the
outcome: a failed or late move only means the instance computes the prefix itself.

Each move runs in a ``kv_transfer`` span (client kind; attributes: bytes, source and
destination region and instance, prefix tokens, transfer id, outcome) and is counted in
``slomesh_scheduler_kv_transfers_total{outcome}`` and
``slomesh_scheduler_kv_transfer_wait_seconds{outcome}``. A wait that ends by timeout or by the
client cancelling the call cancels the transfer (``KVTransfer.Cancel``, in the background).

The scheduler reaches a region's KV transfer service through ``--kv-transfer-routes-json``
(`services.global_scheduler.routes`, the agents' routes file's format: origin -> region ->
``host:port``); a region without a route gets no moves (outcome ``no_endpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.routes import Routes
from slomesh.scheduler.validation import ValidatedRequest
from slomesh.telemetry import get_tracer, grpc_metadata_inject
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc, scheduler_pb2

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_WAIT_MS",
    "KvMove",
    "KvMover",
    "TransferFailed",
    "move_deadline_unix_ns",
]

DEFAULT_MAX_WAIT_MS = 10_000.0
"""Longest wait for a move, ms, whatever the SLO allows (a class without a TTFT target)."""

CANCEL_TIMEOUT_S = 5.0
"""Timeout of the background ``Cancel`` of an abandoned transfer, seconds."""

WATCH_MIN_INTERVAL_S = 0.01
"""``Watch``'s least time between two progress messages, seconds: a request waits on the
transfer's end, so it must not learn of it up to the service's default 0.1 s late."""

_P = kv_transfer_pb2.TransferProgress
_SERVICE = "slomesh.v1.KVTransfer"

#: Channels to KV transfer services: TransferPrefix (idempotent by its transfer_id) and Cancel
#: retry on UNAVAILABLE.
KV_TRANSFER_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": _SERVICE, "method": "TransferPrefix"},
                    {"service": _SERVICE, "method": "Cancel"},
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


@dataclass(frozen=True, slots=True)
class KvMove:
    """The prefix move a placement asks for.

    Attributes:
        source_region: Region whose instance holds the prefix's KV.
        source_instance: That instance (its KV store's id).
        destination_region: The chosen region.
        destination_instance: The chosen instance (its KV store's id).
        prefix_tokens: Prompt tokens whose KV moves (0: the whole prompt's stored prefix).
        predicted_bytes: KV bytes the placement expects to cross the WAN.
    """

    source_region: str
    source_instance: str
    destination_region: str
    destination_instance: str
    prefix_tokens: int
    predicted_bytes: int

    @classmethod
    def from_placement(cls, placement: scheduler_pb2.Placement) -> KvMove | None:
        """The move `placement` carries, or None (``kv_transfer_source_region`` empty)."""
        if not placement.kv_transfer_source_region:
            return None
        return cls(
            source_region=placement.kv_transfer_source_region,
            source_instance=placement.kv_transfer_source_instance,
            destination_region=placement.region,
            destination_instance=placement.instance_id,
            prefix_tokens=placement.kv_transfer_prefix_tokens,
            predicted_bytes=placement.kv_transfer_bytes,
        )

    def token_ids(self, prompt_token_ids: npt.ArrayLike) -> list[int]:
        """The prompt tokens to send: the first `prefix_tokens` (all when 0 or longer)."""
        ids = np.asarray(prompt_token_ids, dtype=np.int64)
        return (ids[: self.prefix_tokens] if self.prefix_tokens else ids).tolist()


def move_deadline_unix_ns(
    received_unix_ns: int,
    ttft_target_ms: float,
    predicted_ttft_ms: float,
    predicted_transfer_ms: float,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    now_unix_ns: int | None = None,
) -> int:
    """When the wait for a move ends, Unix ns.

    The move must end by ``received + ttft_target - (predicted_ttft - predicted_transfer)``:
    what the TTFT SLO leaves once the rest of the predicted TTFT (RTT, queue wait, prefill of
    the uncached tokens, model load) is set aside. A move the SLO leaves no time for (the
    placement is best-effort already) still gets its predicted time. Either way the wait is at
    most `max_wait_ms` from now.

    Args:
        received_unix_ns: When the scheduler received the request.
        ttft_target_ms: The request's TTFT target (``math.inf``: none).
        predicted_ttft_ms: The placement's predicted TTFT, move included.
        predicted_transfer_ms: The move's predicted time (part of `predicted_ttft_ms`).
        max_wait_ms: Upper bound of the wait, ms, > 0.
        now_unix_ns: Now (default: the wall clock).

    Raises:
        ValueError: `max_wait_ms` not > 0.
    """
    if not max_wait_ms > 0:
        raise ValueError(f"max_wait_ms must be > 0, got {max_wait_ms}")
    now = time.time_ns() if now_unix_ns is None else now_unix_ns
    latest = now + int(max_wait_ms * 1e6)
    if not math.isfinite(ttft_target_ms):
        return latest
    rest_ms = max(0.0, predicted_ttft_ms - predicted_transfer_ms)
    slo_ns = received_unix_ns + int((ttft_target_ms - rest_ms) * 1e6)
    floor_ns = now + int(max(0.0, predicted_transfer_ms) * 1e6)
    return min(latest, max(slo_ns, floor_ns))


class TransferFailed(Exception):
    """The transfer ended without the prefix in place (the message says why)."""


class KvMover:
    """Runs the prefix moves of placements (module docstring) for one scheduler replica.

    Args:
        routes: KV transfer service addresses, origin -> region -> ``host:port``.
        metrics: The scheduler's metrics.
        max_wait_ms: Longest wait for one move, ms (`move_deadline_unix_ns`).
    """

    def __init__(
        self,
        routes: Routes,
        metrics: SchedulerMetrics,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ):
        if not max_wait_ms > 0:
            raise ValueError(f"kv_transfer_max_wait_ms must be > 0, got {max_wait_ms}")
        self.routes = routes
        self.metrics = metrics
        self.max_wait_ms = max_wait_ms
        self.tracer = get_tracer("slomesh.scheduler")
        self._channels: dict[str, tuple[grpc.aio.Channel, kv_transfer_pb2_grpc.KVTransferStub]] = {}
        self._cancels: set[asyncio.Task[None]] = set()

    def stub(self, endpoint: str) -> kv_transfer_pb2_grpc.KVTransferStub:
        """A cached stub of the KV transfer service at `endpoint` (one channel per address)."""
        entry = self._channels.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(
                endpoint,
                options=[
                    ("grpc.enable_retries", 1),
                    ("grpc.service_config", KV_TRANSFER_SERVICE_CONFIG),
                ],
            )
            entry = (channel, kv_transfer_pb2_grpc.KVTransferStub(channel))
            self._channels[endpoint] = entry
        return entry[1]

    async def close(self) -> None:
        """Waits for the background cancels (bounded) and closes every channel."""
        if self._cancels:
            await asyncio.wait(list(self._cancels), timeout=CANCEL_TIMEOUT_S)
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()

    async def run(
        self,
        request: ValidatedRequest,
        placement: scheduler_pb2.Placement,
        received_unix_ns: int,
        time_remaining_s: float | None = None,
    ) -> str:
        """Runs the move `placement` asks for and waits until it ends or its deadline passes.

        Args:
            request: The request (prompt tokens, model, SLO class, origin).
            placement: Its placement.
            received_unix_ns: When the scheduler received it.
            time_remaining_s: The caller's gRPC deadline, seconds from now (None: none); the
                wait ends before it.

        Returns:
            "" when the placement carries no move; else the outcome: ``completed``,
            ``already_present`` (the destination held the prefix), ``failed`` (the service
            refused or failed the transfer), ``timeout``, ``no_endpoint`` (no route to the
            destination's KV transfer service). Never raises for a failed move.

        Raises:
            asyncio.CancelledError: the call was cancelled (the transfer is cancelled too).
        """
        move = KvMove.from_placement(placement)
        if move is None:
            return ""
        predicted = placement.predicted
        deadline_ns = move_deadline_unix_ns(
            received_unix_ns,
            request.slo.ttft_target_ms(request.prompt_tokens),
            predicted.ttft_ms,
            predicted.transfer_ms,
            self.max_wait_ms,
        )
        if time_remaining_s is not None:
            deadline_ns = min(deadline_ns, time.time_ns() + int(time_remaining_s * 1e9))
        endpoint = self.routes.resolve(request.origin_region, move.destination_region, "")
        transfer_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        outcome, error = "failed", ""
        with self.tracer.start_as_current_span(
            "kv_transfer",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": _SERVICE,
                "server.address": endpoint,
                "slomesh.request_id": request.request_id,
                "slomesh.transfer_id": transfer_id,
                "slomesh.source_region": move.source_region,
                "slomesh.source_instance_id": move.source_instance,
                "slomesh.destination_region": move.destination_region,
                "slomesh.destination_instance_id": move.destination_instance,
                "slomesh.prefix_tokens": move.prefix_tokens,
                "slomesh.predicted_bytes": move.predicted_bytes,
                "slomesh.predicted_transfer_ms": predicted.transfer_ms,
                "slomesh.deadline_unix_s": deadline_ns / 1e9,
            },
        ) as span:
            try:
                if not endpoint:
                    outcome = "no_endpoint"
                    error = f"no KV transfer service route to {move.destination_region}"
                else:
                    timeout_s = (deadline_ns - time.time_ns()) / 1e9
                    if timeout_s <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(timeout_s):
                        outcome, _ = await self.transfer_prefix(
                            endpoint,
                            transfer_id=transfer_id,
                            model=request.model,
                            source=(move.source_region, move.source_instance),
                            destination=(move.destination_region, move.destination_instance),
                            token_ids=move.token_ids(request.prompt_token_ids),
                            traffic_class=kv_transfer_pb2.FOREGROUND_KV,
                            deadline_unix_ns=deadline_ns,
                            span=span,
                        )
            except TimeoutError:
                outcome, error = "timeout", "the move's deadline passed"
                self._cancel_later(endpoint, transfer_id, move.destination_region)
            except grpc.aio.AioRpcError as err:
                outcome, error = "failed", f"{err.code().name}: {err.details()}"
            except TransferFailed as err:
                outcome, error = "failed", str(err)
            except asyncio.CancelledError:
                outcome, error = "cancelled", "the client cancelled the call"
                self._cancel_later(endpoint, transfer_id, move.destination_region)
                raise
            except Exception as err:  # a move never loses the request: forward regardless
                logger.exception("prefix move crashed", extra={"transfer_id": transfer_id})
                outcome, error = "failed", f"{type(err).__name__}: {err}"
            finally:
                waited_s = time.perf_counter() - t0
                span.set_attribute("slomesh.outcome", outcome)
                span.set_attribute("slomesh.wait_ms", waited_s * 1000.0)
                if error:
                    span.set_status(Status(StatusCode.ERROR, error))
                self.metrics.kv_transfers.labels(outcome).inc()
                self.metrics.kv_transfer_wait.labels(outcome).observe(waited_s)
                log = logger.info if outcome in ("completed", "already_present") else logger.warning
                if not error:
                    message = "prefix move ended"
                elif outcome == "cancelled":
                    message = "prefix move cancelled with its call"
                else:
                    message = "prefix move failed; forwarding anyway"
                log(
                    message,
                    extra={
                        "request_id": request.request_id,
                        "transfer_id": transfer_id,
                        "outcome": outcome,
                        "error": error,
                        "source_region": move.source_region,
                        "destination_region": move.destination_region,
                        "wait_ms": round(waited_s * 1000.0, 3),
                    },
                )
        return outcome

    async def transfer_prefix(
        self,
        endpoint: str,
        *,
        transfer_id: str,
        model: str,
        source: tuple[str, str],
        destination: tuple[str, str],
        token_ids: list[int],
        traffic_class: int,
        deadline_unix_ns: int,
        span: Any,
    ) -> tuple[str, int]:
        """``TransferPrefix`` on the KV transfer service at `endpoint`, then ``Watch`` until
        the transfer ends.

        Args:
            endpoint: The service (``host:port``); it forwards to the destination's.
            transfer_id: The transfer's id.
            model: Model of the KV.
            source: (region, instance) whose store holds the prefix.
            destination: (region, instance) whose store gets it.
            token_ids: The prefix's tokens (the longest stored prefix of them moves).
            traffic_class: ``kv_transfer_pb2.FOREGROUND_KV`` or ``PREFETCH_KV``.
            deadline_unix_ns: When it must be done, Unix ns (0 = none).
            span: The caller's span (gets ``slomesh.bytes``, ``slomesh.moved_prefix_tokens``).

        Returns:
            (``completed`` or ``already_present``, the KV bytes moved).

        Raises:
            grpc.aio.AioRpcError: the service refused the transfer.
            TransferFailed: it ended FAILED or CANCELLED, or Watch ended first.
        """
        stub = self.stub(endpoint)
        metadata = grpc_metadata_inject()
        handle = await stub.TransferPrefix(
            kv_transfer_pb2.TransferPrefixRequest(
                transfer_id=transfer_id,
                model=model,
                source_region=source[0],
                source_instance_id=source[1],
                destination_region=destination[0],
                destination_instance_id=destination[1],
                token_ids=token_ids,
                traffic_class=traffic_class,  # type: ignore[arg-type]
                deadline_unix_s=deadline_unix_ns / 1e9,
            ),
            metadata=metadata,
        )
        span.set_attribute("slomesh.bytes", handle.bytes_total)
        span.set_attribute("slomesh.moved_prefix_tokens", handle.prefix_tokens)
        if handle.already_present:
            return "already_present", 0
        async for progress in stub.Watch(
            kv_transfer_pb2.WatchRequest(
                transfer_id=handle.transfer_id,
                region=handle.region,
                min_interval_s=WATCH_MIN_INTERVAL_S,
            ),
            metadata=metadata,
        ):
            if progress.state == _P.COMPLETED:
                return "completed", handle.bytes_total
            if progress.state in (_P.FAILED, _P.CANCELLED):
                raise TransferFailed(
                    f"transfer {_P.State.Name(progress.state)}: "
                    f"{progress.error_code}: {progress.error}".rstrip(": ")
                )
        raise TransferFailed("Watch ended before the transfer did")

    def _cancel_later(self, endpoint: str, transfer_id: str, region: str) -> None:
        """Cancels an abandoned transfer in the background (logged; NOT_FOUND is fine: it
        was never queued)."""
        if not endpoint:
            return

        async def cancel() -> None:
            try:
                await self.stub(endpoint).Cancel(
                    kv_transfer_pb2.CancelRequest(transfer_id=transfer_id, region=region),
                    timeout=CANCEL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    logger.warning(
                        "cancel of an abandoned transfer failed",
                        extra={"transfer_id": transfer_id, "error": f"{err.code().name}"},
                    )

        task = asyncio.get_running_loop().create_task(cancel(), name=f"kv-cancel-{transfer_id}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
