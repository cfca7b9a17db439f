"""``slomesh sim``: simulate a trace on a topology under one policy and write the report.

::

    slomesh sim --trace PATH --policy NAME --report-json PATH [--rate-scale X] [--limit N]
                [--topology FILE] [--seed S] [--state-delay-ms D] [--state-period-ms P]
                [--kv-flush-ms F] [--request-path-ms R] [--token-path-ms T] [--staleness-ms S] [--slo-config FILE] [--slo-class NAME]
                [--region-shares R=W,...] [--fit-context] [--burst-bins] [--results-jsonl PATH] [--no-progress]

The trace is loaded as ``slomesh replay`` loads it (same origins, SLO classes and token ids),
the report has every key of the replay report (DESIGN.md section 6) plus:

- ``oversized_requests``: requests longer than every instance's context (they fail with
  INVALID_ARGUMENT under any policy); ``dropped_oversized_requests``: those ``--fit-context``
  removed from the trace before simulating (``--limit`` applies first);
- ``gpus``: instances in the topology; ``fleet_cost_usd``: what the whole fleet costs over the
  run's duration at its prices (on-demand, or spot for spot instances) -- idle GPUs are paid
  too -- and ``fleet_cost_per_mtok_usd`` per million served tokens;
  ``goodput_rps_per_gpu``: ``goodput_rps / gpus``;
- ``sim``: wall time, speed-up over real time (virtual duration / wall time), the simulation
  settings and event counters.

Exit codes: 0 on success, 2 for bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slomesh.report import build_report
from slomesh.sim.simulator import SimConfig, SimOutcome, Simulator, queue_wait_error
from slomesh.slo import SloConfig
from slomesh.topology import Topology
from slomesh.traces import Trace, load_trace

__all__ = [
    "drop_oversized",
    "load_sim_trace",
    "main",
    "max_context_tokens",
    "oversized_requests",
    "parse_region_shares",
    "sim_report",
]


def parse_region_shares(text: str | None) -> dict[str, float] | None:
    """``"washington-dc=2,frankfurt=1"`` -> ``{"washington-dc": 2.0, "frankfurt": 1.0}``.

    Raises:
        ValueError: an item is not ``NAME=WEIGHT``.
    """
    if not text:
        return None
    shares: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            shares[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--region-shares: bad item {item!r} (want NAME=WEIGHT)") from None
    return shares


def load_sim_trace(
    path: str | Path,
    topology: Topology,
    *,
    trace_format: str = "auto",
    limit: int | None = None,
    rate_scale: float = 1.0,
    slo_class: str | None = None,
    region_shares: Mapping[str, float] | None = None,
    system_prompt_tokens: int = 0,
    burst_bins: bool = False,
) -> Trace:
    """Loads a trace exactly as ``slomesh replay`` does for ``topology``'s regions.

    Raises:
        ValueError, FileNotFoundError: as `slomesh.traces.load_trace`.
    """
    return load_trace(
        path,
        trace_format,  # type: ignore[arg-type]
        limit=limit,
        rate_scale=rate_scale,
        regions=topology.region_names,
        region_shares=region_shares,
        slo_class=slo_class,
        system_prompt_tokens=system_prompt_tokens,
        spread_binned_arrivals=not burst_bins,
    )


def max_context_tokens(topology: Topology) -> int:
    """The largest context (prompt + output tokens) any instance of ``topology`` serves."""
    return max(topology.instance_max_model_len(i.id) for r in topology.regions for i in r.instances)


def oversized_requests(trace: Trace, topology: Topology) -> int:
    """Requests of ``trace`` whose prompt plus output exceed every instance's context."""
    limit_tokens = max_context_tokens(topology)
    return sum(1 for r in trace.requests if r.prompt_tokens + r.output_tokens > limit_tokens)


def drop_oversized(trace: Trace, topology: Topology) -> int:
    """Removes from ``trace`` the requests no instance's context can hold (``--fit-context``).

    No placement can serve such a request, so every policy fails it alike (the scheduler
    answers INVALID_ARGUMENT); replay sends them, and so does the simulator unless asked.

    Returns:
        The number of requests removed.
    """
    limit_tokens = max_context_tokens(topology)
    before = len(trace.requests)
    trace.requests = [
        r for r in trace.requests if r.prompt_tokens + r.output_tokens <= limit_tokens
    ]
    return before - len(trace.requests)


def sim_report(
    trace: Trace,
    topology: Topology,
    policy: Any,
    config: SimConfig | None = None,
    slo: SloConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], SimOutcome]:
    """Simulates ``trace`` and builds its report (module docstring for the added keys).

    Args:
        trace: The trace (rate-scaled).
        topology: The mesh.
        policy: A policy name, YAML path, profile mapping or `Policy`.
        config: Simulation settings.
        slo: SLO classes (default: built-in).
        progress: Optional ``(sent, total)`` callback.

    Returns:
        (report, outcome).
    """
    config = config if config is not None else SimConfig()
    sim = Simulator(topology, policy, config, slo)
    outcome = sim.run(trace, progress)
    gpus = sum(len(r.instances) for r in topology.regions)
    fleet_usd_per_hour = sum(
        topology.instance_price_usd_per_hour(i.id) for r in topology.regions for i in r.instances
    )
    fleet_cost = fleet_usd_per_hour * outcome.duration_s / 3600.0
    served = sum(r.prompt_tokens + r.completion_tokens for r in outcome.results if r.ok)
    wall = outcome.wall_s
    extra = {
        "rate_scale": trace.rate_scale,
        "trace_duration_s": trace.duration_s,
        "scheduler_address": "simulator (virtual time)",
        "gpus": gpus,
        "fleet_cost_usd": fleet_cost,
        "fleet_cost_per_mtok_usd": fleet_cost / served * 1e6 if served else 0.0,
        "oversized_requests": oversized_requests(trace, topology),
        "sim": {
            "wall_s": wall,
            "virtual_s": outcome.duration_s,
            "speedup": outcome.duration_s / wall if wall > 0 else 0.0,
            **dataclasses.asdict(config),
            **outcome.stats,
        },
    }
    report = build_report(
        outcome.results,
        trace=trace.name,
        policy=outcome.policy,
        duration_s=outcome.duration_s,
        slo_classes=sim.slo.classes,
        topology=topology,
        extra=extra,
    )
    report["goodput_rps_per_gpu"] = report["goodput_rps"] / gpus if gpus else 0.0
    report["queue_wait_error"] = queue_wait_error(outcome.records)
    _add_prefetch(report, outcome)
    return report, outcome


def _add_prefetch(report: dict[str, Any], outcome: SimOutcome) -> None:
    """Adds the hot-prefix prefetch (`slomesh.scheduler.prefetch`) to the report: its bytes to
    ``cross_region_bytes`` and ``cross_region_kv_bytes``, its egress (at the source region's
    price) to ``egress_cost_usd``, the GPU time of its export/import requests to
    ``gpu_cost_usd``, both to ``cost_usd``, and a ``prefetch`` section with ``hit_rate`` =
    prompt tokens served from prefetched blocks / prompt tokens of completed requests."""
    stats = outcome.stats
    nbytes = stats.get("prefetch_bytes", 0)
    egress = stats.get("prefetch_egress_usd", 0.0)
    gpu = stats.get("prefetch_gpu_usd", 0.0)
    served = sum(r.prefetched_prompt_tokens for r in outcome.records if r.ok)
    prompt_tokens = report["prompt_tokens"]
    report["prefetch"] = {
        "orders": stats.get("prefetches", 0),
        "bytes": nbytes,
        "egress_cost_usd": egress,
        "requests": stats.get("prefetch_requests", 0),
        "gpu_seconds": stats.get("prefetch_gpu_seconds", 0.0),
        "gpu_cost_usd": gpu,
        "prompt_tokens_served": served,
        "hit_rate": served / prompt_tokens if prompt_tokens else 0.0,
    }
    if not (nbytes or gpu):
        return
    report["cross_region_bytes"] += nbytes
    report["cross_region_kv_bytes"] += nbytes
    report["egress_cost_usd"] += egress
    report["gpu_cost_usd"] += gpu
    report["cost_usd"] += egress + gpu
    tokens = prompt_tokens + report["completion_tokens"]
    report["cost_per_mtok_usd"] = report["cost_usd"] / tokens * 1e6 if tokens else 0.0
    if report.get("predicted_cost_per_mtok_usd") is not None and tokens:
        # Egress is known ahead; the export/import GPU time is not predicted.
        report["predicted_cost_per_mtok_usd"] += egress / tokens * 1e6


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Trace, topology and simulation options shared by ``slomesh sim`` and ``slomesh bench``."""
    parser.add_argument("--trace", required=True, help="trace file (Azure CSV, Mooncake JSONL)")
    parser.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake"])
    parser.add_argument("--topology", default=None, help="topology YAML (default: configs/...)")
    parser.add_argument("--slo-config", default=None, help="SLO classes YAML")
    parser.add_argument("--slo-class", default=None, help="SLO class of every request")
    parser.add_argument("--region-shares", default=None,
                        help="origin weights, e.g. washington-dc=2,frankfurt=1,tokyo=1")
    parser.add_argument("--system-prompt-tokens", type=int, default=0,
                        help="Azure only: a shared system prompt of N tokens (default none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of engine output tokens")
    parser.add_argument("--state-period-ms", type=float, default=100.0,
                        help="RegionState publication period (default 100, the agent's 10 Hz)")
    parser.add_argument("--state-delay-ms", type=float, default=5.0,
                        help="delay from a state/KV publication to the scheduler (default 5)")
    parser.add_argument("--request-path-ms", type=float, default=SimConfig.request_path_ms,
                        help="serving-stack latency client->engine beyond the WAN "
                             f"(default {SimConfig.request_path_ms:g})")
    parser.add_argument("--token-path-ms", type=float, default=SimConfig.token_path_ms,
                        help="serving-stack latency engine->client beyond the WAN "
                             f"(default {SimConfig.token_path_ms:g})")
    parser.add_argument("--kv-flush-ms", type=float, default=50.0,
                        help="KV index delta publication period (default 50, as the agent)")
    parser.add_argument("--staleness-ms", type=float, default=1000.0,
                        help="scheduler's staleness bound (default 1000)")
    parser.add_argument("--warmup-ms", type=float, default=500.0,
                        help="regions publish this long before the first request")
    parser.add_argument("--burst-bins", action="store_true",
                        help="replay a binned trace's timestamp bins as bursts "
                             "(default: spread each bin's requests over it)")
    parser.add_argument("--fit-context", action="store_true",
                        help="drop requests longer than every instance's max_model_len "
                             "(default: send them; they fail with INVALID_ARGUMENT)")


def sim_config_from_args(args: argparse.Namespace) -> SimConfig:
    """The `SimConfig` of parsed `add_sim_arguments` options.

    Raises:
        ValueError: a value out of range (the message names the field).
    """
    return SimConfig(
        state_period_ms=args.state_period_ms,
        state_delay_ms=args.state_delay_ms,
        kv_flush_period_ms=args.kv_flush_ms,
        request_path_ms=args.request_path_ms,
        token_path_ms=args.token_path_ms,
        staleness_ms=args.staleness_ms,
        warmup_ms=args.warmup_ms,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``slomesh sim``. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="slomesh sim", description="Simulate a trace on the mesh in virtual time."
    )
    add_sim_arguments(parser)
    parser.add_argument("--policy", default="slomesh", help="built-in policy or YAML profile")
    parser.add_argument("--rate-scale", type=float, default=1.0,
                        help="divide arrival times by X (2 = twice the request rate)")
    parser.add_argument("--limit", type=int, default=None,
                        help="simulate the first N requests (default: all)")
    parser.add_argument("--report-json", required=True, help="write the report here")
    parser.add_argument("--results-jsonl", default=None,
                        help="also write one JSON line per request (RequestResult fields)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="print no report tables")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from slomesh.report import print_report
    from slomesh.scheduler.policy import PolicyConfigError
    from slomesh.slo import SloConfigError, load_slo_config

    err = Console(stderr=True)
    try:
        topology = Topology.load(args.topology) if args.topology else Topology.default()
        slo = load_slo_config(args.slo_config)
        config = sim_config_from_args(args)
        trace = load_sim_trace(
            args.trace,
            topology,
            trace_format=args.format,
            limit=args.limit if args.limit else None,
            rate_scale=args.rate_scale,
            slo_class=args.slo_class,
            region_shares=parse_region_shares(args.region_shares),
            system_prompt_tokens=args.system_prompt_tokens,
            burst_bins=args.burst_bins,
        )
        dropped = drop_oversized(trace, topology) if args.fit_context else 0
        if not trace.requests:
            raise ValueError(f"trace {args.trace} has no requests")
        if args.slo_class is not None and args.slo_class not in slo.classes:
            raise ValueError(f"--slo-class: unknown class {args.slo_class!r}")
        progress = Progress(
            TextColumn("[bold]sim"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("requests sent"),
            TimeElapsedColumn(),
            console=err,
            disable=args.no_progress,
        )
        with progress:
            task = progress.add_task("sim", total=len(trace.requests))
            report, outcome = sim_report(
                trace,
                topology,
                args.policy,
                config,
                slo,
                progress=lambda done, total: progress.update(task, completed=done),
            )
    except (OSError, ValueError, PolicyConfigError, SloConfigError) as exc:
        print(f"slomesh sim: {exc}", file=sys.stderr)
        return 2
    report["dropped_oversized_requests"] = dropped
    if not args.quiet:
        print_report(report, Console())
    s = report["sim"]
    err.print(
        f"simulated {report['requests']} requests, {s['virtual_s']:.1f} s of virtual time in "
        f"{s['wall_s']:.1f} s of wall time ({s['speedup']:.0f}x real time)"
    )
    q = report["queue_wait_error"]
    err.print(
        f"queue-wait (RWT) prediction: MdAPE {q['mdape'] * 100:.1f} % over the {q['compared']} "
        f"of {q['placed']} requests that waited >= {q['min_observed_ms']:g} ms; MAE "
        f"{q['mae_ms']:.1f} ms; observed wait p50/p90 {q['observed_p50_ms']:.1f}/"
        f"{q['observed_p90_ms']:.1f} ms"
    )
    path = Path(args.report_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if args.results_jsonl:
        out = Path(args.results_jsonl)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in outcome.results)
    err.print(f"report written to {path}")
    return 0
