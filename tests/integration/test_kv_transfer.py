"""Two KV transfer services as two regions (real gRPC servers on free ports, temporary stores).

Region "tokyo" holds the source objects (a vLLM ExampleConnector folder of several layer files,
a weight-cache model); region "frankfurt" pulls them. Checked: a multi-file object arrives byte
for byte and appears only once complete; a chunk damaged in transit is detected, counted,
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

from services.kv_transfer.server import KVTransferServerHandle, TransferOptions, serve
from slomesh.telemetry import setup_telemetry
from slomesh.transfer import staging as staging_module
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
    # One trace: TransferPrefix -> forwarded TransferPrefix -> transfer -> FetchChunks.
    spans = exporter.get_finished_spans()
    transfer_span = next(s for s in spans if s.name == "kv_transfer.transfer")
    fetches = [s for s in spans if s.name == "kv_transfer.fetch_chunks"]
    assert len(fetches) == 3
    assert {s.context.trace_id for s in fetches} == {transfer_span.context.trace_id}
    assert transfer_span.attributes["slomesh.state"] == "COMPLETED"


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
    # Chunk 2 of each of the 3 layer files was damaged once, detected, then re-sent.
    assert len(faults.corrupted) == 3
    assert final.corrupt_chunks == 3
    assert final.retries == 3
    assert sample("slomesh_kv_transfer_corrupt_chunks_total", region=DST, peer=SRC) == (
        corrupt_before + 3
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
