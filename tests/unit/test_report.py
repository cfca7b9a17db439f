"""Tests of the section-6 report: keys, percentiles, attainment, failures, bytes and cost."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from slomesh.report import (
    BYTES_PER_TOKEN,
    RequestResult,
    build_report,
    latency_summary,
    print_report,
)
from slomesh.slo import SloClass
from slomesh.topology import Topology

SECTION6_KEYS = {
    "trace", "policy", "requests", "completed", "failed", "slo_attainment", "ttft_ms", "tpot_ms",
    "e2e_ms", "cost_usd", "cost_per_mtok_usd", "cross_region_bytes", "per_region",
}
CLASSES = {"chat": SloClass("chat", 500.0, 0.25, 100.0, None)}


def ok(rid: str, ttft: float, tpot: float = 20.0, *, origin: str = "tokyo", region: str = "tokyo",
       prompt: int = 100, out: int = 10, cost: float | None = 0.001) -> RequestResult:
    return RequestResult(
        request_id=rid, origin_region=origin, slo_class="chat", prompt_tokens=prompt,
        output_tokens=out, ok=True, completion_tokens=out, ttft_ms=ttft, tpot_ms=tpot,
        e2e_ms=ttft + tpot * (out - 1), region=region, instance_id=f"{region}-0",
        predicted_cost_usd=cost,
    )


def failed(rid: str, origin: str = "frankfurt", region: str = "", code: str = "UNAVAILABLE"):
    return RequestResult(request_id=rid, origin_region=origin, slo_class="chat", prompt_tokens=50,
                         output_tokens=5, ok=False, region=region, error_code=code, error="boom")


def test_section6_keys_and_json_serialisable() -> None:
    report = build_report([ok("a", 100)], trace="t", policy="p", duration_s=2.0,
                          slo_classes=CLASSES)
    assert SECTION6_KEYS <= set(report)
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert {"p50", "p90", "p99"} <= set(report[key])
    assert {"per_origin", "duration_s", "throughput_rps", "client_send_lag_ms"} <= set(report)
    json.loads(json.dumps(report))


def test_percentiles_match_numpy() -> None:
    ttfts = [float(x) for x in range(1, 101)]
    results = [ok(f"r{i}", t) for i, t in enumerate(ttfts)]
    report = build_report(results, trace="t", policy="p", duration_s=10, slo_classes=CLASSES)
    for p in (50, 90, 99):
        assert report["ttft_ms"][f"p{p}"] == pytest.approx(np.percentile(ttfts, p))
    assert report["ttft_ms"]["count"] == 100
    assert report["throughput_rps"] == pytest.approx(10.0)


def test_attainment_and_failures() -> None:
    results = [
        ok("fast", 200.0),               # attains (target 500 + 25 = 525 ms)
        ok("slow-ttft", 900.0),          # misses TTFT
        ok("slow-tpot", 100.0, tpot=150.0),  # misses TPOT
        failed("gone"),                  # failed: counts, never attains
    ]
    report = build_report(results, trace="t", policy="p", duration_s=1, slo_classes=CLASSES)
    assert report["requests"] == 4
    assert report["completed"] == 3
    assert report["failed"] == 1
    assert report["slo_attainment"] == pytest.approx(0.25)
    assert report["goodput_rps"] == pytest.approx(1.0)
    assert report["errors"] == {"UNAVAILABLE": 1}
    # Latency percentiles only over completed requests.
    assert report["ttft_ms"]["count"] == 3
    # The failed request never got a serving region: in per_origin, not in per_region.
    assert report["per_region"]["tokyo"]["requests"] == 3
    assert "frankfurt" not in report["per_region"]
    fra = report["per_origin"]["frankfurt"]
    assert (fra["requests"], fra["failed"], fra["slo_attainment"]) == (1, 1, 0.0)
    assert report["per_origin"]["tokyo"]["slo_attainment"] == pytest.approx(1 / 3)


def test_failed_after_placement_counts_in_its_region() -> None:
    report = build_report([ok("a", 10, region="tokyo"), failed("b", region="tokyo")],
                          trace="t", policy="p", duration_s=1, slo_classes=CLASSES)
    assert report["per_region"]["tokyo"]["requests"] == 2
    assert report["per_region"]["tokyo"]["failed"] == 1
    assert report["per_region"]["tokyo"]["slo_attainment"] == pytest.approx(0.5)


def test_tpot_excludes_single_token_outputs() -> None:
    results = [ok("one", 100.0, tpot=0.0, out=1), ok("many", 100.0, tpot=30.0, out=20)]
    report = build_report(results, trace="t", policy="p", duration_s=1, slo_classes=CLASSES)
    assert report["tpot_ms"]["count"] == 1
    assert report["tpot_ms"]["p50"] == pytest.approx(30.0)


def test_cross_region_bytes_and_cost() -> None:
    topo = Topology.default()
    local = ok("local", 100, origin="tokyo", region="tokyo", prompt=1000, out=100, cost=0.002)
    remote = ok("remote", 100, origin="tokyo", region="frankfurt", prompt=1000, out=100, cost=0.003)
    report = build_report([local, remote], trace="t", policy="p", duration_s=1,
                          slo_classes=CLASSES, topology=topo)
    assert report["cross_region_bytes"] == (1000 + 100) * BYTES_PER_TOKEN
    assert report["cross_region_requests"] == 1
    assert report["per_region"]["frankfurt"]["cross_region_requests"] == 1
    egress = (1000 * 4 / 1e9) * topo.region("tokyo").egress_usd_per_gb + (
        100 * 4 / 1e9
    ) * topo.region("frankfurt").egress_usd_per_gb
    assert report["gpu_cost_usd"] == pytest.approx(0.005)
    assert report["egress_cost_usd"] == pytest.approx(egress)
    assert report["cost_usd"] == pytest.approx(0.005 + egress)
    assert report["cost_per_mtok_usd"] == pytest.approx((0.005 + egress) / 2200 * 1e6)


def test_prefix_hit_rate_over_completed() -> None:
    a = ok("a", 100, prompt=1000)
    a.cached_prompt_tokens = 600
    b = ok("b", 100, prompt=1000)
    gone = failed("c")
    gone.cached_prompt_tokens = 50  # not counted: the request did not complete
    report = build_report([a, b, gone], trace="t", policy="p", duration_s=1,
                          slo_classes=CLASSES)
    assert report["cached_prompt_tokens"] == 600
    assert report["prefix_hit_rate"] == pytest.approx(0.3)


def test_gpu_seconds_cost_when_no_prediction() -> None:
    r = ok("a", 100, cost=None)
    r.gpu_seconds, r.price_usd_per_hour = 36.0, 2.0
    report = build_report([r], trace="t", policy="p", duration_s=1, slo_classes=CLASSES)
    assert report["gpu_cost_usd"] == pytest.approx(0.02)
    assert report["predicted_gpu_cost_usd"] is None
    assert report["predicted_cost_per_mtok_usd"] is None


def test_measured_gpu_cost_wins_over_predicted() -> None:
    measured = ok("a", 100, prompt=100, out=10, cost=0.5)  # predicted $0.50
    measured.gpu_seconds, measured.price_usd_per_hour = 36.0, 2.0  # measured $0.02
    predicted_only = ok("b", 100, prompt=100, out=10, cost=0.001)
    report = build_report([measured, predicted_only], trace="t", policy="p", duration_s=1,
                          slo_classes=CLASSES)
    assert measured.gpu_cost_usd() == pytest.approx(0.02)
    assert report["gpu_cost_usd"] == pytest.approx(0.021)
    assert report["cost_per_mtok_usd"] == pytest.approx(0.021 / 220 * 1e6)
    assert report["predicted_gpu_cost_usd"] == pytest.approx(0.501)
    assert report["predicted_cost_per_mtok_usd"] == pytest.approx(0.501 / 220 * 1e6)
    out = io.StringIO()
    print_report(report, Console(file=out, width=200))
    assert "predicted cost per 1M tokens" in out.getvalue()


def test_empty_and_unknown_class_and_extra_clash() -> None:
    report = build_report([], trace="t", policy="p", duration_s=0, slo_classes=CLASSES)
    assert report["requests"] == 0 and report["slo_attainment"] == 0.0
    assert report["ttft_ms"]["p99"] == 0.0 and report["ttft_ms"]["count"] == 0
    bad = ok("a", 1)
    bad.slo_class = "nope"
    with pytest.raises(KeyError, match="nope"):
        build_report([bad], trace="t", policy="p", duration_s=1, slo_classes=CLASSES)
    with pytest.raises(ValueError, match="collide"):
        build_report([], trace="t", policy="p", duration_s=1, slo_classes=CLASSES,
                     extra={"failed": 3})


def test_latency_summary_values() -> None:
    s = latency_summary([10.0, 20.0, 30.0])
    assert s["p50"] == 20.0 and s["max"] == 30.0 and s["mean"] == pytest.approx(20.0)


def test_default_slo_classes_loaded() -> None:
    report = build_report([ok("a", 100.0)], trace="t", policy="p", duration_s=1)
    assert report["slo_attainment"] == 1.0


def test_print_report_renders_regions() -> None:
    report = build_report([ok("a", 100, region="tokyo"), failed("b")], trace="mytrace",
                          policy="p", duration_s=1, slo_classes=CLASSES)
    buf = io.StringIO()
    print_report(report, Console(file=buf, width=160, force_terminal=False))
    text = buf.getvalue()
    assert "mytrace" in text and "tokyo" in text and "frankfurt" in text
    assert "UNAVAILABLE=1" in text
