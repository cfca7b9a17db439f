"""Two KV transfer services as two regions (real gRPC servers on free ports, temporary stores).

Region "tokyo" holds the source objects (a vLLM ExampleConnector folder of several layer files,
a weight-cache model); region "frankfurt" pulls them. Checked: a multi-file object arrives byte
for byte on one stream (one round trip, not one per file) and appears only once complete; a chunk damaged in transit is detected, counted,
re-sent and never written; a broken stream resumes; a destination stopped half-way resumes from
its journal on restart without fetching verified chunks again; Cancel cleans up; incompatible
stores give FAILED_PRECONDITION; Watch reports progress and the final state; a prewarm verifies
sha256.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from services.kv_transfer.server import KVTransferServerHandle, RpcError, TransferOptions, serve
from slomesh.telemetry import setup_telemetry
from slomesh.transfer import staging as staging_module
from slomesh.transfer.bandwidth import TrafficClass
from slomesh.transfer.chunks import FaultInjector
from slomesh.transfer.staging import PARTIAL_DIR
from slomesh.transfer.stores import WEIGHT_MANIFEST_FILE, WeightCacheConfig
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc
from tests.kv_transfer_factories import (
    BLOCK_SIZE,
    MODEL,
    kv_store_config,
    tokens,
    tree_bytes,
    write_kv_folder,
    write_weight_model,
)

pytestmark = pytest.mark.integration

SRC, DST = "tokyo", "frankfurt"
P = kv_transfer_pb2.TransferProgress
FAST_BYTES_PER_S = 1e9
SMALL_CHUNK = 4096


class Mesh:
    """The two regions' services and their stores (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.src_kv = root / "tokyo-kv"
        self.dst_kv = root / "frankfurt-kv"
        self.src_weights = root / "tokyo-weights"
        self.dst_weights = root / "frankfurt-weights"
        for d in (self.src_kv, self.dst_kv, self.src_weights, self.dst_weights):
            d.mkdir()
        self.src: KVTransferServerHandle | None = None
        self.dst: KVTransferServerHandle | None = None
        self._channels: list[grpc.aio.Channel] = []

    async def start_src(self, capacity_bytes_per_s=FAST_BYTES_PER_S, **options) -> None:
        self.src = await serve(
            SRC,
            {DST: capacity_bytes_per_s},
            "127.0.0.1:0",
            kv_stores=[kv_store_config("tokyo-0", self.src_kv)],
            weight_cache=WeightCacheConfig(path=self.src_weights),
            options=TransferOptions(**options),
        )

    async def start_dst(self, dst_store=None, **options) -> None:
        assert self.src is not None
        self.dst = await serve(
            DST,
            {SRC: FAST_BYTES_PER_S},
            "127.0.0.1:0",
            peers={SRC: f"127.0.0.1:{self.src.port}"},
            kv_stores=[dst_store or kv_store_config("frankfurt-0", self.dst_kv)],
            weight_cache=WeightCacheConfig(path=self.dst_weights, dtype="bfloat16"),
            options=TransferOptions(
                **{"chunk_bytes": SMALL_CHUNK, "retry_backoff_s": 0.01, **options}
            ),
        )
        # The source learns the destination's address too (forwarded calls go there).
        self.src.servicer.peers[DST] = f"127.0.0.1:{self.dst.port}"

    def stub(self, handle: KVTransferServerHandle) -> kv_transfer_pb2_grpc.KVTransferStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        self._channels.append(channel)
        return kv_transfer_pb2_grpc.KVTransferStub(channel)

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        for handle in (self.dst, self.src):
            if handle is not None:
                await handle.stop(0)


@pytest.fixture
async def mesh(tmp_path):
    m = Mesh(tmp_path)
    yield m
    await m.stop()


def prefix_request(prompt, **fields) -> kv_transfer_pb2.TransferPrefixRequest:
    return kv_transfer_pb2.TransferPrefixRequest(
        **{
            "model": MODEL,
            "source_region": SRC,
            "source_instance_id": "tokyo-0",
            "destination_region": DST,
            "destination_instance_id": "frankfurt-0",
            "token_ids": prompt,
            "traffic_class": kv_transfer_pb2.FOREGROUND_KV,
            **fields,
        }
    )


async def watch_all(stub, transfer_id: str, timeout_s: float = 60.0) -> list:
    """Every Watch message until the stream ends (after the terminal state)."""

    async def collect():
        return [
            p
            async for p in stub.Watch(
                kv_transfer_pb2.WatchRequest(transfer_id=transfer_id, min_interval_s=0.01)
            )
        ]

    return await asyncio.wait_for(collect(), timeout_s)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def partial_ids(store: Path) -> list[str]:
    d = store / PARTIAL_DIR
    return sorted(os.listdir(d)) if d.is_dir() else []


async def test_prefix_moves_a_multi_file_object_byte_for_byte(mesh):
    exporter = InMemorySpanExporter()
    setup_telemetry("test-kv-transfer", extra_exporters=[exporter])
    await mesh.start_src()
    await mesh.start_dst()
    prompt = tokens(8 * BLOCK_SIZE + 5)
    key, n = write_kv_folder(mesh.src_kv, prompt)
    sent_before = sample(
        "slomesh_kv_transfer_sent_bytes_total", region=SRC, peer=DST, traffic_class="FOREGROUND_KV"
    )
    # Called on the SOURCE region's service: forwarded to the destination, which runs it.
    handle = await mesh.stub(mesh.src).TransferPrefix(prefix_request(prompt))
    assert handle.region == DST
    assert (handle.object_key, handle.prefix_tokens) == (key, n)
    assert not handle.already_present
    progress = await watch_all(mesh.stub(mesh.dst), handle.transfer_id)
    final = progress[-1]
    assert final.state == P.COMPLETED, final.error
    assert final.bytes_done == final.bytes_total == handle.bytes_total
    assert final.eta_s == 0
    assert [p.bytes_done for p in progress] == sorted(p.bytes_done for p in progress)
    assert tree_bytes(mesh.dst_kv / key) == tree_bytes(mesh.src_kv / key)
    assert len(tree_bytes(mesh.dst_kv / key)) == 3
    assert partial_ids(mesh.dst_kv) == []
    sent = sample(
        "slomesh_kv_transfer_sent_bytes_total", region=SRC, peer=DST, traffic_class="FOREGROUND_KV"
    )
    assert sent - sent_before == handle.bytes_total
    # The same prefix again: nothing moves.
    again = await mesh.stub(mesh.dst).TransferPrefix(prefix_request(prompt))
    assert again.already_present
    assert (await watch_all(mesh.stub(mesh.dst), again.transfer_id))[-1].state == P.COMPLETED
    # One trace: TransferPrefix -> forwarded TransferPrefix -> transfer -> FetchChunks, one
    # stream for the 3 files.
    spans = exporter.get_finished_spans()
    transfer_span = next(s for s in spans if s.name == "kv_transfer.transfer")
    fetches = [s for s in spans if s.name == "kv_transfer.fetch_chunks"]
    assert [s.attributes["slomesh.files"] for s in fetches] == [3]
    assert {s.context.trace_id for s in fetches} == {transfer_span.context.trace_id}
    assert transfer_span.attributes["slomesh.state"] == "COMPLETED"


async def test_a_32_file_object_costs_one_round_trip_not_one_per_file(mesh):
    """A KV folder of 32 layer files (an 8B model's) moves on one FetchChunks stream asking
    for all 32 files: one round trip to the source, where a stream per file cost 32 in a row.
    Each file still comes in several checksummed chunks."""
    exporter = InMemorySpanExporter()
    setup_telemetry("test-kv-transfer", extra_exporters=[exporter])
    await mesh.start_src()
    await mesh.start_dst()
    prompt = tokens(4 * BLOCK_SIZE + 1, seed=8)
    key, _ = write_kv_folder(mesh.src_kv, prompt, num_layers=32, seed=8)
    handle = await mesh.stub(mesh.dst).TransferPrefix(prefix_request(prompt))
    final = (await watch_all(mesh.stub(mesh.dst), handle.transfer_id))[-1]
    assert final.state == P.COMPLETED, final.error
    copied = tree_bytes(mesh.dst_kv / key)
    assert len(copied) == 32
    assert copied == tree_bytes(mesh.src_kv / key)
    assert min(len(data) for data in copied.values()) > 2 * SMALL_CHUNK
    fetches = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "kv_transfer.fetch_chunks"
        and s.attributes["slomesh.transfer_id"] == handle.transfer_id
    ]
    assert len(fetches) == 1
    assert fetches[0].attributes["slomesh.files"] == 32
    assert fetches[0].attributes["slomesh.sent_bytes"] == handle.bytes_total
    assert final.retries == 0


async def test_a_source_sending_only_the_first_file_is_asked_again_for_the_rest(mesh, monkeypatch):
    """A source that predates `next_files` streams `path` alone: the destination re-opens the
    stream for the files still missing, one after the other, and the object arrives whole."""
    await mesh.start_src()
    await mesh.start_dst()
    servicer = mesh.src.servicer
    open_fetch = servicer._open_fetch

    async def first_file_only(request):
        del request.next_files[:]
        return await open_fetch(request)

    monkeypatch.setattr(servicer, "_open_fetch", first_file_only)
    prompt = tokens(6 * BLOCK_SIZE + 1, seed=9)
    key, _ = write_kv_folder(mesh.src_kv, prompt, seed=9)
    labels = {"region": DST, "peer": SRC, "reason": "stream_ended_early"}
    retries_before = sample("slomesh_kv_transfer_fetch_retries_total", **labels)
    handle = await mesh.stub(mesh.dst).TransferPrefix(prefix_request(prompt))
    final = (await watch_all(mesh.stub(mesh.dst), handle.transfer_id))[-1]
    assert final.state == P.COMPLETED, final.error
    assert final.retries == 2
    assert sample("slomesh_kv_transfer_fetch_retries_total", **labels) == retries_before + 2
    assert tree_bytes(mesh.dst_kv / key) == tree_bytes(mesh.src_kv / key)


async def test_fetch_chunks_checks_every_file_it_is_asked_for(mesh):
    await mesh.start_src()
    prompt = tokens(4 * BLOCK_SIZE + 1, seed=10)
    write_kv_folder(mesh.src_kv, prompt, seed=10)
    stub = mesh.stub(mesh.src)
    manifest = await stub.DescribeObject(
        kv_transfer_pb2.DescribeObjectRequest(
            kind="kv_prefix", store="tokyo-0", token_ids=prompt, requester_region=DST
        )
    )
    first, second = manifest.files[0], manifest.files[1]

    def fetch(*next_files):
        return kv_transfer_pb2.FetchChunksRequest(
            transfer_id="t",
            requester_region=DST,
            kind="kv_prefix",
            store="tokyo-0",
            object_key=manifest.object_key,
            path=first.path,
            size_bytes=first.size_bytes,
            next_files=[kv_transfer_pb2.FileRange(**f) for f in next_files],
        )

    asked = fetch({"path": second.path, "offset": SMALL_CHUNK, "size_bytes": second.size_bytes})
    ok = [(c.path, c.offset) async for c in stub.FetchChunks(asked)]
    # Each file from its own offset, in the order asked (chunks of 1 MiB: one each here).
    assert ok == [(first.path, 0), (second.path, SMALL_CHUNK)]
    cases = [
        ({"path": first.path, "size_bytes": first.size_bytes}, "INVALID_ARGUMENT", "twice"),
        ({"path": "nope.safetensors", "size_bytes": 1}, "NOT_FOUND", "nope"),
        ({"path": second.path, "size_bytes": 1}, "FAILED_PRECONDITION", "changed"),
        (
            {"path": second.path, "offset": second.size_bytes + 1, "size_bytes": second.size_bytes},
            "INVALID_ARGUMENT",
            "past the file",
        ),
    ]
    for next_file, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.FetchChunks(fetch(next_file)):
                pass
        assert err.value.code() == grpc.StatusCode[code], next_file
        assert message in err.value.details()


async def test_a_foreground_stream_holds_its_link_until_it_ends_however_it_ends(mesh):
    """While a FOREGROUND_KV FetchChunks stream is open the source grants its link nothing
    for the background, even while the client reads nothing; the hold ends with the stream:
    read to the end, broken by the source, or dropped by the client."""
    faults = FaultInjector(break_after_chunks=2)
    await mesh.start_src(fault_injector=faults)
    # 24 MiB: more than the client's HTTP/2 flow-control window (~6 MiB here), so a stream
    # the client stops reading stalls in the source's handler with no chunk at the scheduler.
    prompt = tokens(2048 * BLOCK_SIZE + 1, seed=11)
    write_kv_folder(mesh.src_kv, prompt, seed=11)
    stub = mesh.stub(mesh.src)
    manifest = await stub.DescribeObject(
        kv_transfer_pb2.DescribeObjectRequest(
            kind="kv_prefix", store="tokyo-0", token_ids=prompt, requester_region=DST
        )
    )
    link = mesh.src.servicer.links[DST]
    first, *rest = manifest.files

    def fetch(transfer_id: str) -> kv_transfer_pb2.FetchChunksRequest:
        return kv_transfer_pb2.FetchChunksRequest(
            transfer_id=transfer_id,
            requester_region=DST,
            kind="kv_prefix",
            store="tokyo-0",
            object_key=manifest.object_key,
            path=first.path,
            size_bytes=first.size_bytes,
            chunk_bytes=64 * 1024,
            traffic_class=kv_transfer_pb2.FOREGROUND_KV,
            next_files=[
                kv_transfer_pb2.FileRange(path=f.path, size_bytes=f.size_bytes) for f in rest
            ],
        )

    # Broken by the source (fault injection) after two chunks: released. (Not checked while
    # the client reads them: they are buffered, and the handler may be gone by then.)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.FetchChunks(fetch("broken")):
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert link.stats().open_flows[TrafficClass.FOREGROUND_KV] == 0
    faults.break_after_chunks = None
    # Dropped by the client after its first chunk: the background waits until then.
    call = stub.FetchChunks(fetch("dropped"))
    await call.read()
    background = asyncio.create_task(link.send(SMALL_CHUNK, TrafficClass.PREWARM_WEIGHTS))
    await asyncio.sleep(0.2)
    assert not background.done()
    assert link.stats().open_flows[TrafficClass.FOREGROUND_KV] == 1
    call.cancel()
    await asyncio.wait_for(background, 10.0)
    assert link.stats().open_flows[TrafficClass.FOREGROUND_KV] == 0
    # Read to the end.
    chunks = [c async for c in stub.FetchChunks(fetch("whole"))]
    assert sum(len(c.data) for c in chunks) == sum(f.size_bytes for f in manifest.files)
    assert link.stats().open_flows[TrafficClass.FOREGROUND_KV] == 0


async def test_a_corrupt_chunk_is_detected_resent_and_never_stored(mesh, monkeypatch):
    faults = FaultInjector.corrupting([2])
    await mesh.start_src(fault_injector=faults)
    await mesh.start_dst()
    prompt = tokens(6 * BLOCK_SIZE + 1, seed=1)
    key, _ = write_kv_folder(mesh.src_kv, prompt, seed=1)
    source_files = tree_bytes(mesh.src_kv / key)
    writes: list[tuple[str, int, bytes]] = []
    real_pwrite = os.pwrite

    def spy_pwrite(fd, data, offset):
        writes.append((os.readlink(f"/proc/self/fd/{fd}"), offset, bytes(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(staging_module.os, "pwrite", spy_pwrite)
    corrupt_before = sample("slomesh_kv_transfer_corrupt_chunks_total", region=DST, peer=SRC)
    handle = await mesh.stub(mesh.dst).TransferPrefix(prefix_request(prompt))
    final = (await watch_all(mesh.stub(mesh.dst), handle.transfer_id))[-1]
    assert final.state == P.COMPLETED, final.error
    # Chunk 2 of each of the 3 layer files was damaged once on the wire. The destination
    # detects every damaged chunk it reads -- the first file's always (it reads the files in
    # order) -- and re-requests from it; a later file's chunk the source had already damaged
    # and put in flight on that stream is dropped unread with it and re-sent clean.
    assert len(faults.corrupted) == 3
    assert 1 <= final.corrupt_chunks <= 3
    assert final.retries == final.corrupt_chunks
    assert sample("slomesh_kv_transfer_corrupt_chunks_total", region=DST, peer=SRC) == (
        corrupt_before + final.corrupt_chunks
    )
    assert tree_bytes(mesh.dst_kv / key) == source_files
    # Never stored: every byte ever written to staging is the source's byte at that offset.
    assert writes
    for path, offset, data in writes:
        name = Path(path).name
        assert data == source_files[name][offset : offset + len(data)], (name, offset)


async def test_a_broken_stream_resumes_from_the_last_verified_chunk(mesh):
    faults = FaultInjector(break_after_chunks=2)
    await mesh.start_src(fault_injector=faults)
    await mesh.start_dst()
    prompt = tokens(6 * BLOCK_SIZE + 1, seed=2)
    key, _ = write_kv_folder(mesh.src_kv, prompt, seed=2)
    sent_before = sample(
        "slomesh_kv_transfer_sent_bytes_total", region=SRC, peer=DST, traffic_class="PREFETCH_KV"
    )
    handle = await mesh.stub(mesh.dst).TransferPrefix(
        prefix_request(prompt, traffic_class=kv_transfer_pb2.PREFETCH_KV)
    )
    final = (await watch_all(mesh.stub(mesh.dst), handle.transfer_id))[-1]
    assert final.state == P.COMPLETED, final.error
    assert len(faults.broken) == 3
    assert final.retries == 3
    assert tree_bytes(mesh.dst_kv / key) == tree_bytes(mesh.src_kv / key)
    # No byte was sent twice: each stream re-opened at the first unverified byte.
    sent = sample(
        "slomesh_kv_transfer_sent_bytes_total", region=SRC, peer=DST, traffic_class="PREFETCH_KV"
    )
    assert sent - sent_before == handle.bytes_total


async def slow_mesh(mesh: Mesh, capacity_bytes_per_s: float = 300_000) -> None:
    """A source whose link to the destination carries `capacity_bytes_per_s` in 16 KiB chunks."""
    await mesh.start_src(capacity_bytes_per_s=capacity_bytes_per_s, link_burst_bytes=32 * 1024)
    await mesh.start_dst(chunk_bytes=16 * 1024)


async def wait_bytes(stub, transfer_id: str, at_least: int, timeout_s: float = 30.0):
    async def run():
        async for p in stub.Watch(
            kv_transfer_pb2.WatchRequest(transfer_id=transfer_id, min_interval_s=0.01)
        ):
            if p.bytes_done >= at_least or p.state in (P.COMPLETED, P.FAILED, P.CANCELLED):
                return p
        raise AssertionError("watch ended early")

    return await asyncio.wait_for(run(), timeout_s)


async def test_background_pulls_wait_while_a_foreground_transfer_runs_here(mesh, monkeypatch):
    """The destination serves a foreground transfer first: a prefetch pulling into it takes no
    chunk off its stream while a foreground transfer is being pulled here, and goes on to
    complete once the foregrounds end, here by failing and by being refused."""
    await slow_mesh(mesh, capacity_bytes_per_s=1_000_000)
    background = tokens(64 * BLOCK_SIZE + 1, seed=12)  # 768 KiB: ~0.8 s on this link
    foreground = tokens(2 * BLOCK_SIZE + 1, seed=13)
    key, _ = write_kv_folder(mesh.src_kv, background, seed=12)
    write_kv_folder(mesh.src_kv, foreground, seed=13)
    servicer = mesh.dst.servicer
    real_pull = servicer._pull
    pulling_foreground, source_lost = asyncio.Event(), asyncio.Event()

    async def pull(transfer, store):
        if transfer.traffic_class != kv_transfer_pb2.FOREGROUND_KV:
            return await real_pull(transfer, store)
        pulling_foreground.set()
        await source_lost.wait()
        raise RpcError(grpc.StatusCode.UNAVAILABLE, "source lost")

    monkeypatch.setattr(servicer, "_pull", pull)
    stub = mesh.stub(mesh.dst)
    bg = await stub.TransferPrefix(
        prefix_request(background, traffic_class=kv_transfer_pb2.PREFETCH_KV)
    )
    await wait_bytes(stub, bg.transfer_id, 32 * 1024)
    fg = await stub.TransferPrefix(prefix_request(foreground))
    await asyncio.wait_for(pulling_foreground.wait(), 10.0)
    if (in_flight := servicer._io.get(bg.transfer_id)) is not None:
        await in_flight  # a chunk already being written when the foreground came
    staged = servicer.transfers[bg.transfer_id].staged
    held_at = staged.verified_total_bytes
    await asyncio.sleep(0.3)  # the link (1 MB/s, free: the foreground pulls nothing) is idle
    assert staged.verified_total_bytes == held_at < bg.bytes_total
    # A foreground refused while being set up (the source lacks the prefix) holds nothing after.
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.TransferPrefix(prefix_request(tokens(2 * BLOCK_SIZE + 1, seed=14)))
    source_lost.set()
    assert (await watch_all(stub, fg.transfer_id))[-1].state == P.FAILED
    assert (await watch_all(stub, bg.transfer_id))[-1].state == P.COMPLETED
    assert tree_bytes(mesh.dst_kv / key) == tree_bytes(mesh.src_kv / key)


async def test_a_restarted_destination_resumes_from_its_journal(mesh):
    await slow_mesh(mesh)
    prompt = tokens(64 * BLOCK_SIZE + 1, seed=3)  # 3 layer files of 256 KiB
    key, _ = write_kv_folder(mesh.src_kv, prompt, seed=3)
    handle = await mesh.stub(mesh.dst).TransferPrefix(
        prefix_request(prompt, transfer_id="resume-me")
    )
    seen = await wait_bytes(mesh.stub(mesh.dst), handle.transfer_id, handle.bytes_total // 3)
    assert seen.state == P.RUNNING
    assert 0 < seen.rate_bytes_per_s
    assert seen.eta_s > 0
    await mesh.dst.stop(0)  # the destination dies half-way
    mesh.dst = None
    assert partial_ids(mesh.dst_kv) == ["resume-me"]
    assert not (mesh.dst_kv / key).exists()  # a partial object is never visible
    sent_at_restart = sample(
        "slomesh_kv_transfer_sent_bytes_total", region=SRC, peer=DST, traffic_class="FOREGROUND_KV"
    )
    await mesh.start_dst(chunk_bytes=16 * 1024)
    progress = await watch_all(mesh.stub(mesh.dst), "resume-me")
    final = progress[-1]
    assert final.state == P.COMPLETED, final.error
    assert final.resumed_bytes >= seen.bytes_done
    assert progress[0].bytes_done >= final.resumed_bytes
    sent_after = (
        sample(
            "slomesh_kv_transfer_sent_bytes_total",
            region=SRC,
            peer=DST,
            traffic_class="FOREGROUND_KV",
        )
        - sent_at_restart
    )
    # Verified chunks were not fetched again: the new destination asked for exactly the rest.
    assert sent_after == handle.bytes_total - final.resumed_bytes
    assert tree_bytes(mesh.dst_kv / key) == tree_bytes(mesh.src_kv / key)
    assert partial_ids(mesh.dst_kv) == []


async def test_cancel_stops_and_cleans_up(mesh):
    await slow_mesh(mesh, capacity_bytes_per_s=100_000)
    prompt = tokens(64 * BLOCK_SIZE + 1, seed=4)
    key, _ = write_kv_folder(mesh.src_kv, prompt, seed=4)
    stub = mesh.stub(mesh.dst)
    handle = await stub.TransferPrefix(prefix_request(prompt))
    await wait_bytes(stub, handle.transfer_id, 32 * 1024)
    assert partial_ids(mesh.dst_kv) == [handle.transfer_id]
    watcher = asyncio.create_task(watch_all(stub, handle.transfer_id))
    cancelled = await stub.Cancel(kv_transfer_pb2.CancelRequest(transfer_id=handle.transfer_id))
    assert cancelled.state == P.CANCELLED
    assert (await watcher)[-1].state == P.CANCELLED
    assert partial_ids(mesh.dst_kv) == []
    assert not (mesh.dst_kv / key).exists()
    again = await stub.Cancel(kv_transfer_pb2.CancelRequest(transfer_id=handle.transfer_id))
    assert again.state == P.CANCELLED
    # Through the source region's service, naming the region that runs it.
    via_src = await mesh.stub(mesh.src).Cancel(
        kv_transfer_pb2.CancelRequest(transfer_id=handle.transfer_id, region=DST)
    )
    assert via_src.state == P.CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Cancel(kv_transfer_pb2.CancelRequest(transfer_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_missed_deadline_fails_and_cleans_up(mesh):
    await slow_mesh(mesh, capacity_bytes_per_s=100_000)
    prompt = tokens(64 * BLOCK_SIZE + 1, seed=5)
    write_kv_folder(mesh.src_kv, prompt, seed=5)
    stub = mesh.stub(mesh.dst)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.TransferPrefix(prefix_request(prompt, deadline_unix_s=time.time() - 1))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    handle = await stub.TransferPrefix(prefix_request(prompt, deadline_unix_s=time.time() + 0.5))
    final = (await watch_all(stub, handle.transfer_id))[-1]
    assert final.state == P.FAILED
    assert final.error_code == "DEADLINE_EXCEEDED"
    assert partial_ids(mesh.dst_kv) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "other-model", "model"),
        ("block_size", 2 * BLOCK_SIZE, "block_size"),
        ("kv_dtype", "float16", "kv_dtype"),
        ("kind", "emulator", "kind"),
    ],
)
async def test_incompatible_stores_fail_precondition(mesh, field, value, message):
    await mesh.start_src()
    await mesh.start_dst(dst_store=kv_store_config("frankfurt-0", mesh.dst_kv, **{field: value}))
    prompt = tokens(4 * BLOCK_SIZE + 1, seed=6)
    write_kv_folder(mesh.src_kv, prompt, seed=6)
    request = prefix_request(prompt, model=value if field == "model" else MODEL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub(mesh.dst).TransferPrefix(request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert message in err.value.details()
    assert partial_ids(mesh.dst_kv) == []


async def test_bad_requests_are_refused_with_the_right_status(mesh):
    await mesh.start_src()
    await mesh.start_dst()
    stub = mesh.stub(mesh.dst)
    prompt = tokens(4 * BLOCK_SIZE + 1, seed=7)
    cases = [
        (prefix_request(prompt, model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (
            prefix_request(prompt, traffic_class=kv_transfer_pb2.PREWARM_WEIGHTS),
            grpc.StatusCode.INVALID_ARGUMENT,
            "traffic_class",
        ),
        (prefix_request(prompt[:5]), grpc.StatusCode.INVALID_ARGUMENT, "KV block"),
        (
            prefix_request(prompt, transfer_id="a/b"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "transfer_id",
        ),
        (
            prefix_request(prompt, destination_instance_id="x"),
            grpc.StatusCode.NOT_FOUND,
            "no KV store",
        ),
        (prefix_request(prompt), grpc.StatusCode.NOT_FOUND, "holds no prefix"),
        (prefix_request(prompt, source_region="mars"), grpc.StatusCode.NOT_FOUND, "mars"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.TransferPrefix(request)
        assert err.value.code() == code, request
        assert message in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Watch(kv_transfer_pb2.WatchRequest(transfer_id="nope")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # An idempotent retry returns the same transfer; another request under its id is refused.
    write_kv_folder(mesh.src_kv, prompt, seed=7)
    first = await stub.TransferPrefix(prefix_request(prompt, transfer_id="t-1"))
    assert (await stub.TransferPrefix(prefix_request(prompt, transfer_id="t-1"))) == first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.TransferPrefix(
            prefix_request(prompt, transfer_id="t-1", source_instance_id="tokyo-1")
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = await stub.GetInfo(kv_transfer_pb2.GetInfoRequest())
    assert (info.region, list(info.kv_stores), info.weight_cache) == (DST, ["frankfurt-0"], True)


async def test_prewarm_copies_weights_verified_by_sha256(mesh):
    await mesh.start_src()
    await mesh.start_dst()
    model = "org/tiny"
    src_dir = write_weight_model(mesh.src_weights, model, shard_bytes=(70_000, 50_000))
    stub = mesh.stub(mesh.dst)
    deadline = time.time() + 60
    handle = await stub.Prewarm(
        kv_transfer_pb2.PrewarmRequest(model=model, source_region=SRC, deadline_unix_s=deadline)
    )
    final = (await watch_all(stub, handle.transfer_id))[-1]
    assert final.state == P.COMPLETED, final.error
    assert final.traffic_class == kv_transfer_pb2.PREWARM_WEIGHTS
    dst_dir = mesh.dst_weights / model
    copied = tree_bytes(dst_dir)
    assert copied.pop(WEIGHT_MANIFEST_FILE)  # the cache's digest record
    assert copied == tree_bytes(src_dir)
    assert partial_ids(mesh.dst_weights) == []
    # The copy is now a source too, and prewarming it again moves nothing.
    again = await stub.Prewarm(kv_transfer_pb2.PrewarmRequest(model=model, source_region=SRC))
    assert again.already_present


async def test_prewarm_refuses_a_wrong_sha256_and_never_commits_a_bad_copy(mesh):
    await mesh.start_src()
    await mesh.start_dst(max_file_attempts=2)
    model = "org/tiny"
    src_dir = write_weight_model(mesh.src_weights, model, shard_bytes=(30_000,))
    stub = mesh.stub(mesh.dst)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Prewarm(
            kv_transfer_pb2.PrewarmRequest(
                model=model, source_region=SRC, expected_sha256={"config.json": "0" * 64}
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected_sha256" in err.value.details()
    # The source's cached sha256 goes stale: its bytes change, size and mtime do not. Every
    # chunk still passes its checksum; the whole-file sha256 at the destination does not.
    shard = next(src_dir.glob("*.safetensors"))
    await mesh.stub(mesh.src).DescribeObject(
        kv_transfer_pb2.DescribeObjectRequest(kind="weights", model=model, requester_region=DST)
    )
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    handle = await stub.Prewarm(kv_transfer_pb2.PrewarmRequest(model=model, source_region=SRC))
    final = (await watch_all(stub, handle.transfer_id))[-1]
    assert final.state == P.FAILED
    assert final.error_code == "DATA_LOSS"
    assert "sha256" in final.error
    assert not (mesh.dst_weights / model).exists()
    assert partial_ids(mesh.dst_weights) == []


async def test_watch_sends_the_terminal_state_without_waiting_its_interval(mesh):
    """A watcher asking for one message a minute still learns of the completion at once."""
    await slow_mesh(mesh)
    prompt = tokens(16 * BLOCK_SIZE + 1)
    write_kv_folder(mesh.src_kv, prompt)
    stub = mesh.stub(mesh.dst)
    handle = await stub.TransferPrefix(prefix_request(prompt))
    assert handle.bytes_total > 150_000  # about half a second at 300 kB/s

    async def watch():
        request = kv_transfer_pb2.WatchRequest(transfer_id=handle.transfer_id, min_interval_s=60)
        return [p async for p in stub.Watch(request)]

    seen = await asyncio.wait_for(watch(), 30.0)
    assert seen[0].state in (P.QUEUED, P.RUNNING)
    assert seen[-1].state == P.COMPLETED
