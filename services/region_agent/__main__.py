"""Command line of the region agent.

    python -m services.region_agent --region NAME --topology PATH --port P --nats-url URL \\
        --instance id=ID,url=http://127.0.0.1:8001,kv_events=tcp://127.0.0.1:5557,gpu=H100 \\
        [--instance ...] [--peer REGION=HOST:PORT ...] [--advertise HOST:PORT] \\
        [--metrics-port P] [--spans-out PATH] [--state-hz 10]

Runs until SIGINT/SIGTERM, then shuts down gracefully (health NOT_SERVING, in-flight streams
finish within the grace period, NATS drained). Exit status: 0 after a clean shutdown, 2 for a
bad command line or configuration, 1 when start-up fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from services.region_agent.config import AgentConfig, parse_instance, parse_peer
from services.region_agent.server import RegionAgent
from slomesh.logs import setup_logging
from slomesh.service import install_signal_handlers, start_metrics_server
from slomesh.telemetry import setup_telemetry, shutdown_telemetry
from slomesh.topology import Topology

logger = logging.getLogger("services.region_agent")


def build_parser() -> argparse.ArgumentParser:
    """The agent's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m services.region_agent",
        description="slomesh region agent: scrapes vLLM instances, indexes their KV events, "
        "publishes region state on NATS and forwards Generate requests.",
    )
    p.add_argument("--region", required=True, help="region name (topology slug)")
    p.add_argument("--topology", required=True, help="topology YAML file")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = pick a free one)")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind host")
    p.add_argument("--nats-url", required=True, help="NATS URL, e.g. nats://127.0.0.1:4222")
    p.add_argument(
        "--instance",
        action="append",
        required=True,
        type=_arg(parse_instance),
        help="id=ID,url=URL[,kv_events=tcp://HOST:PORT|bind:tcp://HOST:PORT][,gpu=TYPE]"
        "[,profile=LATENCY_PROFILE.yaml]",
    )
    p.add_argument(
        "--peer", action="append", default=[], type=_arg(parse_peer), help="REGION=HOST:PORT"
    )
    p.add_argument("--advertise", default=None, help="HOST:PORT published as agent_endpoint")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0 = free)")
    p.add_argument("--spans-out", default=None, help="JSON-lines span file")
    p.add_argument("--state-hz", type=float, default=10.0, help="RegionState publish rate, Hz")
    p.add_argument("--grace-s", type=float, default=10.0, help="shutdown grace period, s")
    p.add_argument("--log-level", default="INFO")
    return p


def _arg(parse):
    def convert(value: str):
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


async def _run(args: argparse.Namespace, config: AgentConfig, topology: Topology) -> int:
    agent = RegionAgent(config, topology)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    try:
        await agent.start()
    except Exception:
        logger.exception("region agent failed to start")
        await agent.stop(grace_s=0)
        return 1
    if args.metrics_port is not None:
        port = start_metrics_server(args.metrics_port, host=args.host)
        logger.info("metrics", extra={"metrics_port": port})
    logger.info(
        "region agent serving",
        extra={"region": config.region, "grpc_port": agent.port, "endpoint": agent.endpoint},
    )
    await stop.wait()
    logger.info("shutting down", extra={"grace_s": config.shutdown_grace_s})
    await agent.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the agent; returns the process exit status (module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    setup_logging(f"region-agent-{args.region}", args.log_level)
    try:
        topology = Topology.load(args.topology)
        topology.region(args.region)
        config = AgentConfig(
            region=args.region,
            instances=args.instance,
            nats_url=args.nats_url,
            bind=f"{args.host}:{args.port}",
            advertise=args.advertise,
            peers=args.peer,
            state_hz=args.state_hz,
            shutdown_grace_s=args.grace_s,
        )
    except (OSError, ValueError, KeyError) as exc:
        logger.error("invalid configuration", extra={"error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_telemetry(f"region-agent-{args.region}", args.spans_out)
    try:
        return asyncio.run(_run(args, config, topology))
    finally:
        shutdown_telemetry()


if __name__ == "__main__":
    sys.exit(main())
