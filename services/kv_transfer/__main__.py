"""`python -m services.kv_transfer` / `slomesh kv-transfer`: run one region's KV transfer service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping

import nats.errors

from slomesh import bus
from slomesh.logs import setup_logging
from slomesh.service import install_signal_handlers, start_metrics_server
from slomesh.telemetry import setup_telemetry, shutdown_telemetry
from slomesh.transfer.bandwidth import LinkScheduler
from slomesh.transfer.chunks import DEFAULT_CHUNK_BYTES, FaultInjector
from slomesh.transfer.link_stats import DEFAULT_PERIOD_S, LinkStatsPublisher
from slomesh.transfer.stores import KvStoreConfig, WeightCacheConfig

from .server import TransferOptions, serve

logger = logging.getLogger("services.kv_transfer")


def _parse_link(text: str) -> tuple[str, float]:
    peer, sep, capacity = text.partition("=")
    if not sep or not peer:
        raise argparse.ArgumentTypeError(f"--link expects PEER=BYTES_PER_S, got {text!r}")
    try:
        return peer, float(capacity)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--link capacity must be a number: {text!r}") from None


def _parse_peer(text: str) -> tuple[str, str]:
    region, sep, endpoint = text.partition("=")
    if not sep or not region or ":" not in endpoint:
        raise argparse.ArgumentTypeError(f"--peer expects REGION=HOST:PORT, got {text!r}")
    return region, endpoint


def _parse_kv_store(text: str) -> KvStoreConfig:
    try:
        return KvStoreConfig.model_validate_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--kv-store: {exc}") from None


def _parse_weight_cache(text: str) -> WeightCacheConfig:
    try:
        return WeightCacheConfig.model_validate_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--weight-cache: {exc}") from None


async def publish_link_stats(
    region: str, links: Mapping[str, LinkScheduler], nats_url: str, period_s: float
) -> None:
    """Connects to NATS (retrying until it answers: the transfers do not need it) and
    publishes the links' statistics on ``slomesh.region.<region>.links`` every `period_s`
    (`LinkStatsPublisher`) until cancelled; then drains the connection."""
    delay_s = 0.1
    while True:
        try:
            nc = await bus.connect_nats(nats_url, f"slomesh-kv-transfer-{region}")
            break
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            logger.warning(
                "NATS not reachable yet; link stats wait", extra={"error": repr(exc)}
            )
            await asyncio.sleep(delay_s)
            delay_s = min(2.0, delay_s * 2)
    publisher = LinkStatsPublisher(region, links, nc, period_s=period_s)
    try:
        await publisher.run()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), timeout=2.0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the KV transfer service."""
    parser = argparse.ArgumentParser(prog="slomesh kv-transfer", description=__doc__)
    parser.add_argument("--region", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--link",
        type=_parse_link,
        action="append",
        default=[],
        help="PEER=BYTES_PER_S, configured capacity of the link to a peer region",
    )
    parser.add_argument(
        "--peer",
        type=_parse_peer,
        action="append",
        default=[],
        help="REGION=HOST:PORT of a peer region's KV transfer service",
    )
    parser.add_argument(
        "--kv-store",
        type=_parse_kv_store,
        action="append",
        default=[],
        help='a KV store as JSON, e.g. \'{"id": "use1-vllm-0", "kind": "vllm_example", '
        '"path": "/kv", "model": "tiny-llama", "block_size": 128, "kv_dtype": "bfloat16"}\' '
        "(slomesh.transfer.stores.KvStoreConfig)",
    )
    parser.add_argument(
        "--weight-cache",
        type=_parse_weight_cache,
        default=None,
        help='the weight cache as JSON, e.g. \'{"path": "/weights", "dtype": "bfloat16"}\'',
    )
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--max-concurrent-transfers", type=int, default=8)
    parser.add_argument(
        "--fault-corrupt-chunk",
        type=int,
        action="append",
        default=[],
        help="TEST HOOK: flip a bit in chunk K of every file sent, once per transfer and file",
    )
    parser.add_argument(
        "--fault-break-after-chunks",
        type=int,
        default=None,
        help="TEST HOOK: break a sent stream after N chunks of a file, once per transfer and file",
    )
    parser.add_argument(
        "--nats-url",
        default=None,
        help="NATS to publish the links' statistics on (slomesh.region.<region>.links) for "
        "the global scheduler; none: not published",
    )
    parser.add_argument(
        "--link-stats-period-s",
        type=float,
        default=DEFAULT_PERIOD_S,
        help="seconds between two link statistics reports",
    )
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--spans-out", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--grace-s", type=float, default=5.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.link_stats_period_s > 0:
        parser.error(f"--link-stats-period-s must be > 0, got {args.link_stats_period_s}")
    faults = None
    if args.fault_corrupt_chunk or args.fault_break_after_chunks is not None:
        faults = FaultInjector(
            corrupt_chunk_indices=frozenset(args.fault_corrupt_chunk),
            break_after_chunks=args.fault_break_after_chunks,
        )
    try:
        options = TransferOptions(
            chunk_bytes=args.chunk_bytes,
            max_concurrent_transfers=args.max_concurrent_transfers,
            fault_injector=faults,
        )
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging("slomesh-kv-transfer", args.log_level)
    setup_telemetry("slomesh-kv-transfer", args.spans_out)
    if args.metrics_port is not None:
        start_metrics_server(args.metrics_port, host=args.host)

    async def run() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        handle = await serve(
            args.region,
            dict(args.link),
            f"{args.host}:{args.port}",
            peers=dict(args.peer),
            kv_stores=args.kv_store,
            weight_cache=args.weight_cache,
            options=options,
        )
        logger.info(
            "kv transfer service ready",
            extra={
                "region": args.region,
                "port": handle.port,
                "kv_stores": [c.id for c in args.kv_store],
                "weight_cache": str(args.weight_cache.path) if args.weight_cache else None,
            },
        )
        stats = None
        if args.nats_url and handle.servicer is not None:
            stats = asyncio.get_running_loop().create_task(
                publish_link_stats(
                    args.region, handle.servicer.links, args.nats_url, args.link_stats_period_s
                ),
                name="link-stats",
            )
        await stop.wait()
        if stats is not None:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats
        await handle.stop(args.grace_s)

    try:
        asyncio.run(run())
    finally:
        shutdown_telemetry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
