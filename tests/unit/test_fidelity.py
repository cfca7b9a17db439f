from __future__ import annotations

import pytest

from slomesh.fidelity import relative_errors


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
