"""`slomesh bench-transfer` on a small run: the bytes arrive, the link stays under its cap, and
the report has its figures (no timing targets asserted: the machine is shared)."""

from __future__ import annotations

import json

import pytest

from slomesh.benchmarks.transfer import main, run_transfer_benchmark

KIB = 1024
SMALL = {
    "capacity_bytes_per_s": 50e6,
    "prewarm_bytes": 12_000_000,
    "chunk_bytes": 256 * KIB,
    "foreground_bytes": 2 * 1024 * KIB,
    "foreground_at_s": 0.05,
    "foreground_gap_s": 0.02,
    "repeats": 2,
    "burst_bytes": 512 * KIB,
}


async def test_small_run_reports_every_figure():
    result = await run_transfer_benchmark(**SMALL)
    cap = SMALL["capacity_bytes_per_s"]
    prewarm = result["prewarm"]
    assert prewarm["bytes"] == SMALL["prewarm_bytes"]
    # The prewarm alone takes at least its bytes over the capacity, less the first burst.
    assert prewarm["duration_s"] >= (SMALL["prewarm_bytes"] - SMALL["burst_bytes"]) / cap
    fg = result["foreground"]
    assert len(fg["idle_link_s"]) == SMALL["repeats"]
    assert 1 <= len(fg["during_prewarm_s"]) <= SMALL["repeats"]
    assert all(t >= 0.05 for t in fg["started_after_prewarm_s"])
    # The token bucket: the link never carries more than C x T + burst (+ a foreground that
    # may outlast the prewarm's end).
    link = result["link_during_prewarm"]
    assert link["bytes"] == prewarm["bytes"] + SMALL["foreground_bytes"] * len(
        fg["during_prewarm_s"]
    )
    bound = 1.0 + (SMALL["burst_bytes"] + SMALL["foreground_bytes"]) / (cap * prewarm["duration_s"])
    assert 0 < link["throughput_ratio"] <= bound
    # Strict priority: a foreground during the prewarm is not grossly slower than on the idle
    # link (loose: wall-clock on a shared machine).
    assert 0 < fg["ratio_vs_idle"] < 4.0
    assert fg["ratio_vs_idle"] == pytest.approx(
        fg["during_prewarm_median_s"] / fg["idle_link_median_s"]
    )
    assert result["within_targets"]["foreground"] == (fg["ratio_vs_idle"] <= 1.10)
    for stats in result["link_stats"].values():  # over the scheduler's 1 s window
        assert stats["prewarm_bytes_per_s"] > 0
        assert stats["spare_bytes_per_s"] == pytest.approx(cap - stats["foreground_bytes_per_s"])
    assert result["link_stats"]["after_foreground"]["foreground_bytes_per_s"] > 0


def test_cli_writes_the_report(tmp_path):
    out = tmp_path / "transfer.json"
    argv = [
        "--capacity-bytes-per-s", "50e6", "--bytes", "6e6", "--chunk-bytes", str(256 * KIB),
        "--foreground-bytes", str(1024 * KIB), "--foreground-at-s", "0.02", "--repeats", "1",
        "--burst-bytes", str(512 * KIB), "--report-json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["prewarm_bytes"] == 6_000_000
    assert set(report) >= {"prewarm", "link_during_prewarm", "foreground", "targets"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--chunk-bytes", "0"],
        ["--foreground-bytes", "10", "--chunk-bytes", "100"],
        ["--repeats", "0"],
        ["--capacity-bytes-per-s", "0"],
        ["--foreground-at-s", "-1"],
    ],
)
def test_bad_arguments_exit_2(argv):
    assert main([*argv, "--bytes", "1e6"]) == 2
