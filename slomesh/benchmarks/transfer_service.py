"""``slomesh bench-transfer --through-service``: issue 5's benchmark end to end through two real
KVTransfer services.

::

    slomesh bench-transfer --through-service [--capacity-bytes-per-s 2e8] [--bytes 1e9]
                           [--foreground-bytes 67108864] [--chunk-bytes 1048576]
                           [--foreground-at-s 1.0] [--foreground-gap-s 0.5] [--repeats 3]
                           [--rtt-ms 0] [--report-json PATH]

Two regions on loopback, each a ``python -m services.kv_transfer`` process of its own: the
source ("tokyo") holds the objects, its link to the destination ("frankfurt") capped at
``--capacity-bytes-per-s`` (``--link``: every chunk it sends waits for that link's
`LinkScheduler` grant); the destination runs every transfer (it pulls the chunks, checks each
chunk's xxh3_64 and each file's digest, stages, journals and commits). With ``--rtt-ms`` > 0 the
destination reaches the source through a `WanRelay` in this process (one-way delay RTT/2, the
same capacity). Stores, in a temporary directory removed afterwards:

- a weight cache holding one model of ``--bytes`` of safetensors shards (U8 tensors of random
  bytes, at most `WEIGHT_SHARD_BYTES` each) plus ``config.json`` (bfloat16) and the index; the
  source hashes it (sha256) once before anything is timed, as a region serving weights has;
- a vLLM ExampleConnector KV store holding one prefix folder of about ``--foreground-bytes``:
  the KV of a Llama-3-8B-shaped prefix (32 layer files, tensor ``kv_cache`` of shape
  ``[prefix tokens, 8, 256]`` bf16: 128 KiB per token), whole 16-token blocks.

What it measures (issue 5's closing note), each transfer timed from the call
(``TransferPrefix`` or ``Prewarm`` to the destination's service) to its COMPLETED state on
``Watch``:

1. warm-up: one foreground transfer opens the services' connection (not counted);
2. **foreground on an idle link**, ``--repeats`` times: ``TransferPrefix`` (FOREGROUND_KV) of
   the prefix, the destination's copy deleted after each so that each moves every byte;
3. **prewarm alone**: ``Prewarm`` (PREWARM_WEIGHTS) of the model; its bytes over its duration
   is the achieved throughput (target >= 0.9 of the cap); the copy is deleted after;
4. **prewarm with foregrounds inside it**: the same prewarm; ``--foreground-at-s`` after it
   started, the foreground transfer of 2, ``--repeats`` times, ``--foreground-gap-s`` apart,
   while the prewarm lasts. The foreground's median completion time as a ratio to its median
   on the idle link (target <= 1.10), and the link's throughput (prewarm plus foreground bytes
   over the prewarm's duration) as a ratio to the cap.

Every transfer's bytes are checked: the destination's handle (``bytes_total``) equals the
source files' sizes, and the source's ``slomesh_kv_transfer_sent_bytes_total`` (scraped from its
Prometheus endpoint) grew by exactly the bytes of the transfers of each class. Timings are
wall-clock on a shared machine: the report carries the load average.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from slomesh.benchmarks.transfer import TransferTiming
from slomesh.procs import free_ports
from slomesh.transfer.stores import (
    KvStoreConfig,
    WeightCacheConfig,
    example_connector_folder_name,
    write_safetensors_file,
)
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

__all__ = ["WEIGHT_SHARD_BYTES", "run_service_transfer_benchmark"]

SRC, DST = "tokyo", "frankfurt"
SRC_STORE, DST_STORE = "tokyo-kv", "frankfurt-kv"
MODEL = "bench/llama-shaped"
KV_MODEL = "bench-llama-shaped"
WEIGHT_SHARD_BYTES = 256 * 1024 * 1024
"""Largest safetensors shard of the benchmark's model, bytes."""
KV_LAYERS = 32
KV_ROW_SHAPE = (8, 256)
"""Per token and layer: 8 KV heads x (K and V of head dim 128), as Llama-3-8B."""
KV_BLOCK_TOKENS = 16
KV_BYTES_PER_TOKEN = KV_LAYERS * KV_ROW_SHAPE[0] * KV_ROW_SHAPE[1] * 2  # bf16: 128 KiB
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_FOREGROUND_RATIO = 1.10
_P = kv_transfer_pb2.TransferProgress
_TERMINAL = {_P.COMPLETED, _P.FAILED, _P.CANCELLED}
_READY_TIMEOUT_S = 60.0


def write_weight_model(root: Path, model: str, nbytes: int, seed: int = 0) -> Path:
    """Writes a weight-cache model of `nbytes` of shard data under ``root/model``.

    Shards of at most `WEIGHT_SHARD_BYTES` (one U8 tensor of random bytes each), a
    ``config.json`` (``torch_dtype`` bfloat16) and ``model.safetensors.index.json``.

    Returns:
        The model's directory.
    """
    model_dir = root / model
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"})
    )
    count = -(-nbytes // WEIGHT_SHARD_BYTES)
    sizes = [nbytes // count + (i < nbytes % count) for i in range(count)]
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, size in enumerate(sizes):
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        tensor = f"model.layers.{i}.mlp.weight"
        write_safetensors_file(model_dir / name, tensor, "U8", [size], rng.bytes(size))
        weight_map[tensor] = name
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map})
    )
    return model_dir


def write_kv_prefix(root: Path, nbytes: int, seed: int = 1) -> tuple[list[int], Path]:
    """Writes the ExampleConnector folder of a prefix of about `nbytes` of KV under `root`.

    Returns:
        (a prompt whose stored prefix is the folder's, the folder).

    Raises:
        ValueError: `nbytes` is less than one 16-token block (2 MiB).
    """
    prefix_tokens = nbytes // KV_BYTES_PER_TOKEN // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
    if prefix_tokens < KV_BLOCK_TOKENS:
        raise ValueError(
            f"--foreground-bytes must be >= one 16-token KV block "
            f"({KV_BLOCK_TOKENS * KV_BYTES_PER_TOKEN} bytes), got {nbytes}"
        )
    rng = np.random.default_rng(seed)
    # vLLM stores align(len(prompt)) = (len - 1) // block * block tokens: one more token.
    prompt = [int(t) for t in rng.integers(3, 32000, size=prefix_tokens + 1)]
    folder = root / example_connector_folder_name(prompt[:prefix_tokens])
    folder.mkdir(parents=True)
    shape = [prefix_tokens, *KV_ROW_SHAPE]
    layer_bytes = prefix_tokens * KV_BYTES_PER_TOKEN // KV_LAYERS
    for layer in range(KV_LAYERS):
        write_safetensors_file(
            folder / f"model.layers.{layer}.self_attn.attn.safetensors",
            "kv_cache",
            "BF16",
            shape,
            rng.bytes(layer_bytes),
        )
    return prompt, folder


def _file_sizes(directory: Path) -> dict[str, int]:
    """{name: bytes} of an object's files (not the store's hidden bookkeeping)."""
    return {
        p.name: p.stat().st_size
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def _sent_bytes(metrics_url: str) -> dict[str, float]:
    """The source's ``slomesh_kv_transfer_sent_bytes_total`` to DST by traffic class."""
    with urllib.request.urlopen(metrics_url, timeout=5.0) as resp:
        text = resp.read().decode()
    sent: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "slomesh_kv_transfer_sent_bytes":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("peer") == DST:
                sent[sample.labels["traffic_class"]] = sample.value
    return sent


class _Service:
    """One ``python -m services.kv_transfer`` process and a channel to it."""

    def __init__(self, region: str, port: int, args: list[str], log_path: Path):
        self.region = region
        self.address = f"127.0.0.1:{port}"
        self.args = ["--region", region, "--port", str(port), "--log-level", "WARNING", *args]
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> kv_transfer_pb2_grpc.KVTransferStub:
        """Starts the process and waits for its GetInfo to answer.

        Raises:
            RuntimeError: it exited or did not answer within 60 s (the message has its log).
        """
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.kv_transfer",
                *self.args,
                stdout=log,
                stderr=log,
                cwd=Path(__file__).resolve().parents[2],
            )
        self.channel = grpc.aio.insecure_channel(self.address)
        stub = kv_transfer_pb2_grpc.KVTransferStub(self.channel)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.region} service exited: {self.log_tail()}")
            try:
                await stub.GetInfo(kv_transfer_pb2.GetInfoRequest(), timeout=1.0)
                return stub
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.region} service not ready after {_READY_TIMEOUT_S} s: "
                        f"{self.log_tail()}"
                    ) from None
                await asyncio.sleep(0.1)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _watch_until_done(stub: kv_transfer_pb2_grpc.KVTransferStub, transfer_id: str) -> float:
    """Follows a transfer on Watch (progress every 0.1 s, the terminal state at once); returns
    the loop time its COMPLETED state arrived.

    Raises:
        RuntimeError: it ended FAILED or CANCELLED.
    """
    loop = asyncio.get_running_loop()
    request = kv_transfer_pb2.WatchRequest(transfer_id=transfer_id, min_interval_s=0.1)
    async for progress in stub.Watch(request):
        if progress.state in _TERMINAL:
            end = loop.time()
            if progress.state != _P.COMPLETED:
                raise RuntimeError(
                    f"transfer {transfer_id} {_P.State.Name(progress.state)}: "
                    f"{progress.error_code} {progress.error}"
                )
            return end
    raise RuntimeError(f"Watch of {transfer_id} ended before a terminal state")


async def run_service_transfer_benchmark(
    *,
    capacity_bytes_per_s: float = 200e6,
    prewarm_bytes: int = 1_000_000_000,
    chunk_bytes: int = 1024 * 1024,
    foreground_bytes: int = 64 * 1024 * 1024,
    foreground_at_s: float = 1.0,
    foreground_gap_s: float = 0.5,
    repeats: int = 3,
    rtt_ms: float = 0.0,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Runs the benchmark of the module docstring in the running event loop.

    Args:
        capacity_bytes_per_s: the source's link capacity to the destination, bytes/s.
        prewarm_bytes: shard bytes of the model (the files moved are a few hundred bytes more:
            safetensors headers, config, index).
        chunk_bytes: the destination's chunk size (``--chunk-bytes`` of its service).
        foreground_bytes: KV bytes of the prefix (rounded down to whole 16-token blocks).
        foreground_at_s, foreground_gap_s, repeats: as in the module docstring.
        rtt_ms: > 0: the destination reaches the source through a `WanRelay` of this RTT.
        work_dir: parent of the temporary stores (default: the system's temporary directory).

    Returns:
        ``{"config", "prewarm", "prewarm_with_foreground", "link_during_prewarm",
        "foreground", "source_sent_bytes", "load_average", "targets", "within_targets"}``;
        bytes, seconds, bytes/s.

    Raises:
        ValueError: an argument out of range (the message names it), or a prewarm over before
            the first foreground transfer started.
        RuntimeError: a service did not start, a transfer failed or moved other bytes than
            asked.
    """
    from slomesh.transfer.chunks import check_chunk_bytes
    from slomesh.wan_relay import WanRelay

    if not capacity_bytes_per_s > 0:
        raise ValueError("--capacity-bytes-per-s must be > 0")
    if prewarm_bytes < 1:
        raise ValueError("--bytes must be >= 1")
    check_chunk_bytes(chunk_bytes)  # ValueError naming the range
    if foreground_at_s < 0 or foreground_gap_s < 0:
        raise ValueError("--foreground-at-s and --foreground-gap-s must be >= 0")
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if rtt_ms < 0:
        raise ValueError("--rtt-ms must be >= 0")
    loop = asyncio.get_running_loop()
    root = Path(tempfile.mkdtemp(prefix="slomesh-bench-transfer-", dir=work_dir))
    relay: WanRelay | None = None
    services: list[_Service] = []
    try:
        dirs = {
            name: root / name for name in ("src-weights", "dst-weights", "src-kv", "dst-kv")
        }
        for d in dirs.values():
            d.mkdir()
        prompt, src_folder = await asyncio.to_thread(
            write_kv_prefix, dirs["src-kv"], foreground_bytes
        )
        src_model = await asyncio.to_thread(
            write_weight_model, dirs["src-weights"], MODEL, prewarm_bytes
        )
        fg_total = sum(_file_sizes(src_folder).values())
        prewarm_total = sum(_file_sizes(src_model).values())

        def kv_store(store_id: str, path: Path) -> str:
            return KvStoreConfig(
                id=store_id,
                path=path,
                model=KV_MODEL,
                block_size=KV_BLOCK_TOKENS,
                kv_dtype="bfloat16",
                num_layers=KV_LAYERS,
            ).model_dump_json()

        src_port, dst_port, metrics_port = free_ports(3)
        src_address = f"127.0.0.1:{src_port}"
        if rtt_ms > 0:
            relay = await WanRelay(
                "127.0.0.1", 0, src_address, rtt_ms / 2.0, capacity_bytes_per_s, name="bench"
            ).start()
            src_address = relay.address
        src = _Service(
            SRC,
            src_port,
            [
                f"--link={DST}={capacity_bytes_per_s!r}",
                f"--peer={DST}=127.0.0.1:{dst_port}",
                f"--kv-store={kv_store(SRC_STORE, dirs['src-kv'])}",
                f"--weight-cache={WeightCacheConfig(path=dirs['src-weights']).model_dump_json()}",
                f"--metrics-port={metrics_port}",
            ],
            root / "tokyo.log",
        )
        dst = _Service(
            DST,
            dst_port,
            [
                f"--link={SRC}={capacity_bytes_per_s!r}",
                f"--peer={SRC}={src_address}",
                f"--kv-store={kv_store(DST_STORE, dirs['dst-kv'])}",
                "--weight-cache="
                + WeightCacheConfig(path=dirs["dst-weights"], dtype="bfloat16").model_dump_json(),
                f"--chunk-bytes={chunk_bytes}",
            ],
            root / "frankfurt.log",
        )
        services = [src, dst]
        src_stub, dst_stub = await asyncio.gather(src.start(), dst.start())
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        # The source hashes the model once (sha256, cached), as a region serving weights has.
        await src_stub.DescribeObject(
            kv_transfer_pb2.DescribeObjectRequest(kind="weights", model=MODEL, requester_region=DST)
        )
        ids = itertools.count()

        async def foreground() -> TransferTiming:
            start = loop.time()
            transfer_id = f"fg-{next(ids)}"
            handle = await dst_stub.TransferPrefix(
                kv_transfer_pb2.TransferPrefixRequest(
                    transfer_id=transfer_id,
                    model=KV_MODEL,
                    source_region=SRC,
                    source_instance_id=SRC_STORE,
                    destination_region=DST,
                    destination_instance_id=DST_STORE,
                    token_ids=prompt,
                    traffic_class=kv_transfer_pb2.FOREGROUND_KV,
                )
            )
            end = await _watch_until_done(dst_stub, transfer_id)
            _check_moved(handle, fg_total)
            await asyncio.to_thread(shutil.rmtree, dirs["dst-kv"] / handle.object_key)
            return TransferTiming(handle.bytes_total, start, end)

        async def prewarm() -> TransferTiming:
            start = loop.time()
            transfer_id = f"prewarm-{next(ids)}"
            handle = await dst_stub.Prewarm(
                kv_transfer_pb2.PrewarmRequest(
                    transfer_id=transfer_id, model=MODEL, source_region=SRC
                )
            )
            end = await _watch_until_done(dst_stub, transfer_id)
            _check_moved(handle, prewarm_total)
            return TransferTiming(handle.bytes_total, start, end)

        async def drop_prewarmed() -> None:
            dst_model = dirs["dst-weights"] / MODEL
            if _file_sizes(dst_model) != _file_sizes(src_model):
                raise RuntimeError("the prewarmed model's files differ from the source's")
            await asyncio.to_thread(shutil.rmtree, dst_model)

        sent_before = await asyncio.to_thread(_sent_bytes, metrics_url)
        await foreground()  # warm-up: connections, digest caches
        idle_fg: list[TransferTiming] = []
        for _ in range(repeats):
            await asyncio.sleep(0.1)  # the link's token bucket refills
            idle_fg.append(await foreground())
        await asyncio.sleep(0.1)
        alone = await prewarm()
        await drop_prewarmed()
        await asyncio.sleep(0.1)

        prewarm_task = loop.create_task(prewarm())
        prewarm_started = loop.time()
        busy_fg: list[TransferTiming] = []
        prewarm_sent_meanwhile = 0.0
        await asyncio.sleep(foreground_at_s)
        while len(busy_fg) < repeats and not prewarm_task.done():
            if busy_fg:
                await asyncio.sleep(foreground_gap_s)
                if prewarm_task.done():
                    break
            before = await asyncio.to_thread(_sent_bytes, metrics_url)
            busy_fg.append(await foreground())
            after = await asyncio.to_thread(_sent_bytes, metrics_url)
            prewarm_sent_meanwhile += after["PREWARM_WEIGHTS"] - before["PREWARM_WEIGHTS"]
        shared = await prewarm_task
        await drop_prewarmed()
        if not busy_fg:
            raise ValueError(
                "--foreground-at-s: the prewarm was over before the foreground started; "
                "start it earlier or send more --bytes"
            )
        sent_after = await asyncio.to_thread(_sent_bytes, metrics_url)
    finally:
        for service in services:
            await service.stop()
        if relay is not None:
            await relay.stop()
        await asyncio.to_thread(shutil.rmtree, root, True)

    sent = {
        cls: sent_after.get(cls, 0.0) - sent_before.get(cls, 0.0)
        for cls in ("FOREGROUND_KV", "PREWARM_WEIGHTS")
    }
    expected_sent = {
        "FOREGROUND_KV": fg_total * (1 + len(idle_fg) + len(busy_fg)),
        "PREWARM_WEIGHTS": prewarm_total * 2,
    }
    if sent != expected_sent:
        raise RuntimeError(f"the source sent {sent} bytes, the transfers asked {expected_sent}")
    fg_during = sum(t.nbytes for t in busy_fg)
    link_bytes = shared.nbytes + fg_during
    alone_ratio = alone.nbytes / alone.duration_s / capacity_bytes_per_s
    link_ratio = link_bytes / shared.duration_s / capacity_bytes_per_s
    idle_s = statistics.median(t.duration_s for t in idle_fg)
    busy_s = statistics.median(t.duration_s for t in busy_fg)
    fg_ratio = busy_s / idle_s
    return {
        "config": {
            "capacity_bytes_per_s": capacity_bytes_per_s,
            "prewarm_bytes": prewarm_bytes,
            "chunk_bytes": chunk_bytes,
            "foreground_bytes": foreground_bytes,
            "foreground_at_s": foreground_at_s,
            "foreground_gap_s": foreground_gap_s,
            "repeats": repeats,
            "rtt_ms": rtt_ms,
            "transport": "two KVTransfer service processes over loopback gRPC"
            + (" through a WanRelay" if rtt_ms > 0 else ""),
        },
        "prewarm": {
            "bytes": alone.nbytes,
            "duration_s": alone.duration_s,
            "throughput_bytes_per_s": alone.nbytes / alone.duration_s,
            "throughput_ratio": alone_ratio,
        },
        "prewarm_with_foreground": {
            "bytes": shared.nbytes,
            "duration_s": shared.duration_s,
            "throughput_bytes_per_s": shared.nbytes / shared.duration_s,
            "throughput_ratio": shared.nbytes / shared.duration_s / capacity_bytes_per_s,
        },
        "link_during_prewarm": {
            "bytes": link_bytes,
            "throughput_bytes_per_s": link_bytes / shared.duration_s,
            "throughput_ratio": link_ratio,
        },
        "foreground": {
            "bytes": fg_total,
            "idle_link_s": [t.duration_s for t in idle_fg],
            "during_prewarm_s": [t.duration_s for t in busy_fg],
            "started_after_prewarm_s": [t.start_s - prewarm_started for t in busy_fg],
            "idle_link_median_s": idle_s,
            "during_prewarm_median_s": busy_s,
            "ratio_vs_idle": fg_ratio,
            # Prewarm bytes the source sent while a foreground transfer ran.
            "background_bytes_sent_meanwhile": prewarm_sent_meanwhile,
        },
        "source_sent_bytes": sent,
        "load_average": list(os.getloadavg()),
        "targets": {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "foreground_ratio_max": TARGET_FOREGROUND_RATIO,
        },
        "within_targets": {
            "throughput": alone_ratio >= TARGET_THROUGHPUT_RATIO,
            "foreground": fg_ratio <= TARGET_FOREGROUND_RATIO,
        },
    }


def _check_moved(handle: kv_transfer_pb2.TransferHandle, expected_bytes: int) -> None:
    """Raises RuntimeError unless the transfer moved the object's `expected_bytes`."""
    if handle.already_present or handle.bytes_total != expected_bytes:
        raise RuntimeError(
            f"transfer {handle.transfer_id} moves {handle.bytes_total} bytes "
            f"(already present: {handle.already_present}), the object has {expected_bytes}"
        )
