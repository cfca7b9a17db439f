"""`python -m services.kv_transfer` / `slomesh kv-transfer`: run one region's KV transfer service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from slomesh.logs import setup_logging
from slomesh.service import install_signal_handlers, start_metrics_server
from slomesh.telemetry import setup_telemetry, shutdown_telemetry

from .server import serve

logger = logging.getLogger("services.kv_transfer")


def _parse_link(text: str) -> tuple[str, float]:
    peer, sep, capacity = text.partition("=")
    if not sep or not peer:
        raise argparse.ArgumentTypeError(f"--link expects PEER=BYTES_PER_S, got {text!r}")
    try:
        return peer, float(capacity)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--link capacity must be a number: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slomesh kv-transfer", description=__doc__)
    parser.add_argument("--region", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--link", type=_parse_link, action="append", default=[],
                        help="PEER=BYTES_PER_S, configured capacity of the link to a peer region")
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--spans-out", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--grace-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    setup_logging("slomesh-kv-transfer", args.log_level)
    setup_telemetry("slomesh-kv-transfer", args.spans_out)
    if args.metrics_port is not None:
        start_metrics_server(args.metrics_port, host=args.host)

    async def run() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        handle = await serve(args.region, dict(args.link), f"{args.host}:{args.port}")
        logger.info("kv transfer service ready", extra={"region": args.region, "port": handle.port})
        await stop.wait()
        await handle.stop(args.grace_s)

    try:
        asyncio.run(run())
    finally:
        shutdown_telemetry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
