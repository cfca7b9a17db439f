"""gRPC `KVTransfer` server of one region: transfers into this region, chunks out of it.

Destination side (``TransferPrefix``, ``Prewarm``, ``Watch``, ``Cancel``): a transfer is run
by the destination region's service. It asks the source region's service for the object's
manifest (``DescribeObject``), checks the two stores are compatible, stages the object under
``<store>/.partial/<transfer id>/`` (`slomesh.transfer.staging`) and runs one task per transfer
that pulls every file it lacks from the source on one stream (``FetchChunks`` of all of them,
each from its last verified offset: an object of many files, e.g. a KV folder of one file per
layer, costs one round trip plus its bytes, not a round trip per file), verifies every chunk's
checksum before writing it (a corrupt chunk is counted and re-requested, never stored),
re-opens the stream from the last verified chunks after a lost connection, verifies each whole
file's digest, and renames the object into place. A service that stops
keeps its staging; the next one to start on the same stores resumes every staged transfer from
its journal without fetching verified chunks again.

Source side (``DescribeObject``, ``FetchChunks``): reads the store's files and sends them in
checksummed chunks; each chunk first waits for its grant from the `LinkScheduler` of the link
this region -> the requesting region (strict priority for FOREGROUND_KV, weighted fair share
between PREFETCH_KV and PREWARM_WEIGHTS, EDF within a class: `slomesh.transfer.bandwidth`). A
FOREGROUND_KV stream holds its link as an open flow from its first chunk to its last, so the
background gets nothing while the stream is open, even between its chunks. Likewise at the
destination: while a FOREGROUND_KV transfer is set up or pulled here, background pulls take no
chunks off their streams (the destination's CPU serves the foreground first).

Any region's service accepts ``TransferPrefix``/``Prewarm`` for another destination, and
``Watch``/``Cancel`` with another ``region``, and forwards them to that region's service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from slomesh.service import GrpcServerHandle, start_grpc_server
from slomesh.telemetry import get_tracer, grpc_metadata_extract, grpc_metadata_inject
from slomesh.transfer.bandwidth import (
    DEFAULT_BURST_BYTES,
    LinkFlow,
    LinkScheduler,
    TrafficClass,
)
from slomesh.transfer.chunks import (
    DEFAULT_CHUNK_BYTES,
    ChunkChecksumError,
    FaultInjector,
    check_chunk_bytes,
    chunk_checksum,
    read_chunk,
)
from slomesh.transfer.objects import KIND_KV_PREFIX, KIND_WEIGHTS, ObjectManifest
from slomesh.transfer.staging import ObjectDigestError, validate_transfer_id
from slomesh.transfer.stores import (
    ExampleConnectorStore,
    KvStoreConfig,
    ObjectStore,
    TransferStoreError,
    WeightCacheConfig,
    WeightCacheStore,
    check_expected_sha256,
    validate_model_id,
)
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

from . import metrics
from .transfers import TERMINAL_STATES, Transfer

logger = logging.getLogger(__name__)
_tracer = get_tracer(__name__)

SERVICE_NAME = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
_P = kv_transfer_pb2.TransferProgress
_T = TypeVar("_T")

#: Service config of channels to peer services: unary calls retry on UNAVAILABLE (the streams
#: resume from their last verified chunk instead, see `KVTransferServicer`).
PEER_SERVICE_CONFIG = (
    '{"methodConfig": [{"name": ['
    + ", ".join(
        f'{{"service": "{SERVICE_NAME}", "method": "{m}"}}'
        for m in ("GetInfo", "DescribeObject", "TransferPrefix", "Prewarm", "Cancel")
    )
    + '], "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",'
    ' "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}'
)

#: FetchChunks failures after which the stream is re-opened from the last verified chunk.
_RETRYABLE_FETCH = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_KV_CLASSES = (TrafficClass.FOREGROUND_KV, TrafficClass.PREFETCH_KV)


class RpcError(Exception):
    """An RPC refused with a gRPC status (raised inside handlers, answered by `_unary`).

    Attributes:
        code: the status.
        details: the message for the client (names the field or the cause).
    """

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_store(cls, exc: TransferStoreError) -> RpcError:
        """The status a store adapter's error maps to (its `status`)."""
        return cls(grpc.StatusCode[exc.status], str(exc))


@dataclass(frozen=True)
class TransferOptions:
    """Tuning of a region's transfer service.

    Attributes:
        chunk_bytes: bytes per chunk this destination asks for, in [4 KiB, 16 MiB].
        max_concurrent_transfers: transfers running at once at this destination; more wait
            QUEUED.
        max_fetch_retries: consecutive re-opened streams without a verified byte after which
            a transfer FAILs (UNAVAILABLE).
        retry_backoff_s: first pause before re-opening a failed stream, seconds (doubles per
            consecutive failure, up to `max_retry_backoff_s`).
        max_retry_backoff_s: longest such pause, seconds.
        max_chunk_attempts: a chunk failing its checksum this many times in a row FAILs the
            transfer (DATA_LOSS).
        max_file_attempts: a file failing its whole-file digest this many times FAILs the
            transfer (DATA_LOSS).
        describe_timeout_s: limit of the DescribeObject call to the source, seconds.
        watch_min_interval_s: default least time between two Watch messages, seconds.
        watch_refresh_s: a RUNNING transfer's Watch gets a message at least this often
            (the rate and ETA move even when no chunk arrives), seconds.
        finished_retention: finished transfers kept for Watch/Cancel (oldest dropped first).
        link_burst_bytes: token-bucket depth of each link's scheduler, bytes (at least the
            peers' chunk size; `LinkScheduler`'s ``burst_bytes``).
        fault_injector: sender-side test hook (`FaultInjector`); None in production.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_concurrent_transfers: int = 8
    max_fetch_retries: int = 8
    retry_backoff_s: float = 0.05
    max_retry_backoff_s: float = 2.0
    max_chunk_attempts: int = 5
    max_file_attempts: int = 3
    describe_timeout_s: float = 30.0
    watch_min_interval_s: float = 0.1
    watch_refresh_s: float = 1.0
    finished_retention: int = 1000
    link_burst_bytes: int = DEFAULT_BURST_BYTES
    fault_injector: FaultInjector | None = None

    def __post_init__(self) -> None:
        check_chunk_bytes(self.chunk_bytes)
        for name in (
            "max_concurrent_transfers",
            "max_fetch_retries",
            "max_chunk_attempts",
            "max_file_attempts",
            "finished_retention",
            "link_burst_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "retry_backoff_s",
            "max_retry_backoff_s",
            "describe_timeout_s",
            "watch_min_interval_s",
            "watch_refresh_s",
        ):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0 and finite, got {value}")


class KVTransferServicer(kv_transfer_pb2_grpc.KVTransferServicer):
    """A region's KV transfer service (see the module docstring).

    Call `start` in the running loop before serving (it resumes staged transfers) and `close`
    after the server stopped.

    Args:
        region: region slug.
        link_capacity_bytes_per_s: peer region -> configured capacity of the link this region
            -> that peer, bytes per second; one `LinkScheduler` each paces the chunks sent to it.
        peers: region -> "host:port" of its KV transfer service (sources to pull from, and
            where forwarded calls go).
        kv_stores: this region's KV stores (one per engine instance), ids unique.
        weight_cache: this region's weight cache, or None.
        options: tuning (`TransferOptions`).

    Raises:
        ValueError: a capacity is not positive (the message names the peer), or two KV stores
            share an id.
    """

    def __init__(
        self,
        region: str,
        link_capacity_bytes_per_s: Mapping[str, float],
        *,
        peers: Mapping[str, str] | None = None,
        kv_stores: Sequence[KvStoreConfig] = (),
        weight_cache: WeightCacheConfig | None = None,
        options: TransferOptions | None = None,
    ):
        for peer, capacity in link_capacity_bytes_per_s.items():
            if not (capacity > 0 and math.isfinite(capacity)):
                raise ValueError(f"link_capacity_bytes_per_s[{peer!r}] must be > 0, got {capacity}")
        self.region = region
        self.options = options or TransferOptions()
        self.link_capacity_bytes_per_s = dict(link_capacity_bytes_per_s)
        self.links: dict[str, LinkScheduler] = {
            peer: LinkScheduler(capacity, burst_bytes=self.options.link_burst_bytes)
            for peer, capacity in self.link_capacity_bytes_per_s.items()
        }
        self.peers = dict(peers or {})
        self.kv_stores: dict[str, ExampleConnectorStore] = {}
        for config in kv_stores:
            if config.id in self.kv_stores:
                raise ValueError(f"kv_stores: duplicate id {config.id!r}")
            self.kv_stores[config.id] = ExampleConnectorStore(config)
        self.weight_cache = WeightCacheStore(weight_cache) if weight_cache is not None else None
        self.self_endpoint: str | None = None
        self.transfers: dict[str, Transfer] = {}
        self._channels: dict[str, tuple[grpc.aio.Channel, kv_transfer_pb2_grpc.KVTransferStub]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._io: dict[str, asyncio.Future[Any]] = {}
        self._foreground_here = 0
        self._background_may_run = asyncio.Event()
        self._background_may_run.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Resumes every transfer staged in this region's stores (their journals say how far
        each got). Idempotent."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.options.max_concurrent_transfers)
        for store in self._stores():
            for transfer_id in await asyncio.to_thread(store.staging.transfer_ids):
                if transfer_id in self.transfers:
                    continue
                try:
                    staged = await asyncio.to_thread(store.staging.open, transfer_id)
                    kind = str(staged.spec["kind"])
                except (OSError, ValueError, KeyError) as exc:
                    logger.warning(
                        "discarding unreadable staged transfer",
                        extra={
                            "transfer_id": transfer_id,
                            "store": str(store.root),
                            "error": str(exc),
                        },
                    )
                    await asyncio.to_thread(store.staging.discard, transfer_id)
                    continue
                transfer = Transfer(
                    transfer_id, kind, staged.manifest, staged.spec, self.region, staged=staged
                )
                transfer.resumed_bytes = staged.resumed_bytes
                transfer.bytes_done = staged.verified_total_bytes
                metrics.RESUMED_BYTES.labels(self.region, kind).inc(staged.resumed_bytes)
                logger.info(
                    "resuming staged transfer",
                    extra={
                        "transfer_id": transfer_id,
                        "kind": kind,
                        "object_key": staged.manifest.object_key,
                        "resumed_bytes": staged.resumed_bytes,
                        "bytes_total": staged.manifest.total_bytes,
                    },
                )
                self._start_task(transfer, store, None)

    async def close(self) -> None:
        """Stops every running transfer *keeping* its staging (a later `start` resumes it),
        and closes the peer channels."""
        tasks = [
            t.task for t in self.transfers.values() if t.task is not None and not t.task.done()
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()

    # -- destination side: RPCs ----------------------------------------------------------

    async def GetInfo(self, request, context: grpc.aio.ServicerContext):
        """This service's region, links, KV stores and whether it has a weight cache."""

        async def run(span: trace.Span) -> kv_transfer_pb2.TransferServiceInfo:
            return kv_transfer_pb2.TransferServiceInfo(
                region=self.region,
                link_capacity_bytes_per_s=self.link_capacity_bytes_per_s,
                kv_stores=sorted(self.kv_stores),
                weight_cache=self.weight_cache is not None,
            )

        return await self._unary("GetInfo", context, run)

    async def TransferPrefix(self, request, context: grpc.aio.ServicerContext):
        """Queues a prefix-KV transfer into this region (or forwards it); see the proto."""

        async def run(span: trace.Span) -> kv_transfer_pb2.TransferHandle:
            here = request.destination_region in ("", self.region)
            with self._foreground_first(request.traffic_class if here else None):
                return await self._transfer_prefix(request, context, span)

        return await self._unary("TransferPrefix", context, run)

    async def Prewarm(self, request, context: grpc.aio.ServicerContext):
        """Queues a weight prewarm into this region (or forwards it); see the proto."""
        return await self._unary(
            "Prewarm", context, lambda span: self._prewarm(request, context, span)
        )

    async def Watch(self, request, context: grpc.aio.ServicerContext):
        """Streams a transfer's progress until its terminal state; see the proto."""
        parent = grpc_metadata_extract(context.invocation_metadata())
        span = _tracer.start_span(
            "kv_transfer.watch",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"slomesh.region": self.region, "slomesh.transfer_id": request.transfer_id},
        )
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        error: RpcError | None = None
        try:
            region = request.region or self.region
            if region != self.region:
                stub = self._peer_stub(region)
                forwarded = kv_transfer_pb2.WatchRequest()
                forwarded.CopyFrom(request)
                forwarded.region = region
                call = stub.Watch(
                    forwarded, metadata=grpc_metadata_inject(trace.set_span_in_context(span))
                )
                try:
                    async for progress in call:
                        yield progress
                except grpc.aio.AioRpcError as exc:
                    raise RpcError(exc.code(), f"region {region!r}: {exc.details()}") from None
                return
            transfer = self._transfer(request.transfer_id)
            interval = request.min_interval_s or self.options.watch_min_interval_s
            if not (0 <= interval <= 60):
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"min_interval_s must be in [0, 60], got {request.min_interval_s}",
                )
            while True:
                changed = transfer.changed()
                progress = transfer.progress()
                yield progress
                if progress.state in TERMINAL_STATES:
                    return
                # At most one message per interval, but the terminal state at once: a caller
                # waiting on a transfer (a placed request on its KV) learns it is done then.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(transfer.finished.wait(), interval)
                if not changed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), self.options.watch_refresh_s)
        except RpcError as exc:
            code, error = exc.code, exc
        finally:
            self._record_rpc("Watch", span, code, started, error)
        if error is not None:
            await context.abort(error.code, error.details)

    async def Cancel(self, request, context: grpc.aio.ServicerContext):
        """Cancels a transfer and removes its staging; see the proto."""
        return await self._unary("Cancel", context, lambda span: self._cancel(request, context))

    # -- source side: RPCs ------------------------------------------------------------------

    async def DescribeObject(self, request, context: grpc.aio.ServicerContext):
        """The manifest of an object in this region's stores; see the proto."""

        async def run(span: trace.Span) -> kv_transfer_pb2.ObjectManifest:
            span.set_attribute("slomesh.kind", request.kind)
            if request.kind == KIND_KV_PREFIX:
                store = self._kv_store(request.store)
                if request.model and request.model != store.config.model:
                    raise RpcError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"KV store {store.id!r} serves model {store.config.model!r}, "
                        f"not {request.model!r}",
                    )
                manifest = await asyncio.to_thread(store.describe_prefix, list(request.token_ids))
            elif request.kind == KIND_WEIGHTS:
                manifest = await asyncio.to_thread(
                    self._weight_cache().describe_model, validate_model_id(request.model)
                )
            else:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"kind must be {KIND_KV_PREFIX!r} or {KIND_WEIGHTS!r}, got {request.kind!r}",
                )
            span.set_attribute("slomesh.object_key", manifest.object_key)
            span.set_attribute("slomesh.bytes_total", manifest.total_bytes)
            return manifest.to_proto()

        return await self._unary("DescribeObject", context, run)

    async def FetchChunks(self, request, context: grpc.aio.ServicerContext):
        """Streams files of an object (`path` from `offset`, then each of `next_files` from
        its offset) in checksummed, link-paced chunks."""
        parent = grpc_metadata_extract(context.invocation_metadata())
        span = _tracer.start_span(
            "kv_transfer.fetch_chunks",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "slomesh.region": self.region,
                "slomesh.transfer_id": request.transfer_id,
                "slomesh.peer_region": request.requester_region,
                "slomesh.path": request.path,
                "slomesh.offset": request.offset,
                "slomesh.files": 1 + len(request.next_files),
            },
        )
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        error: RpcError | None = None
        sent_bytes = 0
        flow: LinkFlow | None = None
        try:
            files, chunk_bytes, link, traffic_class, deadline = await self._open_fetch(request)
            if link is not None:
                # Open from before the first chunk to after the last: a foreground stream
                # keeps the link (strict priority) also while this side reads its next chunk
                # or the destination holds the stream back. Closed in `finally` and, should
                # this generator be left suspended by a vanished client, when the RPC ends.
                flow = link.open_flow(traffic_class)
                context.add_done_callback(lambda _call, close=flow.close: close())
            peer = request.requester_region
            faults = self.options.fault_injector
            for name, path, offset, size in files:
                chunks_sent = 0
                while offset < size:
                    nbytes = min(chunk_bytes, size - offset)
                    data = await asyncio.to_thread(read_chunk, path, offset, nbytes)
                    if len(data) != nbytes:
                        raise RpcError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"{name!r} of {request.object_key!r} shrank while being sent",
                        )
                    checksum = chunk_checksum(data)
                    if link is not None:
                        # The one call site of the bandwidth scheduler: the chunk goes on the
                        # wire once the link (this region -> peer) grants its bytes to its class.
                        await link.send(nbytes, traffic_class, deadline)
                    if faults is not None:
                        if faults.should_break(request.transfer_id, name, chunks_sent):
                            raise RpcError(
                                grpc.StatusCode.UNAVAILABLE, "fault injection: stream broken"
                            )
                        data = faults.on_send(
                            request.transfer_id, name, offset // chunk_bytes, data
                        )
                    yield kv_transfer_pb2.Chunk(
                        path=name, offset=offset, data=data, checksum_xxh3_64=checksum
                    )
                    metrics.BYTES_SENT.labels(self.region, peer, traffic_class.name).inc(nbytes)
                    sent_bytes += nbytes
                    chunks_sent += 1
                    offset += nbytes
        except RpcError as exc:
            code, error = exc.code, exc
        except TransferStoreError as exc:
            error = RpcError.from_store(exc)
            code = error.code
        finally:
            if flow is not None:
                flow.close()
            span.set_attribute("slomesh.sent_bytes", sent_bytes)
            self._record_rpc("FetchChunks", span, code, started, error)
        if error is not None:
            await context.abort(error.code, error.details)

    # -- destination side: implementation --------------------------------------------------

    async def _transfer_prefix(
        self, request: kv_transfer_pb2.TransferPrefixRequest, context, span: trace.Span
    ) -> kv_transfer_pb2.TransferHandle:
        if request.destination_region not in ("", self.region):
            # Another region's transfer: its service runs it (the request names it already).
            return await self._call_peer(
                request.destination_region, "TransferPrefix", request, context, span
            )
        for name in ("model", "source_region", "source_instance_id", "destination_instance_id"):
            if not getattr(request, name):
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must not be empty")
        if request.traffic_class not in _KV_CLASSES:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"traffic_class must be FOREGROUND_KV or PREFETCH_KV, got {request.traffic_class}",
            )
        deadline = self._check_deadline(request.deadline_unix_s)
        transfer_id = self._check_transfer_id(request.transfer_id)
        store = self._kv_store(request.destination_instance_id)
        if store.config.model != request.model:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV store {store.id!r} serves model {store.config.model!r}, not {request.model!r}",
            )
        if len(request.token_ids) < store.config.block_size:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids must hold at least one KV block ({store.config.block_size} tokens), "
                f"got {len(request.token_ids)}",
            )
        spec = {
            "kind": KIND_KV_PREFIX,
            "source_region": request.source_region,
            "source_store": request.source_instance_id,
            "destination_store": store.id,
            "model": request.model,
            "traffic_class": int(request.traffic_class),
            "deadline_unix_s": deadline or 0.0,
        }
        span.set_attributes(
            {
                "slomesh.source_region": request.source_region,
                "slomesh.destination_store": store.id,
                "slomesh.prompt_tokens": len(request.token_ids),
            }
        )
        existing = self._existing(transfer_id, spec)
        if existing is not None:
            return existing.handle()
        msg = await self._call_peer(
            request.source_region,
            "DescribeObject",
            kv_transfer_pb2.DescribeObjectRequest(
                kind=KIND_KV_PREFIX,
                store=request.source_instance_id,
                model=request.model,
                token_ids=request.token_ids,
                requester_region=self.region,
            ),
            context,
            span,
            timeout_s=self.options.describe_timeout_s,
        )
        manifest = self._decode_manifest(msg, request.source_region)
        store.check_compatible(manifest)
        prefix = list(request.token_ids[: manifest.prefix_tokens])
        if len(prefix) != manifest.prefix_tokens or manifest.object_key != store.folder_name(
            prefix
        ):
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"source's folder {manifest.object_key} is not this store's name for the "
                f"{manifest.prefix_tokens}-token prefix (folder hashes differ?)",
            )
        return await self._launch(transfer_id, manifest, spec, store, span)

    async def _prewarm(
        self, request: kv_transfer_pb2.PrewarmRequest, context, span: trace.Span
    ) -> kv_transfer_pb2.TransferHandle:
        if request.destination_region not in ("", self.region):
            # Another region's transfer: its service runs it (the request names it already).
            return await self._call_peer(
                request.destination_region, "Prewarm", request, context, span
            )
        if not request.source_region:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "source_region must not be empty")
        model = validate_model_id(request.model)
        deadline = self._check_deadline(request.deadline_unix_s)
        transfer_id = self._check_transfer_id(request.transfer_id)
        for path, digest in request.expected_sha256.items():
            if not _SHA256_HEX.match(digest):
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"expected_sha256[{path!r}] must be 64 hex characters, got {digest!r}",
                )
        cache = self._weight_cache()
        spec = {
            "kind": KIND_WEIGHTS,
            "source_region": request.source_region,
            "source_store": "",
            "destination_store": "",
            "model": model,
            "traffic_class": int(TrafficClass.PREWARM_WEIGHTS),
            "deadline_unix_s": deadline or 0.0,
            "expected_sha256": {k: v.lower() for k, v in request.expected_sha256.items()},
        }
        span.set_attributes(
            {"slomesh.source_region": request.source_region, "slomesh.model": model}
        )
        existing = self._existing(transfer_id, spec)
        if existing is not None:
            return existing.handle()
        msg = await self._call_peer(
            request.source_region,
            "DescribeObject",
            kv_transfer_pb2.DescribeObjectRequest(
                kind=KIND_WEIGHTS, model=model, requester_region=self.region
            ),
            context,
            span,
            timeout_s=self.options.describe_timeout_s,
        )
        manifest = self._decode_manifest(msg, request.source_region)
        cache.check_compatible(manifest)
        if manifest.object_key != model:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"source described {manifest.object_key!r}, not {model!r}",
            )
        if request.expected_sha256:
            check_expected_sha256(manifest, spec["expected_sha256"])
        if cache.has_object(model):
            local = await asyncio.to_thread(cache.describe_model, model)
            if [(f.path, f.digest) for f in local.files] != [
                (f.path, f.digest) for f in manifest.files
            ]:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the weight cache holds a different copy of {model!r} (its files or sha256 "
                    "differ from the source's); remove it first",
                )
        return await self._launch(transfer_id, manifest, spec, cache, span)

    async def _cancel(
        self, request: kv_transfer_pb2.CancelRequest, context
    ) -> kv_transfer_pb2.TransferProgress:
        region = request.region or self.region
        if region != self.region:
            forwarded = kv_transfer_pb2.CancelRequest()
            forwarded.CopyFrom(request)
            forwarded.region = region
            return await self._call_peer(region, "Cancel", forwarded, context, None)
        transfer = self._transfer(request.transfer_id)
        if not transfer.is_terminal:
            transfer.cancel_requested = True
            task = transfer.task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            if not transfer.is_terminal:
                # Its task was cancelled before it ever ran.
                await self._discard(transfer)
                transfer.set_state(_P.CANCELLED)
                metrics.TRANSFERS.labels(self.region, transfer.kind, "CANCELLED").inc()
            logger.info(
                "transfer cancelled",
                extra={"transfer_id": transfer.transfer_id, "bytes_done": transfer.bytes_done},
            )
        return transfer.progress()

    async def _launch(
        self,
        transfer_id: str | None,
        manifest: ObjectManifest,
        spec: dict[str, Any],
        store: ObjectStore,
        span: trace.Span,
    ) -> kv_transfer_pb2.TransferHandle:
        """Registers the transfer of `manifest` into `store` and starts its task (or completes
        it at once when the store holds the object already)."""
        kind = str(spec["kind"])
        span.set_attributes(
            {"slomesh.object_key": manifest.object_key, "slomesh.bytes_total": manifest.total_bytes}
        )
        if transfer_id is None:
            for other in self.transfers.values():
                if (
                    not other.is_terminal
                    and other.kind == kind
                    and other.spec.get("destination_store") == spec["destination_store"]
                    and other.manifest.object_key == manifest.object_key
                ):
                    span.set_attribute("slomesh.joined_transfer", other.transfer_id)
                    return other.handle()
        transfer_id = transfer_id or uuid.uuid4().hex
        span.set_attribute("slomesh.transfer_id", transfer_id)
        if store.has_object(manifest.object_key):
            transfer = Transfer(
                transfer_id, kind, manifest, spec, self.region, already_present=True
            )
            transfer.set_state(_P.COMPLETED)
            self._remember(transfer)
            metrics.TRANSFERS.labels(self.region, kind, "COMPLETED").inc()
            logger.info(
                "object already present",
                extra={"transfer_id": transfer_id, "object_key": manifest.object_key},
            )
            return transfer.handle()
        try:
            staged = await asyncio.to_thread(store.staging.create, transfer_id, manifest, spec)
        except FileExistsError:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS, f"transfer {transfer_id!r} is staged already"
            ) from None
        transfer = Transfer(transfer_id, kind, manifest, spec, self.region, staged=staged)
        self._start_task(transfer, store, trace.set_span_in_context(span))
        logger.info(
            "transfer queued",
            extra={
                "transfer_id": transfer_id,
                "kind": kind,
                "object_key": manifest.object_key,
                "bytes_total": manifest.total_bytes,
                "source_region": spec["source_region"],
                "traffic_class": TrafficClass(int(spec["traffic_class"])).name,
            },
        )
        return transfer.handle()

    def _start_task(self, transfer: Transfer, store: ObjectStore, parent: Context | None) -> None:
        self._remember(transfer)
        transfer.task = asyncio.get_running_loop().create_task(
            self._run(transfer, store, parent), name=f"kv-transfer-{transfer.transfer_id}"
        )

    async def _run(self, transfer: Transfer, store: ObjectStore, parent: Context | None) -> None:
        """The transfer's task: pull, verify, commit; maps every ending to a terminal state."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.options.max_concurrent_transfers)
        kind = transfer.kind
        metrics.TRANSFERS_ACTIVE.labels(self.region, kind).inc()
        span = _tracer.start_span(
            "kv_transfer.transfer",
            context=parent,
            attributes={
                "slomesh.region": self.region,
                "slomesh.transfer_id": transfer.transfer_id,
                "slomesh.kind": kind,
                "slomesh.object_key": transfer.manifest.object_key,
                "slomesh.source_region": str(transfer.spec.get("source_region", "")),
                "slomesh.bytes_total": transfer.bytes_total,
                "slomesh.resumed_bytes": transfer.resumed_bytes,
            },
        )
        failure: tuple[str, str] | None = None
        try:
            deadline = transfer.deadline_unix_s
            async with asyncio.timeout(None if deadline is None else deadline - time.time()):
                async with self._slots:
                    transfer.set_state(_P.RUNNING)
                    with self._foreground_first(transfer.traffic_class):
                        await self._pull(transfer, store)
            transfer.set_state(_P.COMPLETED)
            metrics.TRANSFER_DURATION.labels(self.region, kind).observe(
                time.monotonic() - transfer.created_monotonic_s
            )
            logger.info(
                "transfer completed",
                extra={
                    "transfer_id": transfer.transfer_id,
                    "object_key": transfer.manifest.object_key,
                    "bytes_total": transfer.bytes_total,
                    "resumed_bytes": transfer.resumed_bytes,
                    "corrupt_chunks": transfer.corrupt_chunks,
                    "retries": transfer.retries,
                },
            )
        except asyncio.CancelledError:
            await self._settle_io(transfer)
            if not transfer.cancel_requested:
                # The service is stopping: keep the staging, the next start resumes it.
                span.set_attribute("slomesh.interrupted", True)
                span.end()
                metrics.TRANSFERS_ACTIVE.labels(self.region, kind).dec()
                raise
            await self._discard(transfer)
            transfer.set_state(_P.CANCELLED)
        except TimeoutError:
            failure = ("DEADLINE_EXCEEDED", "the transfer's deadline passed before it completed")
        except RpcError as exc:
            failure = (exc.code.name, exc.details)
        except TransferStoreError as exc:
            failure = (exc.status, str(exc))
        except Exception as exc:
            logger.exception("transfer failed", extra={"transfer_id": transfer.transfer_id})
            failure = ("INTERNAL", f"{type(exc).__name__}: {exc}")
        if failure is not None:
            await self._settle_io(transfer)
            await self._discard(transfer)
            transfer.set_state(_P.FAILED, failure[1], failure[0])
            span.set_status(Status(StatusCode.ERROR, failure[1]))
            logger.warning(
                "transfer failed",
                extra={
                    "transfer_id": transfer.transfer_id,
                    "error_code": failure[0],
                    "error": failure[1],
                },
            )
        metrics.TRANSFERS_ACTIVE.labels(self.region, kind).dec()
        metrics.TRANSFERS.labels(self.region, kind, _P.State.Name(transfer.state)).inc()
        span.set_attributes(
            {
                "slomesh.state": _P.State.Name(transfer.state),
                "slomesh.corrupt_chunks": transfer.corrupt_chunks,
                "slomesh.retries": transfer.retries,
            }
        )
        span.end()

    async def _pull(self, transfer: Transfer, store: ObjectStore) -> None:
        """Fetches every missing file on one chunk stream, verifies each file's digest (a file
        failing it is fetched again), then commits the object into `store`."""
        staged = transfer.staged
        assert staged is not None
        source = str(transfer.spec["source_region"])
        stub = self._peer_stub(source)
        file_failures = dict.fromkeys((f.path for f in transfer.manifest.files), 0)
        while not staged.is_complete:
            await self._fetch_files(transfer, stub)
            for entry in transfer.manifest.files:
                if staged.is_file_verified(entry.path):
                    continue
                try:
                    await self._io_call(transfer, staged.verify_file, entry.path)
                except ObjectDigestError as exc:
                    file_failures[entry.path] += 1
                    metrics.CORRUPT_FILES.labels(self.region, source).inc()
                    transfer.set_bytes_done(staged.verified_total_bytes)
                    logger.warning(
                        "staged file failed its digest; fetching it again",
                        extra={"transfer_id": transfer.transfer_id, "error": str(exc)},
                    )
                    if file_failures[entry.path] >= self.options.max_file_attempts:
                        raise RpcError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        final = store.object_dir(transfer.manifest.object_key)
        extra = store.commit_extra_files(staged)
        try:
            await self._io_call(transfer, staged.commit, final, extra)
        except FileExistsError:
            # Another transfer committed the same object first: this copy is not needed.
            await self._io_call(transfer, staged.discard)
            transfer.already_present = True
        transfer.staged = None

    async def _fetch_files(
        self, transfer: Transfer, stub: kv_transfer_pb2_grpc.KVTransferStub
    ) -> None:
        """Pulls every file not yet complete until all their bytes are verified and staged.

        One FetchChunks stream asks for all of them (in manifest order, each from its last
        verified chunk), so the object costs one round trip plus its bytes over the link
        rather than a round trip per file. After a corrupt chunk or a lost connection the
        stream is re-opened for the files still missing, each from its last verified chunk.
        """
        staged = transfer.staged
        assert staged is not None
        spec = transfer.spec
        source = str(spec["source_region"])
        class_name = TrafficClass(transfer.traffic_class).name
        background = transfer.traffic_class != TrafficClass.FOREGROUND_KV
        failures = 0
        corrupt_at, corrupt_count = ("", -1), 0
        while wanted := [
            kv_transfer_pb2.FileRange(
                path=f.path, offset=staged.verified_bytes(f.path), size_bytes=f.size_bytes
            )
            for f in transfer.manifest.files
            if not staged.is_file_complete(f.path)
        ]:
            deadline = transfer.deadline_unix_s
            request = kv_transfer_pb2.FetchChunksRequest(
                transfer_id=transfer.transfer_id,
                requester_region=self.region,
                kind=transfer.kind,
                store=str(spec.get("source_store", "")),
                object_key=transfer.manifest.object_key,
                path=wanted[0].path,
                offset=wanted[0].offset,
                chunk_bytes=self.options.chunk_bytes,
                size_bytes=wanted[0].size_bytes,
                traffic_class=transfer.traffic_class,
                deadline_unix_s=deadline or 0.0,
                next_files=wanted[1:],
            )
            timeout = None if deadline is None else max(0.001, deadline - time.time())
            call = stub.FetchChunks(request, timeout=timeout, metadata=grpc_metadata_inject())
            paths = {w.path for w in wanted}
            progressed = False
            reason = ""
            try:
                async for chunk in call:
                    if background:
                        await self._background_may_run.wait()
                    if chunk.path not in paths or chunk.offset != staged.verified_bytes(chunk.path):
                        reason = "out_of_order"
                        break
                    try:
                        await self._io_call(
                            transfer,
                            staged.write_chunk,
                            chunk.path,
                            chunk.offset,
                            chunk.data,
                            chunk.checksum_xxh3_64,
                        )
                    except ChunkChecksumError as exc:
                        transfer.corrupt_chunks += 1
                        metrics.CORRUPT_CHUNKS.labels(self.region, source).inc()
                        logger.warning(
                            "corrupt chunk discarded; re-requesting it",
                            extra={"transfer_id": transfer.transfer_id, "error": str(exc)},
                        )
                        if (chunk.path, chunk.offset) == corrupt_at:
                            corrupt_count += 1
                        else:
                            corrupt_at, corrupt_count = (chunk.path, chunk.offset), 1
                        if corrupt_count >= self.options.max_chunk_attempts:
                            raise RpcError(
                                grpc.StatusCode.DATA_LOSS,
                                f"chunk of {chunk.path!r} at offset {chunk.offset} arrived "
                                f"corrupt {corrupt_count} times",
                            ) from None
                        reason = "corrupt_chunk"
                        break
                    except ValueError as exc:
                        logger.warning(
                            "chunk refused",
                            extra={"transfer_id": transfer.transfer_id, "error": str(exc)},
                        )
                        reason = "bad_chunk"
                        break
                    progressed = True
                    metrics.BYTES_RECEIVED.labels(self.region, source, class_name).inc(
                        len(chunk.data)
                    )
                    transfer.set_bytes_done(staged.verified_total_bytes)
                else:
                    # Files left over (e.g. a source that predates `next_files` sends only
                    # the first): asked for again on a new stream.
                    reason = "stream_ended_early"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE_FETCH:
                    raise RpcError(exc.code(), f"source {source!r}: {exc.details()}") from None
                reason = exc.code().name.lower()
            finally:
                call.cancel()
            if all(staged.is_file_complete(path) for path in paths):
                return
            transfer.retries += 1
            transfer.note()
            metrics.FETCH_RETRIES.labels(self.region, source, reason).inc()
            failures = 0 if progressed else failures + 1
            first = next(w.path for w in wanted if not staged.is_file_complete(w.path))
            if failures > self.options.max_fetch_retries:
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"source {source!r}: no progress on {first!r} after {failures} attempts "
                    f"(last: {reason})",
                )
            logger.info(
                "re-opening chunk stream from the last verified chunk",
                extra={
                    "transfer_id": transfer.transfer_id,
                    "path": first,
                    "offset": staged.verified_bytes(first),
                    "reason": reason,
                },
            )
            if reason != "corrupt_chunk" and failures:
                await asyncio.sleep(
                    min(
                        self.options.max_retry_backoff_s,
                        self.options.retry_backoff_s * 2 ** (failures - 1),
                    )
                )

    async def _io_call(self, transfer: Transfer, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs staging I/O in a worker thread; a cancellation waits for it to finish first
        (`_settle_io`), so a discarded staging is never written to afterwards."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._io[transfer.transfer_id] = future
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._io.pop(transfer.transfer_id, None)

    async def _settle_io(self, transfer: Transfer) -> None:
        future = self._io.pop(transfer.transfer_id, None)
        if future is not None:
            with contextlib.suppress(Exception):
                await future

    async def _discard(self, transfer: Transfer) -> None:
        staged, transfer.staged = transfer.staged, None
        if staged is not None:
            await asyncio.to_thread(staged.discard)

    # -- source side: implementation ----------------------------------------------------------

    async def _open_fetch(self, request: kv_transfer_pb2.FetchChunksRequest):
        """Validates a FetchChunks request: (files to send in order, each (object path, file,
        offset, size); chunk bytes; link or None; class; deadline or None)."""
        if not request.requester_region:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "requester_region must not be empty")
        try:
            chunk_bytes = check_chunk_bytes(request.chunk_bytes)
        except ValueError as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            traffic_class = TrafficClass(request.traffic_class)
        except ValueError:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown traffic_class {request.traffic_class}"
            ) from None
        if request.deadline_unix_s < 0 or not math.isfinite(request.deadline_unix_s):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "deadline_unix_s must be >= 0")
        if request.kind == KIND_KV_PREFIX:
            store: ObjectStore = self._kv_store(request.store)
        elif request.kind == KIND_WEIGHTS:
            store = self._weight_cache()
        else:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown kind {request.kind!r}")
        files: list[tuple[str, Path, int, int]] = []
        for wanted in (request, *request.next_files):
            if wanted.path in (name for name, *_ in files):
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{wanted.path!r} is asked for twice"
                )
            path = store.file_path(request.object_key, wanted.path)
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"{wanted.path!r}: {exc}") from None
            if size != wanted.size_bytes:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{wanted.path!r} of {request.object_key!r} is {size} bytes, the manifest "
                    f"said {wanted.size_bytes}: the object changed at the source",
                )
            if wanted.offset > size:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"offset {wanted.offset} of {wanted.path!r} is past the file's {size} bytes",
                )
            files.append((wanted.path, path, wanted.offset, size))
        if request.requester_region == self.region:
            link = None  # a move inside the region crosses no WAN link
        else:
            link = self.links.get(request.requester_region)
            if link is None:
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"no link to region {request.requester_region!r} is configured (--link)",
                )
        deadline = request.deadline_unix_s or None
        return files, chunk_bytes, link, traffic_class, deadline

    # -- helpers ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _foreground_first(self, traffic_class: int | None) -> Iterator[None]:
        """While a FOREGROUND_KV transfer into this region is set up (DescribeObject, staging)
        or pulled, verified and committed, the background pulls here stop taking chunks off
        their streams: the destination's CPU (gRPC reads, checksums, digests, writes) serves
        the foreground first, as the source's link does (`LinkScheduler.open_flow`). Their
        streams back up to the source, whose link the foreground holds meanwhile anyway.
        Another class (or None) holds nothing."""
        if traffic_class != TrafficClass.FOREGROUND_KV:
            yield
            return
        self._foreground_here += 1
        self._background_may_run.clear()
        try:
            yield
        finally:
            self._foreground_here -= 1
            if not self._foreground_here:
                self._background_may_run.set()

    def _stores(self) -> list[ObjectStore]:
        stores: list[ObjectStore] = list(self.kv_stores.values())
        if self.weight_cache is not None:
            stores.append(self.weight_cache)
        return stores

    def _kv_store(self, store_id: str) -> ExampleConnectorStore:
        store = self.kv_stores.get(store_id)
        if store is None:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"region {self.region!r} has no KV store {store_id!r} (has {sorted(self.kv_stores)})",
            )
        return store

    def _weight_cache(self) -> WeightCacheStore:
        if self.weight_cache is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"region {self.region!r} has no weight cache")
        return self.weight_cache

    def _transfer(self, transfer_id: str) -> Transfer:
        if not transfer_id:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "transfer_id must not be empty")
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"no transfer {transfer_id!r} in region {self.region!r}",
            )
        return transfer

    def _check_transfer_id(self, transfer_id: str) -> str | None:
        if not transfer_id:
            return None
        try:
            return validate_transfer_id(transfer_id)
        except ValueError as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    @staticmethod
    def _check_deadline(deadline_unix_s: float) -> float | None:
        if deadline_unix_s == 0:
            return None
        if not (deadline_unix_s > 0 and math.isfinite(deadline_unix_s)):
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"deadline_unix_s must be 0 or a positive time, got {deadline_unix_s}",
            )
        if deadline_unix_s <= time.time():
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_unix_s has passed")
        return deadline_unix_s

    def _existing(self, transfer_id: str | None, spec: Mapping[str, Any]) -> Transfer | None:
        """The transfer a retried call with the same id names, or None; ALREADY_EXISTS when
        the id names a different transfer."""
        if transfer_id is None:
            return None
        other = self.transfers.get(transfer_id)
        if other is None:
            return None
        keys = ("kind", "source_region", "source_store", "destination_store", "model")
        if any(other.spec.get(k) != spec.get(k) for k in keys):
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"transfer_id {transfer_id!r} names a different transfer",
            )
        return other

    def _remember(self, transfer: Transfer) -> None:
        self.transfers[transfer.transfer_id] = transfer
        excess = len(self.transfers) - self.options.finished_retention
        if excess > 0:
            finished = sorted(
                (t for t in self.transfers.values() if t.is_terminal),
                key=lambda t: t.finished_monotonic_s or 0.0,
            )
            for old in finished[:excess]:
                del self.transfers[old.transfer_id]

    def _decode_manifest(self, msg: kv_transfer_pb2.ObjectManifest, source: str) -> ObjectManifest:
        try:
            return ObjectManifest.from_proto(msg)
        except ValueError as exc:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION, f"source {source!r} sent a bad manifest: {exc}"
            ) from None

    def _peer_stub(self, region: str) -> kv_transfer_pb2_grpc.KVTransferStub:
        """A cached stub of `region`'s service (this service's own for this region).

        Raises:
            RpcError: NOT_FOUND when no endpoint is configured for the region.
        """
        endpoint = self.peers.get(region)
        if endpoint is None and region == self.region:
            endpoint = self.self_endpoint
        if endpoint is None:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"no KV transfer service endpoint is configured for region {region!r} (--peer)",
            )
        entry = self._channels.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(
                endpoint,
                options=[
                    ("grpc.enable_retries", 1),
                    ("grpc.service_config", PEER_SERVICE_CONFIG),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ],
            )
            entry = (channel, kv_transfer_pb2_grpc.KVTransferStub(channel))
            self._channels[endpoint] = entry
        return entry[1]

    async def _call_peer(
        self,
        region: str,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        span: trace.Span | None,
        timeout_s: float | None = None,
    ) -> Any:
        """Calls a unary RPC of `region`'s service with the caller's remaining deadline (and at
        most `timeout_s`); a peer's error is passed on with its status."""
        stub = self._peer_stub(region)
        limits = [t for t in (context.time_remaining(), timeout_s) if t is not None]
        timeout = min(limits) if limits else None
        ctx = trace.set_span_in_context(span) if span is not None else None
        try:
            return await getattr(stub, method)(
                request, timeout=timeout, metadata=grpc_metadata_inject(ctx)
            )
        except grpc.aio.AioRpcError as exc:
            raise RpcError(exc.code(), f"region {region!r}: {exc.details()}") from None

    async def _unary(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        fn: Callable[[trace.Span], Awaitable[_T]],
    ) -> _T:
        """Runs a unary handler in a server span; maps `RpcError` and store errors to the
        call's status (logged, counted)."""
        parent = grpc_metadata_extract(context.invocation_metadata())
        span = _tracer.start_span(
            f"kv_transfer.{_snake(method)}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"slomesh.region": self.region},
        )
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        error: RpcError | None = None
        try:
            with trace.use_span(span, end_on_exit=False):
                return await fn(span)
        except RpcError as exc:
            code, error = exc.code, exc
        except TransferStoreError as exc:
            error = RpcError.from_store(exc)
            code = error.code
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._record_rpc(method, span, code, started, error)
        await context.abort(error.code, error.details)
        raise AssertionError("unreachable: context.abort raises")

    def _record_rpc(
        self,
        method: str,
        span: trace.Span,
        code: grpc.StatusCode,
        started: float,
        error: RpcError | None,
    ) -> None:
        metrics.RPCS.labels(self.region, method, code.name).inc()
        metrics.RPC_LATENCY.labels(self.region, method).observe(time.perf_counter() - started)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error.details))
            logger.warning(
                "kv transfer rpc refused",
                extra={"method": method, "code": code.name, "error": error.details},
            )
        span.end()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass
class KVTransferServerHandle(GrpcServerHandle):
    """A started KV transfer server and its servicer (`stop` also stops its transfers, keeping
    their staging for the next start)."""

    servicer: KVTransferServicer | None = None

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful stop: NOT_SERVING, stop the server within `grace_s`, then the transfers."""
        await super().stop(grace_s)
        if self.servicer is not None:
            await self.servicer.close()


async def serve(
    region: str,
    link_capacity_bytes_per_s: Mapping[str, float],
    bind: str,
    *,
    peers: Mapping[str, str] | None = None,
    kv_stores: Sequence[KvStoreConfig] = (),
    weight_cache: WeightCacheConfig | None = None,
    options: TransferOptions | None = None,
) -> KVTransferServerHandle:
    """Starts the KVTransfer server (with health and reflection) on `bind` and resumes the
    transfers staged in its stores.

    Args:
        region, link_capacity_bytes_per_s, peers, kv_stores, weight_cache, options: as for
            `KVTransferServicer`.
        bind: "host:port"; port 0 picks a free one.

    Raises:
        ValueError: invalid configuration.
        RuntimeError: the address could not be bound.
    """
    servicer = KVTransferServicer(
        region,
        link_capacity_bytes_per_s,
        peers=peers,
        kv_stores=kv_stores,
        weight_cache=weight_cache,
        options=options,
    )
    handle = await start_grpc_server(
        [(kv_transfer_pb2_grpc.add_KVTransferServicer_to_server, servicer)], [SERVICE_NAME], bind
    )
    host = bind.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    servicer.self_endpoint = f"{host}:{handle.port}"
    await servicer.start()
    return KVTransferServerHandle(
        handle.server, handle.health, handle.port, handle.service_names, servicer
    )
