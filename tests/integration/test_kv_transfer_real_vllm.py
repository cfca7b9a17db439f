"""KV transfer between two REAL vLLM instances on CPU, as two regions (../shared/REAL_VLLM.md).

Each vLLM runs vLLM's file-based KV connector (``ExampleConnector``) on a directory of its own.
A 512-token prompt served in region A makes A write its prefix KV (384 tokens: vLLM stores whole
blocks of 128, never the prompt's last token). The KV transfer service of region B then pulls
that folder from A's service over a slow link, while A's side damages one chunk of every file in
transit and B's service is stopped half-way and restarted. Checked: the damaged chunks are
detected and re-sent, the restarted destination resumes from its journal (the source sends
exactly the bytes not yet verified), the folder appears in B byte for byte, and the same prompt
on B is then served from it: vLLM's own ``vllm:prompt_tokens_by_source_total{source=
"external_kv_transfer"}`` grows by the 384 tokens, and vLLM's own TTFT of it on B is lower than
that of a fresh prompt of the same length on B (computed whole; the model is
`WIDE_MLP_LLAMA_CONFIG`, whose prefill is compute-bound, so the 384 tokens not computed show:
about 0.3x here). Both TTFTs are printed.

The second test runs the scheduler's live hot-prefix prefetch (`PrefetchRunner`: export on the
source through its region agent, move on the prefetch class, import on the destination) on the
same two vLLMs, each behind a real region agent.

Needs the vLLM environment of `scripts/setup_vllm_env.sh` (skipped, with the reason, when it is
not installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from services.global_scheduler.kv_moves import KvMover
from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.prefetch import PrefetchRunner
from services.global_scheduler.routes import Routes
from services.kv_transfer.server import TransferOptions, serve
from slomesh.kv.hashing import compute_block_keys
from slomesh.scheduler.prefetch import HotPrefixTracker, PrefetchOrder
from slomesh.scheduler.view import ClusterView
from slomesh.transfer.chunks import FaultInjector
from slomesh.transfer.staging import PARTIAL_DIR
from slomesh.transfer.stores import (
    KvStoreConfig,
    example_connector_folder_name,
    example_connector_stored_tokens,
)
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc, region_agent_pb2_grpc
from tests.vllm_server import (
    CPU_BLOCK_SIZE,
    SERVED_MODEL_NAME,
    WIDE_MLP_LLAMA_CONFIG,
    VllmServer,
    VllmUnavailable,
    find_vllm_python,
    metric_value,
    start_region_agent,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]

REGION_A, REGION_B = "washington-dc", "frankfurt"  # names of the default topology (agents)
PROMPT_TOKENS = 512
NUM_LAYERS = 2  # configs/vllm/tiny-llama-wide-mlp: num_hidden_layers
CHUNK_BYTES = 64 * 1024
LINK_BYTES_PER_S = 400_000.0


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(PROMPT_TOKENS)]


def _kv_transfer_config(path: Path) -> str:
    return json.dumps(
        {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(path)},
        }
    )


@pytest.fixture(scope="module")
def two_vllms(tmp_path_factory):
    """Two real vLLM servers, each with an ExampleConnector directory, started side by side."""
    try:
        python = find_vllm_python()
    except VllmUnavailable as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("kv")
    servers = {}
    for region in (REGION_A, REGION_B):
        path = root / region
        path.mkdir()
        servers[region] = (
            VllmServer(
                python,
                model_config=WIDE_MLP_LLAMA_CONFIG,
                extra_args=["--kv-transfer-config", _kv_transfer_config(path)],
            ),
            path,
        )
    errors: list[Exception] = []

    def start(server: VllmServer) -> None:
        try:
            server.start(timeout_s=420.0)
        except (RuntimeError, TimeoutError, OSError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s, _ in servers.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()


def _complete(server: VllmServer, prompt: list[int]) -> float:
    """Sends one completion; returns vLLM's own TTFT of it (the histogram's sum delta), s."""
    before = server.metrics()
    body = json.dumps(
        {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    ).encode()
    request = urllib.request.Request(
        f"{server.url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200
        json.loads(resp.read())
    after = server.metrics()
    name = "vllm:time_to_first_token_seconds_sum"
    return metric_value(after, name) - metric_value(before, name)


def _store(region: str, path: Path) -> KvStoreConfig:
    return KvStoreConfig(
        id=f"{region}-vllm-0",
        kind="vllm_example",
        path=path,
        model=SERVED_MODEL_NAME,
        block_size=CPU_BLOCK_SIZE,
        kv_dtype="bfloat16",
        num_layers=NUM_LAYERS,
    )


def _by_source(server: VllmServer, source: str) -> float:
    samples = server.metrics()["vllm:prompt_tokens_by_source_total"]
    return sum(v for labels, v in samples if labels.get("source") == source)


async def _watch(stub, transfer_id: str, until_bytes: int | None = None):
    async for p in stub.Watch(
        kv_transfer_pb2.WatchRequest(transfer_id=transfer_id, min_interval_s=0.02)
    ):
        if until_bytes is not None and p.bytes_done >= until_bytes:
            return p
        last = p
    return last


def _counter(name: str, region: str, peer: str) -> float:
    labels = {"region": region, "peer": peer, "traffic_class": "FOREGROUND_KV"}
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _sent_bytes() -> float:
    return _counter("slomesh_kv_transfer_sent_bytes_total", REGION_A, REGION_B)


async def test_prefix_moved_between_real_vllms_is_served_from_external_kv(two_vllms):
    server_a, dir_a = two_vllms[REGION_A]
    server_b, dir_b = two_vllms[REGION_B]
    prompt = _prompt(1)
    stored = example_connector_stored_tokens(PROMPT_TOKENS, CPU_BLOCK_SIZE)
    folder = example_connector_folder_name(prompt[:stored])

    # Region A serves the prompt: vLLM's connector writes the prefix's KV folder.
    _complete(server_a, prompt)
    assert (dir_a / folder).is_dir(), sorted(p.name for p in dir_a.iterdir())
    # Region B: a warm-up, then the baseline TTFT of a fresh prompt of the same length.
    _complete(server_b, _prompt(2))
    baseline_ttft_s = _complete(server_b, _prompt(3))
    external_before = _by_source(server_b, "external_kv_transfer")

    faults = FaultInjector.corrupting([1])
    src = await serve(
        REGION_A,
        {REGION_B: LINK_BYTES_PER_S},
        "127.0.0.1:0",
        kv_stores=[_store(REGION_A, dir_a)],
        options=TransferOptions(fault_injector=faults, link_burst_bytes=2 * CHUNK_BYTES),
    )
    dst_options = TransferOptions(chunk_bytes=CHUNK_BYTES, retry_backoff_s=0.01)

    async def start_dst():
        return await serve(
            REGION_B,
            {REGION_A: LINK_BYTES_PER_S},
            "127.0.0.1:0",
            peers={REGION_A: f"127.0.0.1:{src.port}"},
            kv_stores=[_store(REGION_B, dir_b)],
            options=dst_options,
        )

    dst = await start_dst()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{dst.port}") as channel:
            handle = await kv_transfer_pb2_grpc.KVTransferStub(channel).TransferPrefix(
                kv_transfer_pb2.TransferPrefixRequest(
                    transfer_id="real-vllm-prefix",
                    model=SERVED_MODEL_NAME,
                    source_region=REGION_A,
                    source_instance_id=f"{REGION_A}-vllm-0",
                    destination_instance_id=f"{REGION_B}-vllm-0",
                    token_ids=prompt,
                    traffic_class=kv_transfer_pb2.FOREGROUND_KV,
                )
            )
            assert (handle.object_key, handle.prefix_tokens) == (folder, stored)
            half = await asyncio.wait_for(
                _watch(
                    kv_transfer_pb2_grpc.KVTransferStub(channel),
                    handle.transfer_id,
                    handle.bytes_total // 2,
                ),
                60,
            )
            assert half.state == kv_transfer_pb2.TransferProgress.RUNNING
        await dst.stop(0)  # region B's service dies half-way
        assert not (dir_b / folder).exists()
        assert (dir_b / PARTIAL_DIR / "real-vllm-prefix").is_dir()
        sent_at_restart = _sent_bytes()
        received_at_restart = _counter(
            "slomesh_kv_transfer_received_bytes_total", REGION_B, REGION_A
        )
        dst = await start_dst()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{dst.port}") as channel:
            final = await asyncio.wait_for(
                _watch(kv_transfer_pb2_grpc.KVTransferStub(channel), handle.transfer_id), 60
            )
    finally:
        await dst.stop(0)
        await src.stop(0)
    assert final.state == kv_transfer_pb2.TransferProgress.COMPLETED, final.error
    assert final.resumed_bytes >= half.bytes_done
    # After the restart the destination verified exactly the bytes it did not have; the source
    # sent those, plus the chunk(s) damaged on the way and re-sent, plus at most the chunks it
    # had put in flight behind a damaged one before the destination re-requested.
    rest = handle.bytes_total - final.resumed_bytes
    assert _counter("slomesh_kv_transfer_received_bytes_total", REGION_B, REGION_A) == (
        received_at_restart + rest
    )
    sent_after = _sent_bytes() - sent_at_restart
    assert rest <= sent_after <= rest + final.corrupt_chunks * 3 * CHUNK_BYTES
    assert len(faults.corrupted) >= 1
    assert half.corrupt_chunks + final.corrupt_chunks >= 1
    for layer_file in (dir_a / folder).iterdir():
        assert (dir_b / folder / layer_file.name).read_bytes() == layer_file.read_bytes()

    # Region B serves the same prompt from the moved KV, by vLLM's own account.
    transferred_ttft_s = _complete(server_b, prompt)
    external = _by_source(server_b, "external_kv_transfer") - external_before
    assert external == stored
    assert "External Cache Hit!" in server_b.log_tail(200_000)
    assert transferred_ttft_s < baseline_ttft_s
    print(
        f"\nregion B TTFT (vLLM's histogram): fresh {PROMPT_TOKENS}-token prompt "
        f"{baseline_ttft_s * 1e3:.1f} ms, the moved prefix's prompt {transferred_ttft_s * 1e3:.1f} ms "
        f"(ratio {transferred_ttft_s / baseline_ttft_s:.2f}); moved {handle.bytes_total} bytes, "
        f"{time.strftime('%H:%M:%S')}"
    )


async def test_hot_prefix_prefetch_between_real_vllms(two_vllms, nats_server):
    """The live prefetch's three steps (`PrefetchRunner.prefetch`) on real vLLMs, each behind
    its region agent: region A holds a prefix ``P`` in its prefix cache only (it served a longer
    prompt starting with ``P``, so its connector stored a longer folder, not ``P``'s); the
    export (a one-token request for ``P + P[:2]`` on A) makes A's connector write ``P``'s
    folder from the cached blocks, the KV transfer services move it on the prefetch class, the
    import on B loads it (vLLM's ``external_kv_transfer`` grows by ``len(P)``) and B publishes
    the blocks as cached (its agent's index holds ``P``'s keys). A later prompt starting with
    ``P`` on B is then served from B's own prefix cache, nothing more from the connector."""
    server_a, dir_a = two_vllms[REGION_A]
    server_b, dir_b = two_vllms[REGION_B]
    prefix = _prompt(11)[: 3 * CPU_BLOCK_SIZE]
    suffix = _prompt(12)[:200]
    prefix_folder = example_connector_folder_name(prefix)

    async with contextlib.AsyncExitStack() as stack:
        agents = {
            region: await start_region_agent(
                stack, server, region, f"{region}-vllm-0", nats_server.url
            )
            for region, server in ((REGION_A, server_a), (REGION_B, server_b))
        }
        deadline = time.monotonic() + 30
        while not all(a.runtimes[f"{r}-vllm-0"].healthy for r, a in agents.items()):
            assert time.monotonic() < deadline, "the agents never saw their vLLM healthy"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # ZMQ: let the agents' KV event subscriptions join

        # A serves P + suffix: P is in its prefix cache; its store gets the longer folder only.
        await asyncio.to_thread(_complete, server_a, [*prefix, *suffix])
        assert not (dir_a / prefix_folder).exists()
        external_before = _by_source(server_b, "external_kv_transfer")

        src = await serve(
            REGION_A, {REGION_B: LINK_BYTES_PER_S * 10}, "127.0.0.1:0",
            kv_stores=[_store(REGION_A, dir_a)],
        )  # fmt: skip
        stack.push_async_callback(src.stop, 0)
        dst = await serve(
            REGION_B, {REGION_A: LINK_BYTES_PER_S * 10}, "127.0.0.1:0",
            peers={REGION_A: f"127.0.0.1:{src.port}"}, kv_stores=[_store(REGION_B, dir_b)],
        )  # fmt: skip
        stack.push_async_callback(dst.stop, 0)
        metrics = SchedulerMetrics(CollectorRegistry())
        mover = KvMover(Routes({REGION_B: {REGION_B: f"127.0.0.1:{dst.port}"}}), metrics)
        stack.push_async_callback(mover.close)
        channels: dict[str, grpc.aio.Channel] = {}

        def agent_stub(endpoint: str) -> region_agent_pb2_grpc.RegionAgentStub:
            if endpoint not in channels:
                channels[endpoint] = grpc.aio.insecure_channel(endpoint)
                stack.push_async_callback(channels[endpoint].close)
            return region_agent_pb2_grpc.RegionAgentStub(channels[endpoint])

        runner = PrefetchRunner(
            HotPrefixTracker(),
            ClusterView(None),
            mover,
            Routes({r: {r: f"127.0.0.1:{a.port}"} for r, a in agents.items()}),
            agent_stub,
            metrics,
        )
        order = PrefetchOrder(
            model=SERVED_MODEL_NAME,
            prefix_key=compute_block_keys(prefix, CPU_BLOCK_SIZE)[-1],
            token_ids=np.asarray(prefix, dtype=np.uint32),
            from_tokens=0,
            source_region=REGION_A,
            source_instance=f"{REGION_A}-vllm-0",
            dest_region=REGION_B,
            dest_instance=f"{REGION_B}-vllm-0",
            bytes=0,
        )
        assert await asyncio.wait_for(runner.prefetch(order), 120) == "completed"
        moved = metrics.registry.get_sample_value("slomesh_scheduler_kv_prefetch_bytes_total")

        # Export: A's connector wrote P's folder; move: B has it byte for byte.
        assert (dir_a / prefix_folder).is_dir(), sorted(p.name for p in dir_a.iterdir())
        files = sorted((dir_a / prefix_folder).iterdir())
        assert files and moved == sum(f.stat().st_size for f in files)
        for layer_file in files:
            assert (dir_b / prefix_folder / layer_file.name).read_bytes() == layer_file.read_bytes()
        # Import: B loaded P through its connector and now holds P's blocks in its prefix cache.
        assert _by_source(server_b, "external_kv_transfer") - external_before == len(prefix)
        keys = set(compute_block_keys(prefix, CPU_BLOCK_SIZE))
        index = agents[REGION_B].index
        deadline = time.monotonic() + 10
        while not keys <= index.keys(f"{REGION_B}-vllm-0"):
            assert time.monotonic() < deadline, "B's agent never indexed the imported blocks"
            await asyncio.sleep(0.05)

    # A later prompt with the prefix on B: P from B's prefix cache, not from the connector.
    cache_hit_before = _by_source(server_b, "local_cache_hit")
    external_before = _by_source(server_b, "external_kv_transfer")
    _complete(server_b, [*prefix, *_prompt(13)[:150]])
    assert _by_source(server_b, "local_cache_hit") - cache_hit_before >= len(prefix)
    assert _by_source(server_b, "external_kv_transfer") == external_before
