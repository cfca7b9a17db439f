"""Command line of the global scheduler.

    python -m services.global_scheduler --port P --nats-url URL --redis-url URL \\
        --topology PATH [--routes-json PATH] [--policy NAME|PATH] [--slo-config PATH] \\
        [--region NAME] [--metrics-port P] [--spans-out PATH] [--staleness-ms 1000] \\
        [--output-length-window 1000] [--kv-transfer-routes-json PATH] \\
        [--kv-transfer-max-wait-ms 10000]

Runs until SIGINT/SIGTERM, then shuts down gracefully (health NOT_SERVING, in-flight calls
finish within ``--grace-s``, NATS drained, ledger flushed). Exit status: 0 after a clean
shutdown, 2 for a bad configuration, 1 when start-up fails (e.g. NATS unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from services.global_scheduler.kv_moves import DEFAULT_MAX_WAIT_MS
from services.global_scheduler.routes import RoutesError, load_routes
from services.global_scheduler.server import SchedulerConfig, SchedulerService
from slomesh.logs import setup_logging
from slomesh.scheduler.output_length import DEFAULT_OUTPUT_LENGTH_WINDOW
from slomesh.scheduler.policy import PolicyConfigError
from slomesh.service import install_signal_handlers
from slomesh.slo import SloConfigError
from slomesh.telemetry import setup_telemetry, shutdown_telemetry
from slomesh.topology import Topology

logger = logging.getLogger("services.global_scheduler")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the global scheduler."""
    p = argparse.ArgumentParser(
        prog="python -m services.global_scheduler",
        description="slomesh global scheduler: SLO- and cost-aware placement over regions.",
    )
    p.add_argument("--port", type=int, default=50050, help="gRPC port (0 = pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--nats-url", required=True, help="nats://host:port[,nats://...]")
    p.add_argument("--redis-url", required=True, help="redis://host:port/db for the ledger")
    p.add_argument("--topology", required=True, help="topology YAML")
    p.add_argument(
        "--routes-json",
        help='JSON {"<origin>": {"<serving region>": "host:port"}}: agent addresses per origin',
    )
    p.add_argument(
        "--kv-transfer-routes-json",
        help='JSON {"<origin>": {"<region>": "host:port"}}: KV transfer service addresses per '
        "origin, where the prefix moves placements ask for are started (none: no moves)",
    )
    p.add_argument(
        "--kv-transfer-max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help="longest wait of a request for its prefix move (ms); the TTFT SLO bounds it too",
    )
    p.add_argument(
        "--policy",
        default="slomesh",
        help="placement policy: a registered profile name (slomesh, oracle, round-robin, "
        "least-load, nearest, llm-d, dynamo, qlm) or a YAML profile path",
    )
    p.add_argument("--slo-config", help="SLO classes YAML (default: built-in classes)")
    p.add_argument("--region", help="this replica's region (default origin of requests)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0 = pick a free one)")
    p.add_argument("--spans-out", help="append finished spans as JSON lines to this file")
    p.add_argument(
        "--staleness-ms",
        type=float,
        default=1000.0,
        help="a region whose state is older than this is not routable (ms)",
    )
    p.add_argument("--ledger-ttl-s", type=int, default=7 * 24 * 3600, help="ledger request TTL (s)")
    p.add_argument(
        "--output-length-window",
        type=int,
        default=DEFAULT_OUTPUT_LENGTH_WINDOW,
        help="completed requests per (model, SLO class) whose output lengths the predictor "
        "keeps (in memory and in Redis)",
    )
    p.add_argument("--grace-s", type=float, default=5.0, help="shutdown grace period (s)")
    p.add_argument(
        "--no-forward-retry",
        action="store_true",
        help="do not retry Generate on another region when the serving one fails early",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


async def _serve(service: SchedulerService) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the global scheduler until SIGINT/SIGTERM.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 after a clean shutdown, 1 when start-up fails, 2 for a bad configuration.
    """
    args = build_parser().parse_args(argv)
    try:
        topology = Topology.load(args.topology)
        config = SchedulerConfig(
            nats_url=args.nats_url,
            redis_url=args.redis_url,
            topology=topology,
            policy=args.policy,
            slo_config_path=args.slo_config,
            region=args.region,
            routes=load_routes(args.routes_json),
            staleness_ms=args.staleness_ms,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            ledger_ttl_s=args.ledger_ttl_s,
            output_length_window=args.output_length_window,
            grace_s=args.grace_s,
            forward_retry=not args.no_forward_retry,
            kv_transfer_routes=load_routes(args.kv_transfer_routes_json),
            kv_transfer_max_wait_ms=args.kv_transfer_max_wait_ms,
        )
        service = SchedulerService(config)
    except (
        OSError,
        ValidationError,
        ValueError,
        RoutesError,
        SloConfigError,
        PolicyConfigError,
    ) as err:
        print(f"global_scheduler: invalid configuration: {err}", file=sys.stderr)
        return 2
    setup_logging("slomesh-scheduler", args.log_level)
    setup_telemetry("slomesh-scheduler", spans_out=args.spans_out)
    try:
        asyncio.run(_serve(service))
    except (TimeoutError, RuntimeError, OSError) as err:
        logger.error("global scheduler failed", extra={"error": str(err)})
        return 1
    finally:
        shutdown_telemetry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
