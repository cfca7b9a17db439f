"""Two research questions answered with the simulator: each a function, a table and a plot.

::

    slomesh study-prefix-wan [--rtts-ms 10,50,100,200,300] [--prompt-tokens 1024,4096,16384]
                             [--requests N] [--gpu-type A100] [--plot PATH.png]
                             [--report-json PATH]
    slomesh study-heterogeneity [--trace PATH] [--limit N] [--rate-scale X]
                                [--policies slomesh,least-load] [--plot PATH.png]
                                [--report-json PATH]

(a) **When is crossing the WAN to the region that holds a prefix worth it?**
(`study_prefix_wan`). Two regions, ``local`` and ``remote``, one instance each of the same GPU
type, billed at the same prices (both in one cloud region, so that only the RTT differs), and
a synthetic RTT matrix with one RTT between them. For each (RTT, prompt length ``P``) the
simulator replays a small synthetic trace in two phases:

1. warm-up: ``N`` requests from origin ``remote``, each with its own shared prefix of
   ``P - TAIL_TOKENS`` tokens followed by a unique tail (the earlier turn of ``N``
   conversations), so that the remote instance caches the ``N`` prefixes;
2. measurement: ``N`` requests from origin ``local``, request ``k`` = prefix ``k`` + a new
   tail (the next turn); each prefix is measured once, so the local instance never holds it.

Requests are spaced far enough apart (``2 s + P / 2000 tokens/s``) that none queues behind
another: the TTFT difference is the physics -- ``RTT + prefill(tail)`` remote against
``prefill(P)`` local. Three placements are simulated on the same trace:

- **local** (recompute): the ``nearest`` policy (origin region first);
- **remote** (prefix holder): a profile allowing only the ``remote`` region, scored by
  prefix-cache hit (`PREFIX_HOLDER_PROFILE`); warm-up requests go there too;
- **slomesh**: the ``slomesh`` policy, which prices RTT, queue and uncached prefill.

Each row gives the mean client TTFT (WAN included) of the measured requests under each, the
benefit of going remote (``ttft_local - ttft_remote``, ms; > 0 means crossing the WAN pays),
and the fraction of measured requests slomesh placed in the remote region with their mean
TTFT. The plot draws the benefit against RTT, one line per prompt length; the break-even RTT
is where a line crosses 0.

(b) **How do SLO attainment and cost change as GPU types become more heterogeneous across
regions?** (`study_heterogeneity`). A ladder of topologies on the default three regions
(Washington DC / us-east-1, Frankfurt / eu-central-1, Tokyo / ap-northeast-1), six instances
each (two per region), from homogeneous to the default topology's mix (`HETEROGENEITY_LADDER`).
The **heterogeneity level** of a topology is the coefficient of variation of its instances'
peak dense BF16 FLOP/s: ``population std / mean`` over the six instances
(`slomesh.engine.profiles.GpuProfile.peak_flops`) -- 0 when all GPUs are alike, larger as the
fleet spreads between fast/expensive (H100) and slow/cheap (A10G, L4) types. Each rung is
simulated on the same trace slice at one fixed rate scale under each policy; a row gives SLO
attainment, cost per 1M served tokens (GPU-seconds model, and the whole fleet's cost over the
run, idle GPUs included), p90 TTFT, the fleet's hourly price and its total peak FLOP/s (the
rungs keep the instance count, not the raw compute, fixed). Defaults: the first 1000 requests
of the Azure conversation trace at 8x its rate (about 37 requests/s), a load at which the
homogeneous fleet attains about 90 %. The plot draws attainment and
fleet cost per 1M tokens against the level, one line per policy.

Exit codes of both commands: 0 on success, 2 for bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slomesh.engine.profiles import get_model_spec, get_profile
from slomesh.plots import save_figure
from slomesh.sim.simulator import SimConfig, Simulator
from slomesh.topology import DEFAULT_MODEL_NAME, Topology, shared_data_dir
from slomesh.traces import TOKEN_ID_HIGH, TOKEN_ID_LOW, Trace, TraceRequest

__all__ = [
    "HETEROGENEITY_LADDER",
    "LOCAL_REGION",
    "PREFIX_HOLDER_PROFILE",
    "REMOTE_REGION",
    "TAIL_TOKENS",
    "heterogeneity_ladder",
    "heterogeneity_level",
    "heterogeneity_main",
    "plot_heterogeneity",
    "plot_prefix_wan",
    "prefix_wan_main",
    "prefix_wan_topology",
    "prefix_wan_trace",
    "study_heterogeneity",
    "study_prefix_wan",
]

LOCAL_REGION = "local"
"""Region the measured requests of the prefix/WAN study come from (no prefix cached)."""
REMOTE_REGION = "remote"
"""Region that holds the prefixes in the prefix/WAN study."""
TAIL_TOKENS = 64
"""Tokens after the shared prefix in every prompt of the prefix/WAN study (a new turn)."""
_PREFIX_SEED = 0x50524658
_OUTPUT_TOKENS = 16

PREFIX_HOLDER_PROFILE: dict[str, Any] = {
    "name": "prefix-holder",
    "description": "Forces placement in the region holding the prefix (the remote region), "
    "preferring the instance with the longest cached prefix; never refuses.",
    "filters": [
        "healthy",
        "fresh",
        "serves-model",
        {"name": "region-allowlist", "params": {"regions": [REMOTE_REGION]}},
    ],
    "scorers": [{"name": "prefix-cache-hit", "weight": 1.0}],
    "picker": "max-score",
}
"""The policy that always routes to the prefix holder (study (a)'s "remote" arm)."""

_PREFIX_ARMS: dict[str, Any] = {
    "local": "nearest",
    "remote": PREFIX_HOLDER_PROFILE,
    "slomesh": "slomesh",
}


class _FixedPromptRequest(TraceRequest):
    """A trace request whose token ids are given (kept across `release_tokens`)."""

    def release_tokens(self) -> None:
        """Keeps the token ids: they cannot be rebuilt from a trace file."""


def _split_list(text: str, cast: Callable[[str], Any], flag: str) -> list[Any]:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: bad list {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: empty list")
    return values


# -- (a) prefix vs. WAN --------------------------------------------------------------------------


def prefix_wan_topology(
    rtt_ms: float, workdir: Path, gpu_type: str = "A100", cloud_region: str = "us-east-1"
) -> Topology:
    """The two-region topology of study (a): one ``gpu_type`` instance in each region.

    Both regions are billed in ``cloud_region`` (same prices); the RTT between them is
    ``rtt_ms``, from a CSV written into ``workdir`` (one file per RTT value).

    Args:
        rtt_ms: Round-trip time between ``local`` and ``remote``, ms (>= 0).
        workdir: Directory for the RTT matrix CSV.
        gpu_type: GPU type of both instances.
        cloud_region: Cloud region both are priced in (needs a price for ``gpu_type``).

    Raises:
        ValueError: negative or non-finite ``rtt_ms``.
        pydantic.ValidationError: no price for ``gpu_type`` in ``cloud_region``.
    """
    if not (rtt_ms >= 0 and math.isfinite(rtt_ms)):
        raise ValueError(f"rtt_ms: must be >= 0, got {rtt_ms}")
    rtt_path = Path(workdir) / f"rtt_{rtt_ms:g}ms.csv"
    rtt_path.write_text(
        f"src_region,dst_region,rtt_ms\nLocal,Remote,{rtt_ms:g}\nRemote,Local,{rtt_ms:g}\n",
        encoding="utf-8",
    )
    gpu = gpu_type.lower()
    return Topology.model_validate(
        {
            "model": {"name": DEFAULT_MODEL_NAME, "max_model_len": 32768},
            "rtt_file": str(rtt_path),
            "regions": [
                {
                    "name": name,
                    "location": name.capitalize(),
                    "cloud_region": cloud_region,
                    "egress_usd_per_gb": 0.02,
                    "instances": [{"id": f"{name}-{gpu}-0", "gpu_type": gpu_type}],
                }
                for name in (LOCAL_REGION, REMOTE_REGION)
            ],
        }
    )


def _spacing_s(prompt_tokens: int) -> float:
    """Gap between requests of study (a) so that none waits for another, seconds."""
    return 2.0 + prompt_tokens / 2000.0


def prefix_wan_trace(prompt_tokens: int, requests: int, seed: int = 0) -> Trace:
    """The two-phase trace of study (a) (module docstring).

    Args:
        prompt_tokens: Prompt length ``P`` of every request, tokens (> `TAIL_TOKENS`).
        requests: ``N``: prefixes, i.e. warm-up requests and measured requests (each N).
        seed: Seed of the synthetic token ids.

    Returns:
        ``2 N`` requests: ``warm-<k>`` from ``remote`` then ``measure-<k>`` from ``local``;
        output length 16 tokens, SLO class chat.

    Raises:
        ValueError: ``prompt_tokens <= TAIL_TOKENS`` or ``requests < 1``.
    """
    if prompt_tokens <= TAIL_TOKENS:
        raise ValueError(f"prompt_tokens: must be > {TAIL_TOKENS}, got {prompt_tokens}")
    if requests < 1:
        raise ValueError(f"requests: must be >= 1, got {requests}")
    spacing = _spacing_s(prompt_tokens)
    prefix_tokens = prompt_tokens - TAIL_TOKENS
    out: list[TraceRequest] = []
    for k in range(requests):
        rng = np.random.default_rng((_PREFIX_SEED, seed, prompt_tokens, k))
        ids = rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, size=prefix_tokens + 2 * TAIL_TOKENS)
        ids = ids.astype(np.uint32)
        prefix = ids[:prefix_tokens]
        for phase, origin, tail, t0 in (
            ("warm", REMOTE_REGION, ids[prefix_tokens : prefix_tokens + TAIL_TOKENS], 0.0),
            ("measure", LOCAL_REGION, ids[prefix_tokens + TAIL_TOKENS :], requests * spacing),
        ):
            out.append(
                _FixedPromptRequest(
                    request_id=f"{phase}-{k}",
                    index=len(out),
                    arrival_s=t0 + k * spacing,
                    prompt_tokens=prompt_tokens,
                    output_tokens=_OUTPUT_TOKENS,
                    origin_region=origin,
                    slo_class="chat",
                    _tokens=np.concatenate([prefix, tail]),
                )
            )
    out.sort(key=lambda r: r.arrival_s)
    return Trace(name="prefix-wan", path=Path("prefix-wan"), format="synthetic", requests=out)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _run_prefix_arm(topology: Topology, policy: Any, prompt_tokens: int, requests: int):
    sim = Simulator(topology, policy, SimConfig())
    outcome = sim.run(prefix_wan_trace(prompt_tokens, requests))
    warm = [r for r in outcome.records if r.request_id.startswith("warm-")]
    if any(r.region != REMOTE_REGION for r in warm):
        placed = sorted({r.region or r.error_code for r in warm})
        raise RuntimeError(f"warm-up requests were not all placed in {REMOTE_REGION}: {placed}")
    measured = [
        (rec, res)
        for rec, res in zip(outcome.records, outcome.results, strict=True)
        if rec.request_id.startswith("measure-")
    ]
    ttfts = [res.ttft_ms for _, res in measured if res.ok and res.ttft_ms is not None]
    return {
        "ttft_ms": _mean(ttfts),
        "remote_fraction": sum(rec.region == REMOTE_REGION for rec, _ in measured) / len(measured),
        "cached_prompt_tokens": _mean([res.cached_prompt_tokens for _, res in measured if res.ok]),
        "failed": sum(not res.ok for _, res in measured),
    }


def study_prefix_wan(
    rtts_ms: Sequence[float] = (10, 50, 100, 200, 300),
    prompt_tokens: Sequence[int] = (1024, 4096, 16384),
    requests: int = 4,
    gpu_type: str = "A100",
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Study (a): client TTFT routing to the prefix holder vs. recomputing locally.

    Args:
        rtts_ms: RTTs between the regions to sweep, ms.
        prompt_tokens: Prompt lengths to sweep, tokens (each > `TAIL_TOKENS`).
        requests: Measured requests (and prefixes) per cell.
        gpu_type: GPU type of both instances.
        progress: Optional ``(cells done, cells)`` callback.

    Returns:
        One row per (RTT, prompt length), RTT-major: ``rtt_ms``, ``prompt_tokens``,
        ``ttft_local_ms``, ``ttft_remote_ms``, ``benefit_remote_ms`` (local - remote; > 0:
        going remote pays), ``break_even_rtt_ms`` (the RTT at which the benefit would be 0:
        remote TTFT grows one-for-one with the RTT, local TTFT does not depend on it), ``cached_tokens_remote`` (mean prefix hit there),
        ``slomesh_remote_fraction``, ``ttft_slomesh_ms``, ``failed`` (measured requests that
        failed, all arms). TTFTs are means over the measured requests, ms, client side.

    Raises:
        ValueError: bad arguments.
        RuntimeError: a warm-up request was not placed in the remote region (the prefix
            would not be where the study assumes).
    """
    rows: list[dict[str, Any]] = []
    cells = len(rtts_ms) * len(prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="slomesh-prefix-wan-") as tmp:
        for rtt in rtts_ms:
            topology = prefix_wan_topology(float(rtt), Path(tmp), gpu_type)
            for p in prompt_tokens:
                arms = {
                    arm: _run_prefix_arm(topology, policy, int(p), requests)
                    for arm, policy in _PREFIX_ARMS.items()
                }
                local, remote, slo = arms["local"], arms["remote"], arms["slomesh"]
                benefit = (
                    local["ttft_ms"] - remote["ttft_ms"]
                    if local["ttft_ms"] is not None and remote["ttft_ms"] is not None
                    else None
                )
                rows.append(
                    {
                        "rtt_ms": float(rtt),
                        "prompt_tokens": int(p),
                        "ttft_local_ms": local["ttft_ms"],
                        "ttft_remote_ms": remote["ttft_ms"],
                        "benefit_remote_ms": benefit,
                        "break_even_rtt_ms": None if benefit is None else float(rtt) + benefit,
                        "cached_tokens_remote": remote["cached_prompt_tokens"],
                        "slomesh_remote_fraction": slo["remote_fraction"],
                        "ttft_slomesh_ms": slo["ttft_ms"],
                        "failed": sum(a["failed"] for a in arms.values()),
                    }
                )
                if progress is not None:
                    progress(len(rows), cells)
    return rows


def plot_prefix_wan(rows: Sequence[dict[str, Any]], path: str | Path, gpu_type: str) -> Path:
    """Draws the TTFT benefit of going remote against RTT, one line per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for p in sorted({r["prompt_tokens"] for r in rows}):
        pts = sorted(
            (r["rtt_ms"], r["benefit_remote_ms"])
            for r in rows
            if r["prompt_tokens"] == p and r["benefit_remote_ms"] is not None
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{p} prompt tokens")
    ax.axhline(0, color="grey", linestyle="--", linewidth=1, label="break-even")
    ax.set_xlabel("RTT between regions (ms)")
    ax.set_ylabel("TTFT local recompute - TTFT remote with prefix (ms)")
    ax.set_title(f"When is crossing the WAN to the prefix worth it? (1x {gpu_type} per region)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def prefix_wan_table(rows: Sequence[dict[str, Any]]):
    """The rich table of study (a)."""
    from rich.table import Table

    table = Table(title="Prefix across the WAN: mean client TTFT (ms)")
    for col in (
        "RTT ms",
        "prompt tok",
        "TTFT local",
        "TTFT remote+prefix",
        "benefit remote",
        "break-even RTT",
        "slomesh % remote",
        "TTFT slomesh",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['rtt_ms']:g}",
            str(r["prompt_tokens"]),
            _fmt(r["ttft_local_ms"]),
            _fmt(r["ttft_remote_ms"]),
            _fmt(r["benefit_remote_ms"], "+.0f"),
            _fmt(r["break_even_rtt_ms"]),
            f"{100 * r['slomesh_remote_fraction']:.0f}",
            _fmt(r["ttft_slomesh_ms"]),
        )
    return table


def prefix_wan_main(argv: Sequence[str] | None = None) -> int:
    """``slomesh study-prefix-wan``. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="slomesh study-prefix-wan",
        description="When is crossing the WAN to the region that holds a prefix worth it?",
    )
    parser.add_argument("--rtts-ms", default="10,50,100,200,300", help="RTTs to sweep, ms")
    parser.add_argument("--prompt-tokens", default="1024,4096,16384", help="prompt lengths")
    parser.add_argument("--requests", type=int, default=4, help="measured requests per cell")
    parser.add_argument("--gpu-type", default="A100", help="GPU type of both instances")
    parser.add_argument("--plot", default="prefix_wan.png", help="write the plot here")
    parser.add_argument("--report-json", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress

    try:
        rtts = _split_list(args.rtts_ms, float, "--rtts-ms")
        prompts = _split_list(args.prompt_tokens, int, "--prompt-tokens")
        get_profile(args.gpu_type)
        with Progress(console=Console(stderr=True)) as bar:
            task = bar.add_task("study-prefix-wan", total=len(rtts) * len(prompts))
            rows = study_prefix_wan(
                rtts,
                prompts,
                args.requests,
                args.gpu_type,
                progress=lambda done, _: bar.update(task, completed=done),
            )
    except (ValueError, KeyError, RuntimeError) as exc:
        print(f"slomesh study-prefix-wan: {exc}", file=sys.stderr)
        return 2
    Console().print(prefix_wan_table(rows))
    path = plot_prefix_wan(rows, args.plot, args.gpu_type)
    print(f"plot written to {path}", file=sys.stderr)
    if args.report_json:
        _write_json(
            args.report_json,
            {
                "study": "prefix-wan",
                "gpu_type": args.gpu_type,
                "tail_tokens": TAIL_TOKENS,
                "rows": rows,
            },
        )
    return 0


# -- (b) GPU heterogeneity -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """One topology of the heterogeneity ladder.

    Attributes:
        name: Short label.
        gpus: GPU types per default region, in region order (Washington DC, Frankfurt,
            Tokyo), two per region.
    """

    name: str
    gpus: tuple[tuple[str, ...], ...]


HETEROGENEITY_LADDER: tuple[Rung, ...] = (
    Rung("homogeneous", (("A100", "A100"), ("A100", "A100"), ("A100", "A100"))),
    Rung("two-types", (("A100", "L40S"), ("A100", "L40S"), ("A100", "L40S"))),
    Rung("plus-slow", (("A100", "L40S"), ("A100", "L40S"), ("L40S", "L4"))),
    Rung("plus-fast", (("H100", "A100"), ("A100", "L40S"), ("L40S", "L4"))),
    Rung("default", (("H100", "A10G"), ("A100", "L40S"), ("L40S", "L4"))),
)
"""From homogeneous to the default topology's mix; every GPU has a price in its region."""


def heterogeneity_level(topology: Topology) -> float:
    """Coefficient of variation (population std / mean) of per-instance peak FLOP/s.

    Returns:
        0.0 for a homogeneous fleet; larger for a more spread one (dimensionless).
    """
    flops = np.array(
        [get_profile(i.gpu_type).peak_flops for r in topology.regions for i in r.instances],
        dtype=float,
    )
    return float(flops.std() / flops.mean())


def heterogeneity_ladder(base: Topology | None = None) -> list[tuple[Rung, Topology]]:
    """The ladder's topologies on ``base``'s regions (default topology), in order.

    Raises:
        ValueError: ``base`` does not have three regions.
    """
    base = base if base is not None else Topology.default()
    if len(base.regions) != len(HETEROGENEITY_LADDER[0].gpus):
        raise ValueError(f"the ladder needs {len(HETEROGENEITY_LADDER[0].gpus)} regions")
    model = get_model_spec(base.model.name)

    def context(gpu_type: str) -> int:
        # The model's context where the GPU's KV cache holds it, else the largest power of two
        # it holds (vLLM refuses to start otherwise; the default topology does the same).
        capacity = get_profile(gpu_type).num_gpu_blocks(model, 16) * 16
        if capacity >= base.model.max_model_len:
            return base.model.max_model_len
        return 1 << (capacity.bit_length() - 1)

    out = []
    for rung in HETEROGENEITY_LADDER:
        data = base.model_dump(mode="json")
        for region, gpus in zip(data["regions"], rung.gpus, strict=True):
            prefix = region["name"][:3]
            region["instances"] = [
                {"id": f"{prefix}-{g.lower()}-{k}", "gpu_type": g, "max_model_len": context(g)}
                for k, g in enumerate(gpus)
            ]
        out.append((rung, Topology.model_validate(data)))
    return out


def default_trace_path() -> Path:
    """The Azure LLM 2023 conversation trace in the shared data directory."""
    return shared_data_dir() / "traces" / "azure_llm_2023_conv.csv"


def study_heterogeneity(
    trace: str | Path | None = None,
    limit: int = 1000,
    rate_scale: float = 8.0,
    policies: Sequence[str] = ("slomesh", "least-load"),
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Study (b): SLO attainment and cost along the heterogeneity ladder.

    Args:
        trace: Trace file (default: the Azure conversation trace).
        limit: Requests from the start of the trace.
        rate_scale: Arrival-rate scale (2 = twice the trace's rate), the same for every rung.
        policies: Policy names or YAML profiles.
        progress: Optional ``(simulations done, simulations)`` callback.

    Returns:
        One row per (rung, policy), rung-major: ``rung``, ``heterogeneity``, ``gpus``
        (comma-separated, region order), ``policy``, ``slo_attainment`` (0-1),
        ``cost_per_mtok_usd`` (GPU-seconds model), ``fleet_cost_per_mtok_usd`` (whole fleet
        over the run), ``ttft_p90_ms``, ``fleet_usd_per_hour``, ``fleet_peak_pflops`` (sum of
        the instances' peak dense BF16 PFLOP/s: the rungs differ in raw compute too, so read
        attainment together with it), ``requests``, ``failed`` (refused or unroutable).

    Raises:
        ValueError, FileNotFoundError: bad arguments or trace.
        slomesh.scheduler.policy.PolicyConfigError: unknown policy.
    """
    from slomesh.sim.cli import load_sim_trace, sim_report

    if limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    path = Path(trace) if trace is not None else default_trace_path()
    ladder = heterogeneity_ladder()
    rows: list[dict[str, Any]] = []
    total = len(ladder) * len(policies)
    for rung, topology in ladder:
        level = heterogeneity_level(topology)
        fleet_usd_per_hour = sum(
            topology.instance_price_usd_per_hour(i.id)
            for r in topology.regions
            for i in r.instances
        )
        fleet_peak_pflops = (
            sum(get_profile(i.gpu_type).peak_flops for r in topology.regions for i in r.instances)
            / 1e15
        )
        for policy in policies:
            tr = load_sim_trace(path, topology, limit=limit, rate_scale=rate_scale)
            report, _ = sim_report(tr, topology, policy, SimConfig())
            rows.append(
                {
                    "rung": rung.name,
                    "heterogeneity": level,
                    "gpus": " | ".join(",".join(g) for g in rung.gpus),
                    "policy": report["policy"],
                    "slo_attainment": report["slo_attainment"],
                    "cost_per_mtok_usd": report["cost_per_mtok_usd"],
                    "fleet_cost_per_mtok_usd": report["fleet_cost_per_mtok_usd"],
                    "ttft_p90_ms": report["ttft_ms"]["p90"],
                    "fleet_usd_per_hour": fleet_usd_per_hour,
                    "fleet_peak_pflops": fleet_peak_pflops,
                    "requests": report["requests"],
                    "failed": report["failed"],
                }
            )
            if progress is not None:
                progress(len(rows), total)
    return rows


def plot_heterogeneity(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Draws SLO attainment and fleet cost per 1M tokens against the heterogeneity level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_att, ax_cost) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True)
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted(
            (r["heterogeneity"], r["slo_attainment"], r["fleet_cost_per_mtok_usd"])
            for r in rows
            if r["policy"] == policy
        )
        xs = [p[0] for p in pts]
        ax_att.plot(xs, [100 * p[1] for p in pts], marker="o", label=policy)
        ax_cost.plot(xs, [p[2] for p in pts], marker="o", label=policy)
    ax_att.set_ylabel("SLO attainment (%)")
    ax_att.set_ylim(0, 102)
    ax_cost.set_ylabel("fleet cost per 1M tokens (USD)")
    ax_cost.set_xlabel("heterogeneity (CV of per-instance peak FLOP/s)")
    for ax in (ax_att, ax_cost):
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_att.set_title(title)
    return save_figure(fig, path)


def heterogeneity_table(rows: Sequence[dict[str, Any]]):
    """The rich table of study (b)."""
    from rich.table import Table

    table = Table(title="GPU heterogeneity across regions")
    for col in (
        "rung",
        "CV flops",
        "GPUs (wdc | fra | tyo)",
        "policy",
        "SLO att.",
        "failed",
        "$/1M tok (GPU-s)",
        "$/1M tok (fleet)",
        "p90 TTFT ms",
        "fleet $/h",
        "PFLOP/s",
    ):
        table.add_column(col, justify="left" if col in ("rung", "policy") else "right")
    for r in rows:
        table.add_row(
            r["rung"],
            f"{r['heterogeneity']:.2f}",
            r["gpus"],
            r["policy"],
            f"{100 * r['slo_attainment']:.1f} %",
            str(r["failed"]),
            f"{r['cost_per_mtok_usd']:.3f}",
            f"{r['fleet_cost_per_mtok_usd']:.2f}",
            f"{r['ttft_p90_ms']:.0f}",
            f"{r['fleet_usd_per_hour']:.2f}",
            f"{r['fleet_peak_pflops']:.2f}",
        )
    return table


def heterogeneity_main(argv: Sequence[str] | None = None) -> int:
    """``slomesh study-heterogeneity``. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="slomesh study-heterogeneity",
        description="SLO attainment and cost as GPU types get more heterogeneous across regions.",
    )
    parser.add_argument("--trace", default=None, help="trace (default: Azure conversation)")
    parser.add_argument("--limit", type=int, default=1000, help="requests from the trace start")
    parser.add_argument("--rate-scale", type=float, default=8.0, help="arrival-rate scale")
    parser.add_argument("--policies", default="slomesh,least-load", help="policies to compare")
    parser.add_argument("--plot", default="heterogeneity.png", help="write the plot here")
    parser.add_argument("--report-json", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress

    from slomesh.scheduler.policy import PolicyConfigError

    try:
        policies = _split_list(args.policies, str.strip, "--policies")
        trace = args.trace if args.trace else default_trace_path()
        with Progress(console=Console(stderr=True)) as bar:
            task = bar.add_task("study-heterogeneity", total=len(HETEROGENEITY_LADDER))
            rows = study_heterogeneity(
                trace,
                args.limit,
                args.rate_scale,
                policies,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (OSError, ValueError, PolicyConfigError) as exc:
        print(f"slomesh study-heterogeneity: {exc}", file=sys.stderr)
        return 2
    Console().print(heterogeneity_table(rows))
    title = f"{Path(trace).stem}: {args.limit} requests at rate scale {args.rate_scale:g}"
    path = plot_heterogeneity(rows, args.plot, title)
    print(f"plot written to {path}", file=sys.stderr)
    if args.report_json:
        _write_json(
            args.report_json,
            {
                "study": "heterogeneity",
                "trace": str(trace),
                "limit": args.limit,
                "rate_scale": args.rate_scale,
                "rows": rows,
            },
        )
    return 0


def _write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"report written to {path}", file=sys.stderr)
