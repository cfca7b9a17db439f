"""``slomesh bench``: the capacity of each placement policy on a trace, in the simulator.

::

    slomesh bench --trace PATH --policies a,b,... --report-json PATH [--plot PATH.png]
                  [--limit N] [--topology FILE] [--target-attainment 0.9] [--jobs 2]
                  [--fit-context] [simulation options of ``slomesh sim``] ...

**Capacity** (DESIGN.md section 5) is the highest arrival-rate scale at which at least the
target fraction (default 90 %) of requests attain their SLO -- DistServe's definition: TTFT and
TPOT both met; a request that is refused, cannot be routed or fails counts as not attaining it.
For each policy it is found by bisection on the rate scale, in the simulator (`slomesh.sim`):

1. bracket: start at ``--start-scale`` (1.0); while the target is met, double the scale (up to
   ``--max-scale``); while it is missed, halve it (down to ``--min-scale``);
2. bisect the bracket ``[lo, hi]`` (lo meets the target, hi misses it) at its geometric mean
   until ``hi / lo <= 1 + --tolerance``; the capacity is ``lo``.

A policy that still meets the target at ``--max-scale`` gets ``max_scale`` as a lower bound
(``capacity_bound: "lower_bound"``); one that misses it at ``--min-scale`` gets capacity 0
(``"none"``). Attainment need not fall monotonically with the rate; bisection finds one
crossing, which is what the definition asks for.

Reported per policy, at its capacity: the rate scale and the offered rate (requests/s),
goodput per GPU (requests/s attaining their SLO, per instance), cost per million served tokens
(the report's request-attributed ``cost_per_mtok_usd``, and ``fleet_cost_per_mtok_usd``: the
whole fleet's price over the run, idle GPUs included), cross-region bytes, p50/p90 TTFT and
TPOT, and the capacity as a ratio to the best baseline (baselines: every policy but
``slomesh`` and ``oracle``). Every evaluated point is kept, and one PNG shows SLO attainment
against the rate scale for all policies.

**Equal load** (``equal_load`` in the report, the table's last two columns, one printed line
per non-baseline): capacities alone hide what a policy pays for its headroom, so once every
baseline's bisection is done, every policy is also run at one common rate scale -- the best
baseline's capacity, the highest load some baseline just carries (a point a bisection already
evaluated is reused). There each policy's SLO attainment and ``cost_per_mtok_usd`` are
reported, the cheapest baseline among those attaining the target there is named, and each
non-baseline gets ``cost_le_cheapest_baseline``: whether it costs no more per million tokens
than that baseline (issue 4's criterion).

Requests longer than every instance's context fail under any policy and count against the
target; the report gives their number (``oversized_requests``), and ``--fit-context`` drops them
from the trace first (``dropped_oversized_requests``). The Mooncake conversation trace's
3 s timestamp bins are spread over each bin when it is loaded (`slomesh.traces`); with
``--burst-bins`` each bin arrives as one burst, which no rate scale spreads.

Points run in parallel worker processes (``--jobs``, default 2): the bisections of different
policies advance side by side.

KV moves: ``--kv-moves off`` runs every policy with its profile's ``kv_moves`` and
``kv_prefetch`` turned off (named ``<policy>-no-kv-moves``); ``--kv-moves both`` runs each
policy whose profile moves or prefetches KV both ways, side by side (``slomesh`` and
``slomesh-no-kv-moves``). The table's ``KV moves`` and ``cross-region KV MB`` columns show the
prefix KV moved across regions at each policy's capacity (also in the report's
``cross_region_bytes``, which counts every byte crossing regions).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slomesh.plots import save_figure

__all__ = [
    "NOT_BASELINES",
    "NO_KV_MOVES_SUFFIX",
    "BenchSettings",
    "Bisection",
    "capacity_table",
    "equal_load_comparison",
    "equal_load_summary",
    "main",
    "plot_attainment",
    "policy_source",
    "run_bench",
    "with_kv_moves",
]

NOT_BASELINES = frozenset({"slomesh", "oracle"})
"""Policies that are not baselines (slomesh itself and its oracle variant)."""

NO_KV_MOVES_SUFFIX = "-no-kv-moves"
"""Suffix of a policy run with its profile's KV moves and prefetch off (``--kv-moves``)."""


def policy_source(policy: str) -> str | dict[str, Any]:
    """What `slomesh.sim.Simulator` builds a benchmarked policy from: the name or YAML path
    itself, or for ``<policy>-no-kv-moves`` that policy's profile with ``kv_moves`` off and
    no ``kv_prefetch``, named so.

    Raises:
        slomesh.scheduler.policy.PolicyConfigError: an unknown policy.
    """
    if not policy.endswith(NO_KV_MOVES_SUFFIX):
        return policy
    from slomesh.scheduler.policy import load_profile

    profile = load_profile(policy[: -len(NO_KV_MOVES_SUFFIX)]).model_dump()
    profile.update(name=policy, kv_moves=False, kv_prefetch={})
    return profile


def with_kv_moves(policies: Sequence[str], mode: str) -> list[str]:
    """The policies a ``--kv-moves`` mode runs (module docstring).

    Args:
        policies: Policy names or YAML profile paths.
        mode: ``profile`` (as given), ``off`` (every policy without KV moves) or ``both``
            (each policy that moves or prefetches KV also without).

    Raises:
        ValueError: an unknown mode.
        slomesh.scheduler.policy.PolicyConfigError: an unknown policy.
    """
    from slomesh.scheduler.policy import load_profile

    if mode not in ("profile", "off", "both"):
        raise ValueError(f"--kv-moves: must be profile, off or both, got {mode!r}")
    out: list[str] = []
    for p in policies:
        profile = load_profile(p)
        moves = profile.kv_moves or bool(profile.kv_prefetch)
        if mode != "off" or not moves:
            out.append(p)
        if moves and mode in ("off", "both"):
            out.append(p + NO_KV_MOVES_SUFFIX)
    return out


@dataclass
class Bisection:
    """Bisection on the rate scale for the highest scale meeting the target attainment.

    Feed it points with `record` and ask `next_scale` for the next one to evaluate
    (``None`` when done). See the module docstring for the procedure.

    Args:
        target: Target SLO attainment, in (0, 1].
        start_scale: First scale evaluated (> 0).
        min_scale: Smallest scale tried while bracketing downwards (> 0).
        max_scale: Largest scale tried while bracketing upwards (>= start_scale).
        tolerance: Stop when ``hi / lo <= 1 + tolerance`` (> 0).
        max_points: Most points evaluated (>= 1); the best bracket so far is kept.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """

    target: float = 0.9
    start_scale: float = 1.0
    min_scale: float = 1.0 / 64
    max_scale: float = 64.0
    tolerance: float = 0.05
    max_points: int = 16
    points: list[tuple[float, float]] = field(default_factory=list)
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"target: must be in (0, 1], got {self.target}")
        if not 0 < self.min_scale <= self.start_scale <= self.max_scale:
            raise ValueError(
                "min_scale <= start_scale <= max_scale must hold with min_scale > 0, got "
                f"{self.min_scale}, {self.start_scale}, {self.max_scale}"
            )
        if self.tolerance <= 0:
            raise ValueError(f"tolerance: must be > 0, got {self.tolerance}")
        if self.max_points < 1:
            raise ValueError(f"max_points: must be >= 1, got {self.max_points}")

    def record(self, scale: float, attainment: float) -> None:
        """Records the attainment measured at ``scale``."""
        self.points.append((scale, attainment))
        if attainment >= self.target:
            if self.lo is None or scale > self.lo:
                self.lo = scale
        elif self.hi is None or scale < self.hi:
            self.hi = scale

    def next_scale(self) -> float | None:
        """The next scale to evaluate, or None when the capacity is known."""
        if len(self.points) >= self.max_points:
            return None
        if not self.points:
            return self.start_scale
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None and lo > hi:
            # Non-monotonic attainment: a higher scale met the target than one that missed it.
            # Keep bisecting above the highest passing scale.
            hi = min((s for s, a in self.points if a < self.target and s > lo), default=None)
        if lo is None:
            below = min(s for s, _ in self.points) / 2.0
            return below if below >= self.min_scale * (1 - 1e-9) else None
        if hi is None:
            above = lo * 2.0
            return above if above <= self.max_scale * (1 + 1e-9) else None
        if hi / lo <= 1.0 + self.tolerance:
            return None
        return math.sqrt(lo * hi)

    @property
    def done(self) -> bool:
        """Whether no more points are needed."""
        return self.next_scale() is None

    @property
    def capacity_scale(self) -> float:
        """The highest scale found that meets the target (0 when none did)."""
        return self.lo if self.lo is not None else 0.0

    @property
    def bound(self) -> str:
        """``"exact"`` (bracketed), ``"lower_bound"`` (still met at the largest scale tried)
        or ``"none"`` (missed at every scale tried)."""
        if self.lo is None:
            return "none"
        failing_above = any(a < self.target and s > self.lo for s, a in self.points)
        return "exact" if failing_above else "lower_bound"


@dataclass(frozen=True)
class BenchSettings:
    """What every point of a benchmark shares (picklable, sent to the workers).

    Attributes:
        trace: Trace file.
        trace_format: "auto", "azure" or "mooncake".
        limit: Requests taken from the start of the trace (None = all).
        topology: Topology YAML (None = the default topology).
        slo_config: SLO classes YAML (None = built-in).
        slo_class: SLO class of every request (None = the trace's default).
        region_shares: Origin weights (None = equal).
        system_prompt_tokens: Azure only: shared system prompt length.
        fit_context: Drop requests no instance's context can hold (`load_sim_trace`).
        burst_bins: Replay a binned trace's timestamp bins as bursts (`load_sim_trace`).
        sim: `SimConfig` fields.
    """

    trace: str
    trace_format: str = "auto"
    limit: int | None = None
    topology: str | None = None
    slo_config: str | None = None
    slo_class: str | None = None
    region_shares: tuple[tuple[str, float], ...] | None = None
    system_prompt_tokens: int = 0
    fit_context: bool = False
    burst_bins: bool = False
    sim: tuple[tuple[str, Any], ...] = ()


def _topology(settings: BenchSettings):
    from slomesh.topology import Topology

    return Topology.load(settings.topology) if settings.topology else Topology.default()


def _load(settings: BenchSettings, rate_scale: float):
    from slomesh.sim.cli import drop_oversized, load_sim_trace

    topology = _topology(settings)
    trace = load_sim_trace(
        settings.trace,
        topology,
        trace_format=settings.trace_format,
        limit=settings.limit,
        rate_scale=rate_scale,
        slo_class=settings.slo_class,
        region_shares=dict(settings.region_shares) if settings.region_shares else None,
        system_prompt_tokens=settings.system_prompt_tokens,
        burst_bins=settings.burst_bins,
    )
    if settings.fit_context:
        drop_oversized(trace, topology)
    return topology, trace


def evaluate_point(settings: BenchSettings, policy: str, rate_scale: float) -> dict[str, Any]:
    """Simulates the trace at one rate scale under one policy; returns the full report.

    Runs in a worker process (module-level so that it pickles).
    """
    from slomesh.sim.cli import sim_report
    from slomesh.sim.simulator import SimConfig
    from slomesh.slo import load_slo_config

    topology, trace = _load(settings, rate_scale)
    report, _ = sim_report(
        trace,
        topology,
        policy_source(policy),
        SimConfig(**dict(settings.sim)),
        load_slo_config(settings.slo_config),
    )
    report["offered_rps"] = len(trace) / trace.duration_s if trace.duration_s > 0 else 0.0
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The per-point numbers kept for every evaluated point."""
    return {
        "rate_scale": report["rate_scale"],
        "offered_rps": report["offered_rps"],
        "slo_attainment": report["slo_attainment"],
        "completed": report["completed"],
        "failed": report["failed"],
        "errors": report["errors"],
        "goodput_rps": report["goodput_rps"],
        "goodput_rps_per_gpu": report["goodput_rps_per_gpu"],
        "cost_per_mtok_usd": report["cost_per_mtok_usd"],
        "fleet_cost_per_mtok_usd": report["fleet_cost_per_mtok_usd"],
        "cross_region_bytes": report["cross_region_bytes"],
        "cross_region_kv_bytes": report.get("cross_region_kv_bytes", 0),
        "kv_moves": report.get("kv_moves", 0),
        "ttft_ms": {k: report["ttft_ms"][k] for k in ("p50", "p90", "p99")},
        "tpot_ms": {k: report["tpot_ms"][k] for k in ("p50", "p90", "p99")},
        "sim_wall_s": report["sim"]["wall_s"],
        "queue_wait_error": report.get("queue_wait_error"),
    }


def run_bench(
    settings: BenchSettings,
    policies: Sequence[str],
    *,
    target: float = 0.9,
    start_scale: float = 1.0,
    min_scale: float = 1.0 / 64,
    max_scale: float = 64.0,
    tolerance: float = 0.05,
    max_points: int = 16,
    jobs: int = 2,
    on_point: Callable[[str, dict[str, Any], Bisection], None] | None = None,
) -> dict[str, Any]:
    """Finds every policy's capacity (module docstring) and returns the benchmark report.

    Args:
        settings: Trace, topology and simulation settings.
        policies: Policy names or YAML profile paths (at least one, no duplicates).
        target: Target SLO attainment.
        start_scale, min_scale, max_scale, tolerance, max_points: Bisection parameters.
        jobs: Worker processes (1 = evaluate in this process).
        on_point: Called in this process after each point with (policy, point summary,
            the policy's bisection).

    Returns:
        ``{"trace", "requests", "target_attainment", "base_rate_rps", "gpus", "baselines",
        "best_baseline", "wall_s", "policies": {name: {...}}, "equal_load"}`` (see
        `_policy_result`; ``equal_load``: `equal_load_comparison` at the best baseline's
        capacity, None when there is no baseline or none meets the target at any scale).

    Raises:
        ValueError: no policy, a duplicate, a bad bisection parameter, or an empty trace.
        slomesh.scheduler.policy.PolicyConfigError: an unknown policy.
    """
    from slomesh.scheduler.policy import make_policy

    if not policies:
        raise ValueError("policies: name at least one policy")
    if len(set(policies)) != len(policies):
        raise ValueError(f"policies: duplicates in {list(policies)}")
    for name in policies:
        make_policy(policy_source(name))  # fail before any work on an unknown policy
    topology, trace = _load(settings, 1.0)
    if not trace.requests:
        raise ValueError(f"trace {settings.trace} has no requests")
    base_rate = len(trace) / trace.duration_s if trace.duration_s > 0 else 0.0
    gpus = sum(len(r.instances) for r in topology.regions)
    t0 = time.perf_counter()
    searches = {
        p: Bisection(target, start_scale, min_scale, max_scale, tolerance, max_points)
        for p in policies
    }
    reports: dict[str, dict[float, dict[str, Any]]] = {p: {} for p in policies}
    baselines = [
        p
        for p in policies
        if _policy_name(p).removesuffix(NO_KV_MOVES_SUFFIX) not in NOT_BASELINES
    ]
    equal_load_sent: set[str] = set()

    def equal_load_scale() -> float | None:
        """The best baseline's capacity once every baseline's bisection is done."""
        if not baselines or not all(searches[b].done for b in baselines):
            return None
        return max(searches[b].capacity_scale for b in baselines) or None

    def next_point(policy: str) -> tuple[float, bool] | None:
        """(scale, is a bisection point) of the policy's next point; None when it has none."""
        scale = searches[policy].next_scale()
        if scale is not None:
            return scale, True
        common = equal_load_scale()
        if common is None or common in reports[policy] or policy in equal_load_sent:
            return None
        return common, False

    def handle(policy: str, scale: float, bisecting: bool, report: dict[str, Any]) -> None:
        reports[policy][scale] = report
        if bisecting:
            searches[policy].record(scale, report["slo_attainment"])
        if on_point is not None:
            on_point(policy, _summary(report), searches[policy])

    if jobs <= 1:
        while todo := next(
            ((p, nxt) for p in policies if (nxt := next_point(p)) is not None), None
        ):
            policy, (scale, bisecting) = todo
            if not bisecting:
                equal_load_sent.add(policy)
            handle(policy, scale, bisecting, evaluate_point(settings, policy, scale))
    else:
        # spawn, not fork: the parent runs threads (progress display) that fork would not copy.
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            running: dict[cf.Future, tuple[str, float, bool]] = {}
            while True:
                busy = {p for p, _, _ in running.values()}
                for policy in policies:
                    if policy in busy or (nxt := next_point(policy)) is None:
                        continue
                    scale, bisecting = nxt
                    if not bisecting:
                        equal_load_sent.add(policy)
                    fut = pool.submit(evaluate_point, settings, policy, scale)
                    running[fut] = (policy, scale, bisecting)
                if not running:
                    break
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    policy, scale, bisecting = running.pop(fut)
                    handle(policy, scale, bisecting, fut.result())

    results = {p: _policy_result(searches[p], reports[p]) for p in policies}
    best = max(baselines, key=lambda p: results[p]["capacity_rate_scale"], default=None)
    best_capacity = results[best]["capacity_rate_scale"] if best is not None else 0.0
    common = equal_load_scale()
    equal_load = (
        None
        if common is None
        else equal_load_comparison(
            {p: _summary(reports[p][common]) for p in policies}, baselines, target, common
        )
    )
    for p in policies:
        cap = results[p]["capacity_rate_scale"]
        results[p]["ratio_to_best_baseline"] = cap / best_capacity if best_capacity > 0 else None
    from slomesh.sim.cli import oversized_requests

    dropped = 0
    if settings.fit_context:
        _, whole = _load(dataclasses.replace(settings, fit_context=False), 1.0)
        dropped = oversized_requests(whole, topology)
    return {
        "trace": trace.name,
        "requests": len(trace),
        "oversized_requests": oversized_requests(trace, topology),
        "dropped_oversized_requests": dropped,
        "target_attainment": target,
        "base_rate_rps": base_rate,
        "gpus": gpus,
        "topology": settings.topology or "default",
        "sim": dict(settings.sim),
        "baselines": baselines,
        "best_baseline": best,
        "wall_s": time.perf_counter() - t0,
        "policies": results,
        "equal_load": equal_load,
    }


def equal_load_comparison(
    points: dict[str, dict[str, Any]],
    baselines: Sequence[str],
    target: float,
    rate_scale: float,
) -> dict[str, Any]:
    """Compares every policy's cost at one common load (module docstring, "Equal load").

    Args:
        points: Policy -> its point summary (`_summary`) at `rate_scale`; every policy of the
            benchmark, baselines included.
        baselines: The policies of `points` that are baselines.
        target: Target SLO attainment, in (0, 1].
        rate_scale: The common rate scale (the best baseline's capacity).

    Returns:
        ``{"rate_scale", "cheapest_baseline", "cheapest_baseline_cost_per_mtok_usd",
        "policies": {name: {"slo_attainment", "cost_per_mtok_usd", "fleet_cost_per_mtok_usd",
        "attains_target"}}}``; ``cheapest_baseline`` is the baseline with the lowest
        ``cost_per_mtok_usd`` among those attaining `target` at this load (None if none does:
        its cost is then None too). Each policy that is not a baseline also gets
        ``cost_le_cheapest_baseline``: its ``cost_per_mtok_usd`` is at most the cheapest
        baseline's (None without a cheapest baseline).
    """
    rows: dict[str, dict[str, Any]] = {
        p: {
            "slo_attainment": pt["slo_attainment"],
            "cost_per_mtok_usd": pt["cost_per_mtok_usd"],
            "fleet_cost_per_mtok_usd": pt["fleet_cost_per_mtok_usd"],
            "attains_target": pt["slo_attainment"] >= target,
        }
        for p, pt in points.items()
    }
    attaining = [b for b in baselines if rows[b]["attains_target"]]
    cheapest = min(attaining, key=lambda b: rows[b]["cost_per_mtok_usd"], default=None)
    cost = rows[cheapest]["cost_per_mtok_usd"] if cheapest is not None else None
    for p, row in rows.items():
        if p not in baselines:
            row["cost_le_cheapest_baseline"] = (
                None if cost is None else row["cost_per_mtok_usd"] <= cost
            )
    return {
        "rate_scale": rate_scale,
        "cheapest_baseline": cheapest,
        "cheapest_baseline_cost_per_mtok_usd": cost,
        "policies": rows,
    }


def equal_load_summary(bench: dict[str, Any]) -> list[str]:
    """One line per policy that is not a baseline: its cost at the equal load against the
    cheapest baseline attaining the target there (empty without an equal-load comparison)."""
    eq = bench.get("equal_load")
    if not eq:
        return []
    scale, cheapest = eq["rate_scale"], eq["cheapest_baseline"]
    target = bench["target_attainment"] * 100
    lines = []
    for name, row in eq["policies"].items():
        if "cost_le_cheapest_baseline" not in row:
            continue
        head = (
            f"at equal load x{scale:.3g} ({bench['best_baseline']}'s capacity): {name} "
            f"${row['cost_per_mtok_usd']:.4f}/Mtok, {row['slo_attainment'] * 100:.1f} % SLO "
            "attainment; "
        )
        if cheapest is None:
            lines.append(head + f"no baseline attains {target:.0f} % there")
            continue
        verdict = "yes" if row["cost_le_cheapest_baseline"] else "NO"
        if not row["attains_target"]:
            verdict += f" (but it misses {target:.0f} % itself)"
        lines.append(
            head + f"cheapest baseline attaining {target:.0f} %: {cheapest} "
            f"${eq['cheapest_baseline_cost_per_mtok_usd']:.4f}/Mtok; "
            f"{name} costs no more: {verdict}"
        )
    return lines


def _policy_name(source: str) -> str:
    """A policy's name: built-in names as given, YAML profiles by their ``name`` field."""
    from slomesh.scheduler.policy import make_policy

    return make_policy(policy_source(source)).name


def _policy_result(search: Bisection, reports: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """One policy's entry: capacity and the numbers at it, every point, the full report."""
    scale = search.capacity_scale
    at = reports.get(scale)
    points = [_summary(reports[s]) for s in sorted(reports)]
    out: dict[str, Any] = {
        "capacity_rate_scale": scale,
        "capacity_bound": search.bound,
        "capacity_rps": at["offered_rps"] if at else 0.0,
        "points": points,
    }
    if at is not None:
        summary = _summary(at)
        for key in (
            "slo_attainment",
            "goodput_rps_per_gpu",
            "cost_per_mtok_usd",
            "fleet_cost_per_mtok_usd",
            "cross_region_bytes",
            "cross_region_kv_bytes",
            "kv_moves",
            "ttft_ms",
            "tpot_ms",
        ):
            out[key] = summary[key]
        out["report"] = at
    return out


def capacity_table(bench: dict[str, Any]):
    """The benchmark as a rich table (one row per policy)."""
    from rich.table import Table

    table = Table(
        title=(
            f"capacity at >= {bench['target_attainment'] * 100:.0f} % SLO attainment -- "
            f"{bench['trace']} ({bench['requests']} requests, base rate "
            f"{bench['base_rate_rps']:.2f} req/s, {bench['gpus']} GPUs"
            + (
                f", {bench['oversized_requests']} longer than any context"
                if bench.get("oversized_requests")
                else ""
            )
            + (
                f", {bench['dropped_oversized_requests']} too long dropped"
                if bench.get("dropped_oversized_requests")
                else ""
            )
            + ")"
        )
    )
    for col in (
        "policy",
        "capacity (x)",
        "req/s",
        "goodput/GPU",
        "$/Mtok",
        "$/Mtok fleet",
        "cross-region MB",
        "KV moves",
        "cross-region KV MB",
        "TTFT p50/p90 ms",
        "TPOT p50/p90 ms",
        "vs best baseline",
    ):
        table.add_column(col, justify="left" if col == "policy" else "right")
    eq = bench.get("equal_load")
    if eq:
        # Every policy at the best baseline's capacity; * marks the cheapest baseline there.
        table.add_column(f"SLO att. @x{eq['rate_scale']:.3g}", justify="right")
        table.add_column(f"$/Mtok @x{eq['rate_scale']:.3g}", justify="right")
    for name, r in bench["policies"].items():
        cap = r["capacity_rate_scale"]
        bound = {"exact": "", "lower_bound": ">=", "none": ""}[r["capacity_bound"]]
        ratio = r.get("ratio_to_best_baseline")
        if "ttft_ms" in r:
            ttft = f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p90']:.0f}"
            tpot = f"{r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p90']:.1f}"
            cols = [
                f"{r['goodput_rps_per_gpu']:.3f}",
                f"{r['cost_per_mtok_usd']:.3f}",
                f"{r['fleet_cost_per_mtok_usd']:.3f}",
                f"{r['cross_region_bytes'] / 1e6:.1f}",
                str(r.get("kv_moves", 0)),
                f"{r.get('cross_region_kv_bytes', 0) / 1e6:.1f}",
                ttft,
                tpot,
            ]
        else:
            cols = ["-"] * 8
        table.add_row(
            name,
            f"{bound}{cap:.3g}",
            f"{r['capacity_rps']:.2f}",
            *cols,
            "-" if ratio is None else f"{ratio:.2f}",
            *(_equal_load_cells(eq, name) if eq else ()),
        )
    return table


def _equal_load_cells(eq: dict[str, Any], name: str) -> list[str]:
    """The policy's attainment and $/Mtok at the equal load (`capacity_table`)."""
    row = eq["policies"][name]
    mark = "*" if name == eq["cheapest_baseline"] else ""
    return [f"{row['slo_attainment'] * 100:.1f} %", f"{mark}{row['cost_per_mtok_usd']:.3f}"]


def plot_attainment(bench: dict[str, Any], path: str | Path) -> Path:
    """Draws SLO attainment against the rate scale for every policy into one PNG.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, r in bench["policies"].items():
        pts = sorted((p["rate_scale"], p["slo_attainment"]) for p in r["points"])
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        (line,) = ax.plot(xs, [y * 100 for y in ys], marker="o", label=name)
        cap = r["capacity_rate_scale"]
        if cap > 0:
            ax.axvline(cap, color=line.get_color(), linestyle=":", linewidth=1)
    target = bench["target_attainment"] * 100
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0f} %")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel(f"rate scale (1 = {bench['base_rate_rps']:.2f} req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"{bench['trace']}: SLO attainment vs. request rate ({bench['requests']} req)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


DEFAULT_LIMIT = 2000
"""Requests simulated per point by default (``--limit 0`` = the whole trace)."""


def main(argv: Sequence[str] | None = None) -> int:
    """``slomesh bench``. Returns the exit code (2 for bad arguments or inputs)."""
    from slomesh.sim.cli import add_sim_arguments, parse_region_shares, sim_config_from_args

    parser = argparse.ArgumentParser(
        prog="slomesh bench", description="Capacity of placement policies (simulator)."
    )
    add_sim_arguments(parser)
    parser.add_argument("--policies", required=True,
                        help="comma-separated policy names or YAML profiles")
    parser.add_argument("--report-json", required=True, help="write the benchmark here")
    parser.add_argument("--plot", default=None, help="write the attainment plot (PNG) here")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help=f"requests per point (default {DEFAULT_LIMIT}; 0 = whole trace)")
    parser.add_argument("--target-attainment", type=float, default=0.9)
    parser.add_argument("--start-scale", type=float, default=1.0)
    parser.add_argument("--min-scale", type=float, default=1.0 / 64)
    parser.add_argument("--max-scale", type=float, default=64.0)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="stop bisecting when hi/lo <= 1 + tolerance")
    parser.add_argument("--max-points", type=int, default=16, help="most points per policy")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--kv-moves", default="profile", choices=["profile", "off", "both"],
                        help="KV moves and prefetch as each profile says (default), off for "
                             "every policy, or both ways for each policy that has them")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from slomesh.scheduler.policy import PolicyConfigError
    from slomesh.slo import SloConfigError, load_slo_config

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    err = Console(stderr=True)
    try:
        policies = with_kv_moves(policies, args.kv_moves)
        config = sim_config_from_args(args)
        load_slo_config(args.slo_config)
        shares = parse_region_shares(args.region_shares)
        if args.limit < 0:
            raise ValueError(f"--limit: must be >= 0, got {args.limit}")
        if args.jobs < 1:
            raise ValueError(f"--jobs: must be >= 1, got {args.jobs}")
        Bisection(args.target_attainment, args.start_scale, args.min_scale, args.max_scale,
                  args.tolerance, args.max_points)
        settings = BenchSettings(
            trace=args.trace,
            trace_format=args.format,
            limit=args.limit or None,
            topology=args.topology,
            slo_config=args.slo_config,
            slo_class=args.slo_class,
            region_shares=tuple(sorted(shares.items())) if shares else None,
            system_prompt_tokens=args.system_prompt_tokens,
            fit_context=args.fit_context,
            burst_bins=args.burst_bins,
            sim=tuple(dataclasses.asdict(config).items()),
        )
        progress = Progress(
            TextColumn("[bold]{task.description:<12}"),
            BarColumn(),
            TextColumn("{task.fields[points]:>2} points"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=err,
            disable=args.no_progress,
        )
        with progress:
            tasks = {
                p: progress.add_task(p, total=args.max_points, points=0, status="starting")
                for p in policies
            }

            def on_point(policy: str, point: dict[str, Any], search: Bisection) -> None:
                lo = "-" if search.lo is None else f"{search.lo:.3g}"
                hi = "-" if search.hi is None else f"{search.hi:.3g}"
                status = (
                    f"x{point['rate_scale']:.3g}: {point['slo_attainment'] * 100:.1f} %  "
                    f"[{lo}, {hi}]"
                )
                done = search.done
                progress.update(
                    tasks[policy],
                    completed=args.max_points if done else len(search.points),
                    points=len(search.points),
                    status=("done " if done else "") + status,
                )

            bench = run_bench(
                settings,
                policies,
                target=args.target_attainment,
                start_scale=args.start_scale,
                min_scale=args.min_scale,
                max_scale=args.max_scale,
                tolerance=args.tolerance,
                max_points=args.max_points,
                jobs=args.jobs,
                on_point=on_point,
            )
    except (OSError, ValueError, PolicyConfigError, SloConfigError) as exc:
        print(f"slomesh bench: {exc}", file=sys.stderr)
        return 2
    # A wide table; when stdout is not a terminal, do not wrap it at 80 columns.
    Console(width=None if sys.stdout.isatty() else 160).print(capacity_table(bench))
    for line in equal_load_summary(bench):
        print(line)
    path = Path(args.report_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench, indent=2) + "\n")
    err.print(f"benchmark written to {path} ({bench['wall_s']:.0f} s)")
    if args.plot:
        err.print(f"plot written to {plot_attainment(bench, args.plot)}")
    return 0
