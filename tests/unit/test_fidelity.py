from __future__ import annotations

import pytest

from slomesh.fidelity import histogram_quantile_ms, mesh_timing, relative_errors


def _report(ttft50, ttft90, tpot50, tpot90, attainment):
    return {
        "ttft_ms": {"p50": ttft50, "p90": ttft90},
        "tpot_ms": {"p50": tpot50, "p90": tpot90},
        "slo_attainment": attainment,
    }


def test_relative_errors_per_figure():
    live = _report(200.0, 400.0, 10.0, 20.0, 0.9)
    sim = _report(180.0, 440.0, 10.0, 15.0, 0.99)
    errors = relative_errors(live, sim)
    assert set(errors) == {"ttft_ms.p50", "ttft_ms.p90", "tpot_ms.p50", "tpot_ms.p90",
                           "slo_attainment"}
    assert errors["ttft_ms.p50"]["relative_error"] == pytest.approx(0.10)
    assert errors["ttft_ms.p90"]["relative_error"] == pytest.approx(0.10)
    assert errors["tpot_ms.p50"]["relative_error"] == 0.0
    assert errors["tpot_ms.p90"]["relative_error"] == pytest.approx(0.25)
    assert errors["slo_attainment"] == {"live": 0.9, "sim": 0.99,
                                        "relative_error": pytest.approx(0.1)}


def test_zero_live_value_gives_the_absolute_error():
    errors = relative_errors(_report(0, 0, 0, 0, 0.0), _report(0, 0, 0, 0, 0.25))
    assert errors["slo_attainment"]["relative_error"] == 0.25
    assert errors["ttft_ms.p50"]["relative_error"] == 0.0


def _histogram_text(name, buckets, values, counter=None, counter_value=0):
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    h = Histogram(name, "h", ["relay"], buckets=buckets, registry=reg)
    for label, v in values:
        h.labels(label).observe(v)
    if counter:
        Counter(counter, "c", registry=reg).inc(counter_value)
    return generate_latest(reg).decode()


def test_histogram_quantile_is_the_bucket_bound_over_all_series():
    values = [("a", 0.0004)] * 60 + [("b", 0.0015)] * 39 + [("b", 0.03)]
    text = _histogram_text("lag_seconds", (0.001, 0.002, 0.05), values)
    assert histogram_quantile_ms(text, "lag_seconds", 0.5) == (1.0, 100)
    assert histogram_quantile_ms(text, "lag_seconds", 0.99) == (2.0, 100)
    assert histogram_quantile_ms(text, "lag_seconds", 1.0) == (50.0, 100)
    assert histogram_quantile_ms(text, "missing", 0.99) == (0.0, 0)


def test_mesh_timing_flags_a_late_emulator_or_a_re_based_clock():
    ok = _histogram_text("slomesh_emulator_lag_seconds", (0.001, 0.02), [("x", 0.0005)] * 10)
    late = _histogram_text("slomesh_emulator_lag_seconds", (0.001, 0.02), [("x", 0.015)] * 10)
    rebased = _histogram_text("slomesh_emulator_lag_seconds", (0.001, 0.02),
                              [("x", 0.0005)] * 10, "slomesh_emulator_lag_resyncs", 1)
    relay = _histogram_text("slomesh_wan_relay_lag_seconds", (0.001, 0.002), [("r", 0.0001)] * 5)
    good = mesh_timing({"i0": ok, "i1": ok}, relay)
    assert good["within_limit"] and good["relay_lag_p99_ms"] == 1.0 and good["relay_chunks"] == 5
    assert good["emulator_lag_p99_ms"] == {"i0": 1.0, "i1": 1.0}
    assert not mesh_timing({"i0": ok, "i1": late}, relay)["within_limit"]
    bad = mesh_timing({"i0": rebased}, relay)
    assert bad["emulator_lag_resyncs"] == 1 and not bad["within_limit"]
