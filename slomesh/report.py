"""The evaluation report of a replay (DESIGN.md section 6) and its table printer.

The report is built from one `RequestResult` per request. Its section-6 keys are never renamed;
added keys: ``per_origin``, ``duration_s``, ``throughput_rps``, ``goodput_rps``,
``gpu_cost_usd``, ``predicted_gpu_cost_usd``, ``predicted_cost_per_mtok_usd``,
``egress_cost_usd``, ``prompt_tokens``, ``completion_tokens``,
``cached_prompt_tokens``, ``prefix_hit_rate`` (cached / prompt tokens of completed requests),
``cross_region_requests``, ``client_send_lag_ms``, ``errors`` (count per error code),
``cross_region_kv_bytes`` and ``kv_moves`` (prefix KV moved across regions before requests
ran, and how many requests waited for such a move), and ``mean``/``max``/``count`` inside each
latency summary.

Definitions:

- A request *attains* its SLO when it completed and its class's ``attained(ttft_ms, tpot_ms,
  e2e_ms, prompt_tokens)`` holds (DistServe's definition, `slomesh.slo`). A failed request
  counts in ``failed`` and as not attaining. ``slo_attainment`` = attained / requests.
- Latency percentiles (numpy, linear interpolation) are over completed requests. TPOT is
  taken over completed requests with at least 2 output tokens (TPOT is undefined for one).
  An empty set reports 0.0 with ``count`` 0.
- ``per_region`` is keyed by the *serving* region (requests placed there, completed or not);
  a request that failed before any placement is in no ``per_region`` entry. ``per_origin`` is
  keyed by the origin region and holds every request.
- Cross-region bytes (payload model): when the serving region differs from the origin, the
  prompt crosses the WAN once and the output once, ``bytes_per_token`` (default 4, a uint32
  token id) each: ``(prompt_tokens + completion_tokens) * bytes_per_token``. Protocol framing
  (HTTP/2, protobuf tags, timestamps) is not counted. A request whose placement moved prefix
  KV from another region first (``kv_transfer_bytes``) adds those bytes too; they are also
  reported alone as ``cross_region_kv_bytes``.
- Cost: ``gpu_cost_usd`` is the sum of each served request's GPU cost: *measured*,
  ``gpu_seconds x price_usd_per_hour / 3600``, where the caller measured its GPU seconds (the
  simulator does: each engine step's time split among its requests by tokens,
  `slomesh.engine.model`); else the placement's *predicted* cost
  (`Placement.predicted_cost_usd`) where the scheduler gave one (the live replay: engines
  report no per-request GPU time); else 0. A policy is thus not scored on the cost it
  predicts wherever cost is measured. ``predicted_gpu_cost_usd`` sums the predictions alone
  (requests without one add 0) and ``predicted_cost_per_mtok_usd`` is ``cost_per_mtok_usd``
  with it in place of ``gpu_cost_usd``, so the prediction error of cost can be seen; both
  are None when no request has a prediction. ``egress_cost_usd`` prices the cross-region
  bytes at the egress price of the region they leave (prompt bytes leave the origin, output bytes the serving region, moved KV
  its source region) when a topology is given. ``cost_usd`` = GPU + egress. ``cost_per_mtok_usd`` = ``cost_usd`` per
  million served tokens (prompt + completion tokens of completed requests).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.console import Console

    from slomesh.slo import SloClass
    from slomesh.topology import Topology

BYTES_PER_TOKEN = 4
"""Bytes of one token id on the wire in the cross-region bytes model (uint32)."""
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """Outcome of one replayed request, as the client saw it.

    Attributes:
        request_id: the request's id.
        origin_region: region the client sent from.
        slo_class: SLO class name.
        prompt_tokens: prompt length in tokens.
        output_tokens: output tokens asked for (max_tokens).
        ok: True when the request completed (a `completion` arrived).
        completion_tokens: output tokens received.
        ttft_ms: client-side time to first token (send to first token chunk), ms.
        tpot_ms: mean time per output token after the first, ms (0 for one token).
        e2e_ms: client-side send to last token, ms.
        region: serving region ("" when never placed).
        instance_id: serving instance ("" when never placed).
        cached_prompt_tokens: prompt tokens served from the prefix cache.
        predicted_cost_usd: the placement's predicted GPU cost, USD (None = not given).
        gpu_seconds: measured GPU seconds of the request (None = not measured).
        price_usd_per_hour: price of the serving GPU (with `gpu_seconds`), USD/hour.
        send_lag_ms: how late the client sent the request versus its schedule, ms.
        error_code: gRPC status code name of a failure ("" when ok).
        error: failure message ("" when ok).
        predicted_ttft_ms: the placement's predicted TTFT, ms (0 when not given).
        slo_feasible: the scheduler's verdict that the placement meets the SLO.
        policy: the placement policy that placed it ("" when never placed).
        kv_transfer_bytes: prefix KV bytes moved to the serving region from another one
            before it ran (0: none).
        kv_transfer_source_region: the region that KV left ("" when none moved).
    """

    request_id: str
    origin_region: str
    slo_class: str
    prompt_tokens: int
    output_tokens: int
    ok: bool = False
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    region: str = ""
    instance_id: str = ""
    cached_prompt_tokens: int = 0
    predicted_cost_usd: float | None = None
    gpu_seconds: float | None = None
    price_usd_per_hour: float | None = None
    send_lag_ms: float = 0.0
    error_code: str = ""
    error: str = ""
    predicted_ttft_ms: float = 0.0
    slo_feasible: bool = False
    policy: str = ""
    kv_transfer_bytes: int = 0
    kv_transfer_source_region: str = ""

    @property
    def cross_region(self) -> bool:
        """True when served outside its origin region."""
        return bool(self.region) and self.region != self.origin_region

    def cross_region_bytes(self, bytes_per_token: int = BYTES_PER_TOKEN) -> int:
        """Payload bytes that crossed the WAN for this request (0 when served at its origin)."""
        if not self.cross_region:
            return 0
        return (self.prompt_tokens + self.completion_tokens) * bytes_per_token

    def gpu_cost_usd(self) -> float:
        """GPU cost of the request in USD: measured (``gpu_seconds`` x price) when measured,
        else predicted, else 0 (module docstring, Cost); 0 when never placed."""
        if not self.region:
            return 0.0
        if self.gpu_seconds is not None and self.price_usd_per_hour is not None:
            return self.gpu_seconds * self.price_usd_per_hour / 3600.0
        if self.predicted_cost_usd is not None:
            return float(self.predicted_cost_usd)
        return 0.0


def latency_summary(values_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99 (plus mean, max, count) of latencies in ms; zeros for no values."""
    arr = np.asarray(values_ms, dtype=np.float64)
    if arr.size == 0:
        out = {f"p{p}": 0.0 for p in PERCENTILES}
        out.update(mean=0.0, max=0.0, count=0)
        return out
    pct = np.percentile(arr, PERCENTILES)
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)}
    out.update(mean=float(arr.mean()), max=float(arr.max()), count=int(arr.size))
    return out


def _attained(result: RequestResult, classes: Mapping[str, SloClass], default: str) -> bool:
    if not result.ok:
        return False
    cls = classes.get(result.slo_class or default)
    if cls is None:
        raise KeyError(f"unknown SLO class {result.slo_class!r} (known: {sorted(classes)})")
    return bool(cls.attained(result.ttft_ms, result.tpot_ms, result.e2e_ms, result.prompt_tokens))


def build_report(
    results: Iterable[RequestResult],
    *,
    trace: str,
    policy: str,
    duration_s: float,
    slo_classes: Mapping[str, SloClass] | None = None,
    topology: Topology | None = None,
    bytes_per_token: int = BYTES_PER_TOKEN,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds the DESIGN.md section 6 report.

    Args:
        results: one result per request.
        trace: trace name.
        policy: placement policy name (as reported by the scheduler).
        duration_s: wall time of the replay, seconds (first send to last completion).
        slo_classes: classes by name; None = `slomesh.slo.load_slo_classes()`.
        topology: gives egress prices for `egress_cost_usd`; None = no egress cost.
        bytes_per_token: bytes per token id in the cross-region bytes model.
        extra: more top-level keys to merge in (must not collide with built ones).

    Returns:
        The report as a JSON-serialisable dict.

    Raises:
        KeyError: a result names an SLO class that `slo_classes` lacks.
        ValueError: `extra` collides with a built key.
    """
    if slo_classes is None:
        from slomesh.slo import load_slo_classes

        slo_classes = load_slo_classes()
    default_class = "chat" if "chat" in slo_classes else next(iter(slo_classes))
    results = list(results)
    n = len(results)
    done = [r for r in results if r.ok]
    attained = [_attained(r, slo_classes, default_class) for r in results]

    egress_price = {}
    if topology is not None:
        egress_price = {reg.name: reg.egress_usd_per_gb for reg in topology.regions}
    gpu_cost = 0.0
    predicted_gpu_cost: float | None = None
    egress_cost = 0.0
    cross_bytes = 0
    kv_bytes = 0
    for r in results:
        gpu_cost += r.gpu_cost_usd()
        if r.region and r.predicted_cost_usd is not None:
            predicted_gpu_cost = (predicted_gpu_cost or 0.0) + float(r.predicted_cost_usd)
        b = r.cross_region_bytes(bytes_per_token)
        cross_bytes += b
        if b and egress_price:
            prompt_b = r.prompt_tokens * bytes_per_token
            out_b = r.completion_tokens * bytes_per_token
            egress_cost += prompt_b / 1e9 * egress_price.get(r.origin_region, 0.0)
            egress_cost += out_b / 1e9 * egress_price.get(r.region, 0.0)
        if r.kv_transfer_bytes:
            kv_bytes += r.kv_transfer_bytes
            price = egress_price.get(r.kv_transfer_source_region, 0.0)
            egress_cost += r.kv_transfer_bytes / 1e9 * price
    cross_bytes += kv_bytes
    cost = gpu_cost + egress_cost
    prompt_tok = sum(r.prompt_tokens for r in done)
    completion_tok = sum(r.completion_tokens for r in done)
    cached_tok = sum(r.cached_prompt_tokens for r in done)
    served_tok = prompt_tok + completion_tok
    predicted_cost_per_mtok = None
    if predicted_gpu_cost is not None:
        predicted_cost = predicted_gpu_cost + egress_cost
        predicted_cost_per_mtok = (predicted_cost / served_tok * 1e6) if served_tok else 0.0

    def group(key: str) -> dict[str, dict[str, Any]]:
        buckets: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(results):
            k = getattr(r, key)
            if k:
                buckets[k].append(i)
        out = {}
        for k in sorted(buckets):
            idx = buckets[k]
            sub = [results[i] for i in idx]
            sub_done = [r for r in sub if r.ok]
            out[k] = {
                "requests": len(idx),
                "completed": len(sub_done),
                "failed": len(idx) - len(sub_done),
                "slo_attainment": sum(attained[i] for i in idx) / len(idx),
                "ttft_ms": latency_summary([r.ttft_ms for r in sub_done]),
                "cross_region_requests": sum(1 for r in sub if r.cross_region),
            }
        return out

    errors = collections.Counter(r.error_code or "UNKNOWN" for r in results if not r.ok)
    report: dict[str, Any] = {
        "trace": trace,
        "policy": policy,
        "requests": n,
        "completed": len(done),
        "failed": n - len(done),
        "slo_attainment": (sum(attained) / n) if n else 0.0,
        "ttft_ms": latency_summary([r.ttft_ms for r in done]),
        "tpot_ms": latency_summary([r.tpot_ms for r in done if r.completion_tokens >= 2]),
        "e2e_ms": latency_summary([r.e2e_ms for r in done]),
        "cost_usd": cost,
        "cost_per_mtok_usd": (cost / served_tok * 1e6) if served_tok else 0.0,
        "cross_region_bytes": int(cross_bytes),
        "cross_region_kv_bytes": int(kv_bytes),
        "kv_moves": sum(1 for r in results if r.kv_transfer_bytes),
        "per_region": group("region"),
        "per_origin": group("origin_region"),
        "duration_s": float(duration_s),
        "throughput_rps": (len(done) / duration_s) if duration_s > 0 else 0.0,
        "goodput_rps": (sum(attained) / duration_s) if duration_s > 0 else 0.0,
        "gpu_cost_usd": gpu_cost,
        "predicted_gpu_cost_usd": predicted_gpu_cost,
        "predicted_cost_per_mtok_usd": predicted_cost_per_mtok,
        "egress_cost_usd": egress_cost,
        "prompt_tokens": prompt_tok,
        "completion_tokens": completion_tok,
        "cached_prompt_tokens": cached_tok,
        "prefix_hit_rate": (cached_tok / prompt_tok) if prompt_tok else 0.0,
        "cross_region_requests": sum(1 for r in results if r.cross_region),
        "client_send_lag_ms": latency_summary([r.send_lag_ms for r in results]),
        "errors": dict(sorted(errors.items())),
    }
    if extra:
        clash = set(extra) & set(report)
        if clash:
            raise ValueError(f"extra keys collide with report keys: {sorted(clash)}")
        report.update(extra)
    return report


def _fmt_ms(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.1f}"


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Prints a report as rich tables: totals, latency percentiles, then per region/origin."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = Table(title=f"slomesh report — {report.get('trace', '')}", show_header=False)
    head.add_column("metric", style="bold")
    head.add_column("value", justify="right")
    rows = [
        ("policy", str(report.get("policy", ""))),
        ("requests", f"{report['requests']}"),
        ("completed / failed", f"{report['completed']} / {report['failed']}"),
        ("SLO attainment", f"{report['slo_attainment'] * 100:.1f} %"),
        ("duration", f"{report.get('duration_s', 0.0):.1f} s"),
        ("throughput", f"{report.get('throughput_rps', 0.0):.2f} req/s"),
        ("goodput", f"{report.get('goodput_rps', 0.0):.2f} req/s"),
        ("cost", f"${report['cost_usd']:.6f}"),
        ("cost per 1M tokens", f"${report['cost_per_mtok_usd']:.4f}"),
        ("cross-region bytes", f"{report['cross_region_bytes']:,}"),
        ("cross-region requests", f"{report.get('cross_region_requests', 0)}"),
        (
            "KV moves / bytes",
            f"{report.get('kv_moves', 0)} / {report.get('cross_region_kv_bytes', 0):,}",
        ),
        ("prefix hit rate", f"{report.get('prefix_hit_rate', 0.0) * 100:.1f} %"),
    ]
    if report.get("predicted_cost_per_mtok_usd") is not None:
        rows.append(
            ("predicted cost per 1M tokens", f"${report['predicted_cost_per_mtok_usd']:.4f}")
        )
    if report.get("errors"):
        rows.append(("errors", ", ".join(f"{k}={v}" for k, v in report["errors"].items())))
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)

    lat = Table(title="latency (ms)")
    for col in ("metric", "p50", "p90", "p99", "mean", "max", "n"):
        lat.add_column(col, justify="right" if col != "metric" else "left")
    for key, label in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("e2e_ms", "E2E"),
        ("client_send_lag_ms", "client send lag"),
    ):
        s = report.get(key)
        if not s:
            continue
        lat.add_row(
            label,
            *(_fmt_ms(s.get(p, 0.0)) for p in ("p50", "p90", "p99", "mean", "max")),
            str(s.get("count", "")),
        )
    console.print(lat)

    for key, title in (("per_region", "per serving region"), ("per_origin", "per origin region")):
        groups = report.get(key) or {}
        if not groups:
            continue
        t = Table(title=title)
        for col in ("region", "requests", "failed", "SLO attainment", "TTFT p50", "TTFT p99",
                    "cross-region"):
            t.add_column(col, justify="left" if col == "region" else "right")
        for name, g in groups.items():
            ttft = g.get("ttft_ms", {})
            t.add_row(
                name,
                str(g["requests"]),
                str(g.get("failed", 0)),
                f"{g['slo_attainment'] * 100:.1f} %",
                _fmt_ms(ttft.get("p50", 0.0)),
                _fmt_ms(ttft.get("p99", 0.0)),
                str(g.get("cross_region_requests", 0)),
            )
        console.print(t)


__all__ = [
    "BYTES_PER_TOKEN",
    "RequestResult",
    "build_report",
    "latency_summary",
    "print_report",
]
