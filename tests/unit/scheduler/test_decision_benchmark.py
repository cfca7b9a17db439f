"""`slomesh bench-decision` on a small run: every request is decided on the 3 x 4 view it
builds, the prefix lookups hit the shared prefixes, and the report has its figures."""

from __future__ import annotations

import json

import pytest

from slomesh.benchmarks.decision import build_view, main, run_decision_benchmark


def test_view_has_regions_x_instances_and_indexed_prefixes():
    prefix = list(range(1000, 1000 + 320))
    view, regions = build_view(3, 4, [prefix], seed=0)
    assert len(regions) == 3 and len(view.instances()) == 12
    hits = view.cached_prefix_tokens(None, prefix + [7] * 40)
    assert set(hits.values()) == {320}


def test_small_run_reports_every_stage(tmp_path):
    result = run_decision_benchmark(prompt_tokens=2048, shared_prefix_tokens=1024,
                                    num_requests=40)
    assert sum(result["outcomes"].values()) == 40
    for stage in ("validation_ms", "hashing_ms", "lookup_ms", "decision_ms", "baseline_ms"):
        s = result[stage]
        assert 0 < s["p50"] <= s["p99"] <= s["max"]
    assert 0 < result["hashing_share"]
    assert result["within_target"] == (result["decision_ms"]["p99"] <= 1.0)
    # The hashing figure covers the blocks the decision's lookup hashed: past the 64 shared
    # blocks every instance may hold, and no further than the 128 blocks of the prompt.
    assert 1024 // 16 < result["hashed_blocks"]["p50"] <= result["prompt_blocks"] == 2048 // 16
    assert result["cpu_count"] >= 1 and result["load_average"]["start"] >= 0
    out = tmp_path / "decision.json"
    assert main(["--requests", "20", "--prompt-tokens", "512", "--shared-prefix-tokens",
                 "256", "--report-json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["prompt_tokens"] == 512


@pytest.mark.parametrize("argv", [["--regions", "4"], ["--instances-per-region", "0"],
                                  ["--shared-prefix-tokens", "99999"], ["--policy", "nope"]])
def test_bad_arguments_exit_2(argv):
    assert main(argv + ["--requests", "5", "--prompt-tokens", "512"]) == 2
