"""`slomesh bench-transfer --through-service` at a tiny size: two real KVTransfer service
processes move every byte asked, and the report has its figures (no timing targets asserted:
the machine is shared)."""

from __future__ import annotations

import json

import pytest

from slomesh.benchmarks.transfer import main
from slomesh.benchmarks.transfer_service import KV_LAYERS, run_service_transfer_benchmark

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SMALL = {
    "capacity_bytes_per_s": 20e6,
    "prewarm_bytes": 8_000_000,
    "foreground_bytes": 2 * MIB,
    "foreground_at_s": 0.05,
    "foreground_gap_s": 0.02,
    "repeats": 2,
}


async def test_small_run_moves_the_bytes_asked_and_reports_every_figure(tmp_path):
    result = await run_service_transfer_benchmark(**SMALL, work_dir=tmp_path)
    cap = SMALL["capacity_bytes_per_s"]
    prewarm, shared = result["prewarm"], result["prewarm_with_foreground"]
    # The model's files: the shards' bytes plus safetensors headers, config.json and the index.
    assert SMALL["prewarm_bytes"] < prewarm["bytes"] < SMALL["prewarm_bytes"] + 4096
    assert shared["bytes"] == prewarm["bytes"]
    for run in (prewarm, shared):
        assert run["throughput_ratio"] == pytest.approx(run["bytes"] / run["duration_s"] / cap)
    fg = result["foreground"]
    # 2 MiB of KV in 32 layer files, each with its safetensors header.
    assert SMALL["foreground_bytes"] < fg["bytes"] < SMALL["foreground_bytes"] + KV_LAYERS * 256
    assert len(fg["idle_link_s"]) == SMALL["repeats"]
    assert 1 <= len(fg["during_prewarm_s"]) <= SMALL["repeats"]
    assert all(t >= SMALL["foreground_at_s"] for t in fg["started_after_prewarm_s"])
    assert fg["ratio_vs_idle"] == pytest.approx(
        fg["during_prewarm_median_s"] / fg["idle_link_median_s"]
    )
    # Every transfer moved its object once: warm-up + idle + busy foregrounds, two prewarms,
    # counted by the source service on the wire.
    foregrounds = 1 + len(fg["idle_link_s"]) + len(fg["during_prewarm_s"])
    assert result["source_sent_bytes"] == {
        "FOREGROUND_KV": fg["bytes"] * foregrounds,
        "PREWARM_WEIGHTS": prewarm["bytes"] * 2,
    }
    link = result["link_during_prewarm"]
    assert link["bytes"] == shared["bytes"] + fg["bytes"] * len(fg["during_prewarm_s"])
    assert len(result["load_average"]) == 3
    assert result["within_targets"]["throughput"] == (prewarm["throughput_ratio"] >= 0.9)
    assert result["within_targets"]["foreground"] == (fg["ratio_vs_idle"] <= 1.10)
    assert list(tmp_path.iterdir()) == []  # the stores were removed


def test_cli_writes_the_report(tmp_path):
    out = tmp_path / "transfer.json"
    argv = [
        "--through-service", "--capacity-bytes-per-s", "20e6", "--bytes", "6e6",
        "--foreground-bytes", str(2 * MIB), "--foreground-at-s", "0.02", "--repeats", "1",
        "--report-json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["prewarm_bytes"] == 6_000_000
    assert "KVTransfer" in report["config"]["transport"]
    assert set(report) >= {"prewarm", "prewarm_with_foreground", "foreground", "targets"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--foreground-bytes", str(MIB)],  # less than one 16-token KV block
        ["--chunk-bytes", "100"],
        ["--repeats", "0"],
        ["--capacity-bytes-per-s", "0"],
    ],
)
def test_bad_arguments_exit_2(argv):
    assert main(["--through-service", *argv, "--bytes", "1e6"]) == 2
