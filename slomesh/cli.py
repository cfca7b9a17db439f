"""The `slomesh` command line.

Subcommands::

    slomesh up [--topology FILE] [--run-dir DIR] [--spans-out PATH] [--detach]
    slomesh down [--run-dir DIR]
    slomesh replay --trace PATH --report-json PATH [--scheduler HOST:PORT | --run-dir DIR] ...
    slomesh demo --trace PATH --limit N --report-json PATH [--spans-out PATH] [--topology FILE]
    slomesh compose [--topology FILE] [--out-dir DIR]     # regenerate docker-compose.yml
    slomesh health (--grpc HOST:PORT | --http URL | --tcp HOST:PORT)   # for healthchecks
    slomesh sim --trace PATH --policy NAME --report-json PATH [--rate-scale X] [--limit N] ...
    slomesh bench --trace PATH --policies a,b,... --report-json PATH [--plot PATH.png] ...
    slomesh sim|bench|fidelity|study-prefix-wan|study-heterogeneity ARGS...  # measure policies
    slomesh profile --endpoint URL --out PROFILE.yaml ...  # fit a server's latency model
    slomesh emulator|agent|scheduler|wan-relay|kv-transfer|bench-place|bench-decision ARGS...
    slomesh bench-transfer [--bytes N] [--report-json PATH]  # WAN link scheduler, loopback

Imports are lazy so that ``slomesh --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

PASS_THROUGH: dict[str, tuple[str, str, str]] = {
    "emulator": ("slomesh.emulator.__main__", "main", "run a vLLM emulator instance"),
    "agent": ("services.region_agent.__main__", "main", "run a region agent"),
    "scheduler": ("services.global_scheduler.__main__", "main", "run the global scheduler"),
    "wan-relay": ("slomesh.wan_relay", "main", "run WAN relays (delay, bandwidth)"),
    "kv-transfer": ("services.kv_transfer.__main__", "main", "run a region's KV transfer service"),
    "bench-place": ("slomesh.benchmarks.place_latency", "main", "benchmark Place latency"),
    "bench-decision": (
        "slomesh.benchmarks.decision", "main", "in-process placement decision latency"
    ),
    "bench-transfer": (
        "slomesh.benchmarks.transfer", "main", "WAN link bandwidth scheduler on loopback"
    ),
    "sim": ("slomesh.sim.cli", "main", "simulate a trace in virtual time"),
    "bench": ("slomesh.benchmarks.capacity", "main", "capacity benchmark of policies (sim)"),
    "fidelity": ("slomesh.fidelity", "main", "simulator vs live mesh on one trace slice"),
    "study-prefix-wan": ("slomesh.research", "prefix_wan_main", "is the WAN to a prefix worth it"),
    "study-heterogeneity": ("slomesh.research", "heterogeneity_main", "GPU mix vs. SLO and cost"),
    "profile": ("slomesh.profiling", "main", "measure a server, fit its prefill/decode latency"),
}


def _pass_through(name: str) -> Callable[[list[str]], int]:
    module_name, func_name, _ = PASS_THROUGH[name]

    def run(rest: list[str]) -> int:
        import importlib

        module = importlib.import_module(module_name)
        rc = getattr(module, func_name)(rest)
        return int(rc or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slomesh",
        description="SLO- and cost-aware control plane for LLM serving across regions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="start the local multi-region mesh")
    up.add_argument("--topology", default=None, help="topology YAML (default: configs/...)")
    up.add_argument("--run-dir", default=".slomesh/run", help="run directory")
    up.add_argument("--spans-out", default=None, help="every service appends spans here")
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument("--policy", default=None, help="placement policy of the scheduler")
    up.add_argument("--slo-config", default=None, help="SLO classes YAML for the scheduler")
    up.add_argument("--startup-timeout-s", type=float, default=180.0)
    up.add_argument("--nats-url", default=None, help="use this NATS instead of starting one")
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    up.add_argument("--log-level", default="INFO")
    up.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)

    down = sub.add_parser("down", help="stop a mesh started with `up --detach`")
    down.add_argument("--run-dir", default=".slomesh/run", help="run directory")
    down.add_argument("--timeout-s", type=float, default=10.0, help="SIGTERM grace per process")

    sub.add_parser("replay", help="replay a trace against a scheduler", add_help=False)
    sub.add_parser("demo", help="up, replay a trace, down", add_help=False)

    compose = sub.add_parser("compose", help="write docker-compose.yml and deploy/ configs")
    compose.add_argument("--topology", default=None)
    compose.add_argument("--out-dir", default=None, help="default: the repository root")

    health = sub.add_parser("health", help="exit 0 when a service is healthy")
    target = health.add_mutually_exclusive_group(required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="gRPC health check")
    target.add_argument("--http", metavar="URL", help="HTTP GET, 2xx = healthy")
    target.add_argument("--tcp", metavar="HOST:PORT", help="TCP connect")
    health.add_argument("--timeout-s", type=float, default=2.0)

    for name, (_, _, help_text) in PASS_THROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `slomesh` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in PASS_THROUGH:
        return _pass_through(argv[0])(argv[1:])
    if argv and argv[0] == "replay":
        from slomesh.replay import replay_main

        return replay_main(argv[1:])
    if argv and argv[0] == "demo":
        from slomesh.replay import demo_main

        return demo_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("up", "down"):
        from slomesh import launcher
        from slomesh.logs import setup_logging

        setup_logging("slomesh-launcher", getattr(args, "log_level", "INFO"))
        return launcher.up(args) if args.command == "up" else launcher.down(args)
    if args.command == "compose":
        from pathlib import Path

        from slomesh.launcher import write_compose_files
        from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology

        topo = Topology.load(args.topology) if args.topology else Topology.default()
        out_dir = Path(args.out_dir) if args.out_dir else DEFAULT_TOPOLOGY_PATH.parents[1]
        for path in write_compose_files(topo, out_dir):
            print(f"wrote {path}")
        return 0
    if args.command == "health":
        from slomesh.launcher import check_grpc_health, check_http_health, check_tcp

        if args.grpc:
            ok = check_grpc_health(args.grpc, timeout_s=args.timeout_s)
        elif args.http:
            ok = check_http_health(args.http, timeout_s=args.timeout_s)
        else:
            ok = check_tcp(args.tcp, timeout_s=args.timeout_s)
        return 0 if ok else 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
