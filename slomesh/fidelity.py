"""Fidelity check: the same trace slice on the live mesh and in the simulator.

    slomesh fidelity --trace PATH --limit N [--rate-scale X] [--policy NAME]
                     [--topology FILE] [--report-json PATH]

Replays the slice on a local mesh of emulated instances (`slomesh.launcher.Mesh`, the
processes of `slomesh up`), then simulates the same slice (`slomesh.sim.Simulator`) with the
same topology, policy, SLO classes, origins and arrival times, and prints the relative error
of the simulator against the live mesh for p50/p90 TTFT, p50/p90 TPOT and SLO attainment:
``|sim - live| / live``. The target is <= 10 % on each (Vidur, MLSys 2024, reports < 9 %
against real vLLM).

The simulator runs first (it takes seconds), so a failure to start the mesh is reported after
the simulated figures.

The live mesh must keep its own timing for the comparison to mean anything, so the check also
reads, after the replay, how late the mesh's own clocks ran: the emulators' step deliveries
behind their deadlines (``slomesh_emulator_lag_seconds``, and the step-clock re-bases
``slomesh_emulator_lag_resyncs``) and the WAN relays' chunks behind their schedule
(``slomesh_wan_relay_lag_seconds``), as p99 upper bounds from the histograms. A p99 beyond
``MESH_LAG_LIMIT_MS`` fails the check like an error beyond the target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: (report key, percentile) pairs compared by the check, and the SLO attainment.
COMPARED: tuple[tuple[str, str], ...] = (
    ("ttft_ms", "p50"),
    ("ttft_ms", "p90"),
    ("tpot_ms", "p50"),
    ("tpot_ms", "p90"),
    ("slo_attainment", ""),
)
DEFAULT_TARGET_RELATIVE_ERROR = 0.10
MESH_LAG_LIMIT_MS = 10.0
"""Largest acceptable p99 lateness of the live mesh's emulator steps and WAN-relay chunks, ms."""


def histogram_quantile_ms(metrics_text: str, name: str, q: float) -> tuple[float, int]:
    """Upper bound of the ``q`` quantile of a Prometheus histogram, over all its series.

    Args:
        metrics_text: Prometheus text exposition.
        name: histogram name without the ``_bucket`` suffix (in seconds).
        q: quantile in [0, 1].

    Returns:
        (the smallest bucket bound, ms, holding at least ``q`` of the observations -- ``inf``
        when only the ``+Inf`` bucket does, 0 with no observations; the observation count).
    """
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    if not buckets:
        return 0.0, 0
    total = buckets[max(buckets)]
    if total == 0:
        return 0.0, 0
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le * 1000.0, int(total)
    return math.inf, int(total)


def counter_total(metrics_text: str, name: str) -> float:
    """Sum of a counter's samples (``<name>_total``) over all its series."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == f"{name}_total"
    )


def mesh_timing(emulator_metrics: Mapping[str, str], relay_metrics: str) -> dict[str, Any]:
    """How late the live mesh's own clocks ran (see the module docstring).

    Args:
        emulator_metrics: instance id -> its ``/metrics`` text.
        relay_metrics: the WAN relay process's ``/metrics`` text.

    Returns:
        ``{"emulator_lag_p99_ms": {id: ms}, "emulator_lag_resyncs": n,
        "relay_lag_p99_ms": ms, "relay_chunks": n, "within_limit": bool}``.
    """
    emulators = {
        iid: histogram_quantile_ms(text, "slomesh_emulator_lag_seconds", 0.99)[0]
        for iid, text in emulator_metrics.items()
    }
    resyncs = sum(
        counter_total(text, "slomesh_emulator_lag_resyncs") for text in emulator_metrics.values()
    )
    relay_p99, relay_chunks = histogram_quantile_ms(
        relay_metrics, "slomesh_wan_relay_lag_seconds", 0.99
    )
    worst = max([relay_p99, *emulators.values()])
    return {
        "emulator_lag_p99_ms": emulators,
        "emulator_lag_resyncs": int(resyncs),
        "relay_lag_p99_ms": relay_p99,
        "relay_chunks": relay_chunks,
        "within_limit": worst <= MESH_LAG_LIMIT_MS and resyncs == 0,
    }


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def relative_errors(live: Mapping[str, Any], sim: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Relative error of the simulated report against the live one, per compared figure.

    Args:
        live, sim: reports of DESIGN.md section 6.

    Returns:
        ``{"ttft_ms.p50": {"live": x, "sim": y, "relative_error": e}, ...}`` where
        ``e = |y - x| / |x|`` (``|y - x|`` when ``x`` is 0).
    """
    out: dict[str, dict[str, float]] = {}
    for key, pct in COMPARED:
        x = float(live[key][pct] if pct else live[key])
        y = float(sim[key][pct] if pct else sim[key])
        err = abs(y - x) / abs(x) if x else abs(y - x)
        out[f"{key}.{pct}" if pct else key] = {"live": x, "sim": y, "relative_error": err}
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slomesh fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--trace", required=True, help="trace file (Azure CSV, Mooncake JSONL)")
    parser.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake"])
    parser.add_argument("--limit", type=int, default=200, help="first N requests (default 200)")
    parser.add_argument("--rate-scale", type=float, default=1.0)
    parser.add_argument("--policy", default="slomesh", help="placement policy (name or YAML)")
    parser.add_argument("--topology", default=None, help="topology YAML (default: configs/...)")
    parser.add_argument("--run-dir", default=None, help="mesh run dir (default: a temp dir)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET_RELATIVE_ERROR,
                        help="largest acceptable relative error (default 0.10)")
    parser.add_argument("--report-json", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.rate_scale <= 0:
        parser.error("--rate-scale must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the fidelity check; returns 0 when every error is within the target, else 1
    (2 on a setup error)."""
    args = _parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from slomesh.launcher import Mesh, MeshError
    from slomesh.replay import SetupError, replay
    from slomesh.report import build_report
    from slomesh.sim import Simulator
    from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology
    from slomesh.traces import load_trace

    console = Console(stderr=True)
    topology_path = Path(args.topology or DEFAULT_TOPOLOGY_PATH)
    topology = Topology.load(topology_path)
    try:
        trace = load_trace(args.trace, args.format, limit=args.limit,
                           rate_scale=args.rate_scale, regions=topology.region_names)
    except (OSError, ValueError) as exc:
        console.print(f"slomesh fidelity: cannot load trace {args.trace}: {exc}")
        return 2

    console.print(f"simulating {len(trace)} requests of {trace.name} ...")
    outcome = Simulator(topology, args.policy).run(trace)
    sim_report = build_report(outcome.results, trace=trace.name, policy=outcome.policy,
                              duration_s=outcome.duration_s, topology=topology)

    console.print("replaying the same requests on the live mesh ...")
    with tempfile.TemporaryDirectory(prefix="slomesh-fidelity-") as tmp:
        mesh = Mesh(topology_path, args.run_dir or Path(tmp) / "run", policy=args.policy)
        try:
            with mesh:
                live = asyncio.run(replay(trace, mesh.scheduler_address,
                                          model=topology.model.name,
                                          show_progress=not args.no_progress))
                assert mesh.plan is not None
                timing = mesh_timing(
                    {iid: _scrape(f"{inst.url}/metrics")
                     for iid, inst in mesh.plan.instances.items()},
                    _scrape(f"http://127.0.0.1:{mesh.plan.relay_metrics_port}/metrics"),
                )
        except (MeshError, SetupError, OSError) as exc:
            console.print(f"slomesh fidelity: live mesh failed: {exc}")
            return 2
    live_report = build_report(live.results, trace=trace.name, policy=live.policy,
                               duration_s=live.duration_s, topology=topology)

    errors = relative_errors(live_report, sim_report)
    ok = all(e["relative_error"] <= args.target for e in errors.values())
    ok = ok and timing["within_limit"]
    table = Table(title=f"fidelity: simulator vs live mesh, {len(trace)} requests of "
                        f"{trace.name}, policy {args.policy}, rate scale {args.rate_scale:g}")
    for col in ("figure", "live", "sim", "relative error"):
        table.add_column(col, justify="right" if col != "figure" else "left")
    for name, e in errors.items():
        mark = "" if e["relative_error"] <= args.target else " [red]>target[/]"
        table.add_row(name, f"{e['live']:.3f}", f"{e['sim']:.3f}",
                      f"{e['relative_error'] * 100:.1f} %{mark}")
    Console().print(table)
    Console().print(f"completed live {live_report['completed']}/{live_report['requests']}, "
                    f"sim {sim_report['completed']}/{sim_report['requests']}; "
                    f"simulated in {outcome.wall_s:.2f} s wall")
    lags = timing["emulator_lag_p99_ms"]
    mark = "" if timing["within_limit"] else f" [red]> {MESH_LAG_LIMIT_MS:g} ms or re-based[/]"
    Console().print(
        f"live mesh timing: emulator step lag p99 <= {max(lags.values(), default=0):g} ms "
        f"(worst of {len(lags)}), {timing['emulator_lag_resyncs']} re-bases; WAN relay lag "
        f"p99 <= {timing['relay_lag_p99_ms']:g} ms over {timing['relay_chunks']} chunks{mark}"
    )
    if args.report_json:
        path = Path(args.report_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "trace": trace.name, "requests": len(trace), "policy": args.policy,
            "rate_scale": args.rate_scale, "target_relative_error": args.target,
            "within_target": ok, "errors": errors, "mesh_timing": timing,
            "live": live_report, "sim": sim_report,
        }, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
