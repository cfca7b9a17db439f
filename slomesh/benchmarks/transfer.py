"""``slomesh bench-transfer``: a WAN link's bandwidth scheduler on a real loopback transport.

::

    slomesh bench-transfer [--capacity-bytes-per-s 2e8] [--bytes 1e9] [--chunk-bytes 1048576]
                           [--foreground-bytes 67108864] [--foreground-at-s 1.0]
                           [--foreground-gap-s 0.5] [--repeats 3] [--burst-bytes 2097152]
                           [--rtt-ms 0] [--through-service] [--report-json PATH]

``--through-service`` runs the same measurement end to end through two real KVTransfer
service processes (``Prewarm`` of a weight-cache model, ``TransferPrefix`` of a vLLM
ExampleConnector KV folder): `slomesh.benchmarks.transfer_service`. Without it, as follows.

Two endpoints in this process: the receiving region's, a gRPC server on 127.0.0.1 whose
client-streaming method ``/slomesh.bench.v1.TransferSink/Push`` takes raw byte chunks and
answers the byte count, and the sending region's, a gRPC channel to it whose chunks each wait
for a grant of one `LinkScheduler` (the link's capacity ``--capacity-bytes-per-s``) before
they are written. A transfer is one ``Push`` stream of ``--chunk-bytes`` chunks; it is done
when the receiver has counted every byte and answered. With ``--rtt-ms`` > 0 the channel goes
through a `WanRelay` (one-way delay RTT/2, the same capacity as the link), as in the local
mesh's emulated WAN; one gRPC stream is then also bounded by its HTTP/2 flow-control window
over the RTT and by the relay's own CPU, so the figures measure the transport as much as the
scheduler (the targets below are for loopback, ``--rtt-ms 0``).

What it measures (issue 5's closing note):

1. warm-up: one 32 MiB transfer opens the connection and widens its HTTP/2 window (not
   counted);
2. **foreground on an idle link**, ``--repeats`` times: a ``--foreground-bytes``
   `TrafficClass.FOREGROUND_KV` transfer, the bucket full as on any idle link -- the baseline;
3. **prewarm with foregrounds inside it**: a ``--bytes`` `TrafficClass.PREWARM_WEIGHTS`
   transfer; ``--foreground-at-s`` after it started, the same foreground transfer as in 2,
   again ``--repeats`` times, ``--foreground-gap-s`` apart, while the prewarm lasts.

It reports the throughput the link achieved while the prewarm ran (every byte it carried,
foreground included) and the prewarm's own (its bytes over its duration less the time the
foregrounds' bytes take at the capacity), each as a ratio to the capacity (target >= 0.9),
and the foreground's median completion time during the prewarm as a ratio to its median on
the idle link (target <= 1.10), with the prewarm bytes granted while a foreground ran and the
link statistics (`LinkScheduler.stats`, what `slomesh.transfer.link_stats` publishes) just
before the first and just after the last foreground. Every sender keeps one granted chunk ready while the next
waits for its grant, so the time a write takes does not slow the link's pacing. Timings are
wall-clock on a shared machine: report them with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from slomesh.transfer.bandwidth import (
    DEFAULT_BURST_BYTES,
    LinkScheduler,
    LinkStats,
    TrafficClass,
)

__all__ = ["main", "run_transfer_benchmark"]

SINK_SERVICE = "slomesh.bench.v1.TransferSink"
PUSH_METHOD = f"/{SINK_SERVICE}/Push"
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_FOREGROUND_RATIO = 1.10
WARMUP_BYTES = 32 * 1024 * 1024
"""Opens the connection and lets HTTP/2 flow control (BDP probing) widen its window."""


@dataclass(frozen=True)
class TransferTiming:
    """One transfer: bytes the receiver counted, when it started and ended (loop seconds)."""

    nbytes: int
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def _sink_handler() -> grpc.GenericRpcHandler:
    """The receiving endpoint: counts the bytes of a Push stream, answers the count (8 bytes)."""

    async def push(request_iterator, context) -> bytes:
        total = 0
        async for chunk in request_iterator:
            total += len(chunk)
        return total.to_bytes(8, "little")

    return grpc.method_handlers_generic_handler(
        SINK_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)}
    )


async def _transfer(
    push: grpc.aio.StreamUnaryMultiCallable,
    link: LinkScheduler,
    nbytes: int,
    chunk_bytes: int,
    traffic_class: TrafficClass,
    payload: bytes,
) -> TransferTiming:
    """Sends `nbytes` in granted chunks over one Push stream; returns its timing.

    Grants and writes are pipelined one chunk deep (a writer task sends granted chunks while
    the next one waits for its grant), so that the time a write takes does not add to the
    link's pacing, as in a transfer service that keeps one chunk ready per stream.

    Raises:
        RuntimeError: the receiver counted a different number of bytes.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    call = push()
    granted: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)

    async def writer() -> None:
        while (chunk := await granted.get()) is not None:
            await call.write(chunk)
        await call.done_writing()

    write_task = loop.create_task(writer())
    flow = link.open_flow(traffic_class)  # the stream's life, as a service's FetchChunks
    try:
        sent = 0
        while sent < nbytes:
            n = min(chunk_bytes, nbytes - sent)
            await link.send(n, traffic_class)
            await granted.put(payload if n == len(payload) else payload[:n])
            sent += n
        await granted.put(None)
        await write_task
    finally:
        flow.close()
        write_task.cancel()
    received = int.from_bytes(await call, "little")
    end = loop.time()
    if received != nbytes:
        raise RuntimeError(f"receiver counted {received} bytes of {nbytes}")
    return TransferTiming(nbytes, start, end)


def _stats_json(stats: LinkStats) -> dict[str, float]:
    rates = stats.class_throughput_bytes_per_s
    return {
        "throughput_bytes_per_s": stats.throughput_bytes_per_s,
        "foreground_bytes_per_s": stats.foreground_bytes_per_s,
        "prewarm_bytes_per_s": rates[TrafficClass.PREWARM_WEIGHTS],
        "spare_bytes_per_s": stats.spare_bytes_per_s,
        "queued_bytes": stats.total_queued_bytes,
    }


async def run_transfer_benchmark(
    *,
    capacity_bytes_per_s: float = 200e6,
    prewarm_bytes: int = 1_000_000_000,
    chunk_bytes: int = 1024 * 1024,
    foreground_bytes: int = 64 * 1024 * 1024,
    foreground_at_s: float = 1.0,
    foreground_gap_s: float = 0.5,
    repeats: int = 3,
    burst_bytes: int = DEFAULT_BURST_BYTES,
    rtt_ms: float = 0.0,
) -> dict[str, Any]:
    """Runs the benchmark of the module docstring in the running event loop.

    The foreground transfer runs `repeats` times on the idle link, then `repeats` times during
    the prewarm (the first `foreground_at_s` after the prewarm started, each next one
    `foreground_gap_s` after the previous one ended, while the prewarm lasts); the ratio is
    of the medians, so that one stall of a shared machine does not decide it.

    Returns:
        ``{"config": {...}, "prewarm": {...}, "link_during_prewarm": {...}, "foreground":
        {...}, "link_stats": {"before_foreground", "after_foreground"}, "targets": {...},
        "within_targets": {...}}``; throughputs in bytes/s, times in seconds.

    Raises:
        ValueError: an argument out of range (the message names it), or a prewarm over before
            the first foreground transfer started.
        RuntimeError: a transfer lost bytes.
    """
    from slomesh.wan_relay import WanRelay

    if chunk_bytes < 1 or prewarm_bytes < chunk_bytes:
        raise ValueError("--chunk-bytes must be >= 1 and <= --bytes")
    if foreground_bytes < chunk_bytes:
        raise ValueError("--foreground-bytes must be >= --chunk-bytes")
    if foreground_at_s < 0 or foreground_gap_s < 0:
        raise ValueError("--foreground-at-s and --foreground-gap-s must be >= 0")
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if rtt_ms < 0:
        raise ValueError("--rtt-ms must be >= 0")
    link = LinkScheduler(capacity_bytes_per_s, burst_bytes=burst_bytes)  # validates the rest
    loop = asyncio.get_running_loop()
    max_message = chunk_bytes + 64 * 1024
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message)])
    server.add_generic_rpc_handlers((_sink_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    relay: WanRelay | None = None
    idle_fg: list[TransferTiming] = []
    busy_fg: list[TransferTiming] = []
    background_during_fg = 0
    try:
        address = f"127.0.0.1:{port}"
        if rtt_ms > 0:
            relay = await WanRelay(
                "127.0.0.1", 0, address, rtt_ms / 2.0, capacity_bytes_per_s, name="bench"
            ).start()
            address = relay.address
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", max_message)]
        ) as channel:
            push = channel.stream_unary(PUSH_METHOD)
            payload = b"\xa5" * chunk_bytes
            idle_wait_s = burst_bytes / capacity_bytes_per_s + 0.05  # the bucket refills

            async def foreground() -> TransferTiming:
                return await _transfer(
                    push, link, foreground_bytes, chunk_bytes, TrafficClass.FOREGROUND_KV, payload
                )

            warmup = min(WARMUP_BYTES, prewarm_bytes)
            await _transfer(push, link, warmup, chunk_bytes, TrafficClass.PREFETCH_KV, payload)
            for _ in range(repeats):
                await asyncio.sleep(idle_wait_s)
                idle_fg.append(await foreground())
            await asyncio.sleep(idle_wait_s)

            prewarm_task = loop.create_task(
                _transfer(
                    push, link, prewarm_bytes, chunk_bytes, TrafficClass.PREWARM_WEIGHTS, payload
                )
            )
            prewarm_started = loop.time()
            await asyncio.sleep(foreground_at_s)
            stats_before = link.stats()
            while len(busy_fg) < repeats and not prewarm_task.done():
                if busy_fg:
                    await asyncio.sleep(foreground_gap_s)
                    if prewarm_task.done():
                        break
                before = link.stats().granted_bytes_total[TrafficClass.PREWARM_WEIGHTS]
                busy_fg.append(await foreground())
                after = link.stats().granted_bytes_total[TrafficClass.PREWARM_WEIGHTS]
                background_during_fg += after - before
            stats_after = link.stats()
            prewarm = await prewarm_task
            if not busy_fg:
                raise ValueError(
                    "--foreground-at-s: the prewarm was over before the foreground started; "
                    "start it earlier or send more --bytes"
                )
    finally:
        if relay is not None:
            await relay.stop()
        await server.stop(None)

    fg_bytes_during = sum(t.nbytes for t in busy_fg)
    # The prewarm's own time on the link: its duration less the foregrounds' share of it.
    prewarm_alone_s = prewarm.duration_s - fg_bytes_during / capacity_bytes_per_s
    link_bytes = prewarm.nbytes + fg_bytes_during
    throughput_ratio = link_bytes / prewarm.duration_s / capacity_bytes_per_s
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
            "burst_bytes": burst_bytes,
            "rtt_ms": rtt_ms,
            "transport": "gRPC client stream over loopback TCP"
            + (" through a WanRelay" if rtt_ms > 0 else ""),
        },
        "prewarm": {
            "bytes": prewarm.nbytes,
            "duration_s": prewarm.duration_s,
            "throughput_bytes_per_s": prewarm.nbytes / prewarm_alone_s,
            "throughput_ratio": prewarm.nbytes / prewarm_alone_s / capacity_bytes_per_s,
        },
        "link_during_prewarm": {
            "bytes": link_bytes,
            "throughput_bytes_per_s": link_bytes / prewarm.duration_s,
            "throughput_ratio": throughput_ratio,
        },
        "foreground": {
            "bytes": foreground_bytes,
            "idle_link_s": [t.duration_s for t in idle_fg],
            "during_prewarm_s": [t.duration_s for t in busy_fg],
            "started_after_prewarm_s": [t.start_s - prewarm_started for t in busy_fg],
            "idle_link_median_s": idle_s,
            "during_prewarm_median_s": busy_s,
            "ratio_vs_idle": fg_ratio,
            # Prewarm bytes taken while a foreground transfer ran (its sender stalled).
            "background_bytes_granted_meanwhile": background_during_fg,
        },
        "link_stats": {
            "before_foreground": _stats_json(stats_before),
            "after_foreground": _stats_json(stats_after),
        },
        "targets": {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "foreground_ratio_max": TARGET_FOREGROUND_RATIO,
        },
        "within_targets": {
            "throughput": throughput_ratio >= TARGET_THROUGHPUT_RATIO,
            "foreground": fg_ratio <= TARGET_FOREGROUND_RATIO,
        },
    }


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    cap = cfg["capacity_bytes_per_s"]
    table = Table(
        title=(
            f"WAN link at {cap / 1e6:g} MB/s, {cfg['prewarm_bytes'] / 1e9:g} GB prewarm, "
            f"{cfg['foreground_bytes'] / 2**20:g} MiB foreground, "
            f"{cfg['chunk_bytes'] / 2**20:g} MiB chunks ({cfg['transport']})"
        )
    )
    for col in ("measure", "value", "ratio", "target"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    link = result["link_during_prewarm"]
    prewarm = result["prewarm"]
    fg = result["foreground"]
    service = "prewarm_with_foreground" in result  # --through-service: the prewarm alone
    table.add_row(
        "link throughput during the prewarm",
        f"{link['throughput_bytes_per_s'] / 1e6:.1f} MB/s",
        f"{link['throughput_ratio']:.3f} of cap",
        "" if service else ">= 0.90",
    )
    table.add_row(
        "prewarm throughput alone" if service else "prewarm throughput on what the foreground left",
        f"{prewarm['throughput_bytes_per_s'] / 1e6:.1f} MB/s",
        f"{prewarm['throughput_ratio']:.3f} of cap",
        ">= 0.90" if service else "",
    )
    table.add_row(
        f"foreground on the idle link (median of {len(fg['idle_link_s'])})",
        f"{fg['idle_link_median_s'] * 1e3:.1f} ms",
        "1.000",
        "",
    )
    table.add_row(
        f"foreground during the prewarm (median of {len(fg['during_prewarm_s'])})",
        f"{fg['during_prewarm_median_s'] * 1e3:.1f} ms",
        f"{fg['ratio_vs_idle']:.3f} of idle",
        "<= 1.10",
    )
    console = Console()
    console.print(table)
    if "load_average" in result:
        console.print(
            f"load average {' '.join(f'{x:.2f}' for x in result['load_average'])}; source sent "
            + ", ".join(f"{c} {b / 1e6:.1f} MB" for c, b in result["source_sent_bytes"].items())
            + f"; prewarm bytes sent during the foregrounds "
            f"{fg['background_bytes_sent_meanwhile'] / 1e6:.1f} MB"
        )
    for when, stats in result.get("link_stats", {}).items():
        console.print(
            f"link stats {when.replace('_', ' ')}: throughput "
            f"{stats['throughput_bytes_per_s'] / 1e6:.1f} MB/s, foreground "
            f"{stats['foreground_bytes_per_s'] / 1e6:.1f} MB/s, prewarm "
            f"{stats['prewarm_bytes_per_s'] / 1e6:.1f} MB/s, spare "
            f"{stats['spare_bytes_per_s'] / 1e6:.1f} MB/s"
        )
    ok = result["within_targets"]
    console.print(
        "targets: throughput "
        + ("met" if ok["throughput"] else "[red]missed[/]")
        + ", foreground "
        + ("met" if ok["foreground"] else "[red]missed[/]")
        + " (wall-clock timings on a shared machine)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``slomesh bench-transfer``; returns 0 (2 on bad arguments)."""
    p = argparse.ArgumentParser(
        prog="slomesh bench-transfer",
        description="A WAN link's bandwidth scheduler on a loopback gRPC transport.",
    )
    p.add_argument("--capacity-bytes-per-s", type=float, default=200e6)
    p.add_argument("--bytes", type=float, default=1e9, help="prewarm size, bytes")
    p.add_argument("--chunk-bytes", type=int, default=1024 * 1024)
    p.add_argument("--foreground-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument(
        "--foreground-at-s",
        type=float,
        default=1.0,
        help="start of the foreground transfer after the prewarm's, seconds",
    )
    p.add_argument(
        "--foreground-gap-s",
        type=float,
        default=0.5,
        help="pause between two foreground transfers during the prewarm, seconds",
    )
    p.add_argument("--repeats", type=int, default=3, help="foreground transfers per phase")
    p.add_argument("--burst-bytes", type=int, default=DEFAULT_BURST_BYTES)
    p.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="> 0: through a WanRelay of this RTT and the link's capacity",
    )
    p.add_argument(
        "--through-service",
        action="store_true",
        help="end to end through two KVTransfer service processes (--burst-bytes: the "
        "services' default)",
    )
    p.add_argument("--report-json", default=None)
    args = p.parse_args(argv)
    try:
        common = {
            "capacity_bytes_per_s": args.capacity_bytes_per_s,
            "prewarm_bytes": int(args.bytes),
            "chunk_bytes": args.chunk_bytes,
            "foreground_bytes": args.foreground_bytes,
            "foreground_at_s": args.foreground_at_s,
            "foreground_gap_s": args.foreground_gap_s,
            "repeats": args.repeats,
            "rtt_ms": args.rtt_ms,
        }
        if args.through_service:
            from slomesh.benchmarks.transfer_service import run_service_transfer_benchmark

            run = run_service_transfer_benchmark(**common)
        else:
            run = run_transfer_benchmark(**common, burst_bytes=args.burst_bytes)
        result = asyncio.run(run)
    except ValueError as exc:
        print(f"slomesh bench-transfer: {exc}", file=sys.stderr)
        return 2
    _print(result)
    if args.report_json:
        path = Path(args.report_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
