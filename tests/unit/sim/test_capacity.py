"""Capacity bisection, the benchmark's report and plot, and the `sim` / `bench` commands."""

from __future__ import annotations

import json

import pytest

from slomesh.benchmarks import capacity
from slomesh.benchmarks.capacity import BenchSettings, Bisection, run_bench
from slomesh.cli import main as slomesh_main
from slomesh.report import build_report
from slomesh.topology import shared_data_dir

AZURE = str(shared_data_dir() / "traces" / "azure_llm_2023_conv.csv")


def bisect(curve, **kw):
    search = Bisection(**kw)
    while (scale := search.next_scale()) is not None:
        search.record(scale, curve(scale))
    return search


class TestBisection:
    def test_finds_the_crossing_within_tolerance(self):
        # Attainment falls below 0.9 above scale 5.3.
        search = bisect(lambda s: 1.0 if s <= 5.3 else 0.5, tolerance=0.02)
        assert search.bound == "exact"
        assert 5.3 / 1.02 <= search.capacity_scale <= 5.3
        assert search.hi is not None and search.hi / search.capacity_scale <= 1.02
        scales = [s for s, _ in search.points]
        assert scales[:4] == [1.0, 2.0, 4.0, 8.0]  # bracketing by doubling

    def test_brackets_downwards(self):
        search = bisect(lambda s: 0.95 if s <= 0.3 else 0.2, tolerance=0.05)
        assert [s for s, _ in search.points][:3] == [1.0, 0.5, 0.25]
        assert 0.3 / 1.05 <= search.capacity_scale <= 0.3

    def test_lower_bound_and_none(self):
        always = bisect(lambda s: 1.0, max_scale=16.0)
        assert always.capacity_scale == 16.0 and always.bound == "lower_bound"
        never = bisect(lambda s: 0.0, min_scale=0.125)
        assert never.capacity_scale == 0.0 and never.bound == "none"
        assert [s for s, _ in never.points] == [1.0, 0.5, 0.25, 0.125]

    def test_point_budget(self):
        search = bisect(lambda s: 1.0 if s <= 3.0 else 0.0, tolerance=1e-6, max_points=6)
        assert len(search.points) == 6 and search.done

    def test_non_monotonic_attainment_searches_above_the_highest_pass(self):
        search = Bisection(tolerance=0.1)
        search.record(1.0, 0.95)
        search.record(2.0, 0.5)
        search.record(1.5, 0.97)  # inside the bracket: fine
        search.record(1.2, 0.5)  # a dip below a passing scale
        nxt = search.next_scale()
        assert 1.5 < nxt < 2.0

    @pytest.mark.parametrize(
        "kw", [{"target": 0}, {"tolerance": 0}, {"min_scale": 2.0}, {"max_points": 0}]
    )
    def test_bad_parameters(self, kw):
        with pytest.raises(ValueError):
            Bisection(**kw)


def test_run_bench_in_process(tmp_path):
    settings = BenchSettings(trace=AZURE, limit=60)
    points = []
    bench = run_bench(
        settings,
        ["round-robin", "slomesh"],
        start_scale=4.0,
        tolerance=0.5,
        max_points=4,
        jobs=1,
        on_point=lambda policy, point, search: points.append((policy, point["rate_scale"])),
    )
    assert bench["requests"] == 60 and bench["gpus"] == 6
    assert bench["baselines"] == ["round-robin"] and bench["best_baseline"] == "round-robin"
    rr, sm = bench["policies"]["round-robin"], bench["policies"]["slomesh"]
    assert len(points) == len(rr["points"]) + len(sm["points"])
    for r, extra in ((rr, 0), (sm, 1)):
        # max_points bisection points, plus slomesh's point at the equal load if it is new
        assert 1 <= len(r["points"]) <= 4 + extra
        # Every point carries the RWT error of its placements.
        assert all(p["queue_wait_error"]["placed"] > 0 for p in r["points"])
        if r["capacity_rate_scale"] > 0:
            assert r["slo_attainment"] >= 0.9
            assert r["capacity_rps"] == pytest.approx(
                r["capacity_rate_scale"] * bench["base_rate_rps"], rel=1e-9
            )
            assert r["report"]["rate_scale"] == r["capacity_rate_scale"]
    assert rr["ratio_to_best_baseline"] == pytest.approx(1.0)
    if rr["capacity_rate_scale"] > 0:
        assert sm["ratio_to_best_baseline"] == pytest.approx(
            sm["capacity_rate_scale"] / rr["capacity_rate_scale"]
        )
    png = capacity.plot_attainment(bench, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from rich.console import Console

    # Equal load: both policies evaluated at round-robin's capacity (the best baseline's).
    eq = bench["equal_load"]
    if rr["capacity_rate_scale"] > 0:
        assert eq["rate_scale"] == rr["capacity_rate_scale"]
        assert eq["rate_scale"] in {p["rate_scale"] for p in sm["points"]}
        assert eq["cheapest_baseline"] == "round-robin"
        assert eq["policies"]["round-robin"]["slo_attainment"] == rr["slo_attainment"]
        sm_cost = eq["policies"]["slomesh"]["cost_per_mtok_usd"]
        assert eq["policies"]["slomesh"]["cost_le_cheapest_baseline"] == (
            sm_cost <= rr["cost_per_mtok_usd"]
        )
        assert len(capacity.equal_load_summary(bench)) == 1
    else:
        assert eq is None and capacity.equal_load_summary(bench) == []
    console = Console(record=True, width=250)
    console.print(capacity.capacity_table(bench))
    text = console.export_text()
    assert "round-robin" in text and "slomesh" in text


def _point(attainment: float, cost: float) -> dict[str, float]:
    return {"slo_attainment": attainment, "cost_per_mtok_usd": cost,
            "fleet_cost_per_mtok_usd": 2 * cost}


class TestEqualLoadComparison:
    def test_cheapest_baseline_is_among_those_attaining_the_target(self):
        points = {
            "llm-d": _point(0.91, 0.30),
            "dynamo": _point(0.88, 0.25),  # cheaper, but misses the target: not a reference
            "qlm": _point(0.95, 0.32),
            "slomesh": _point(0.99, 0.29),
            "oracle": _point(0.99, 0.31),
        }
        eq = capacity.equal_load_comparison(points, ["llm-d", "dynamo", "qlm"], 0.9, 3.8)
        assert eq["rate_scale"] == 3.8
        assert eq["cheapest_baseline"] == "llm-d"
        assert eq["cheapest_baseline_cost_per_mtok_usd"] == 0.30
        rows = eq["policies"]
        assert [p for p, r in rows.items() if r["attains_target"]] == [
            "llm-d", "qlm", "slomesh", "oracle"]
        assert rows["slomesh"]["cost_le_cheapest_baseline"] is True
        assert rows["oracle"]["cost_le_cheapest_baseline"] is False
        assert all("cost_le_cheapest_baseline" not in rows[b] for b in ("llm-d", "dynamo", "qlm"))
        assert rows["qlm"]["fleet_cost_per_mtok_usd"] == 0.64

    def test_equal_cost_counts_as_no_more(self):
        points = {"llm-d": _point(0.9, 0.3), "slomesh": _point(0.9, 0.3)}
        eq = capacity.equal_load_comparison(points, ["llm-d"], 0.9, 2.0)
        assert eq["policies"]["slomesh"]["cost_le_cheapest_baseline"] is True

    def test_no_baseline_attains_the_target(self):
        points = {"llm-d": _point(0.85, 0.3), "slomesh": _point(0.95, 0.2)}
        eq = capacity.equal_load_comparison(points, ["llm-d"], 0.9, 2.0)
        assert eq["cheapest_baseline"] is None
        assert eq["cheapest_baseline_cost_per_mtok_usd"] is None
        assert eq["policies"]["slomesh"]["cost_le_cheapest_baseline"] is None
        bench = {"equal_load": eq, "target_attainment": 0.9, "best_baseline": "llm-d"}
        (line,) = capacity.equal_load_summary(bench)
        assert "no baseline attains 90 %" in line

    def test_summary_line_gives_the_verdict(self):
        points = {"llm-d": _point(0.92, 0.30), "slomesh": _point(0.97, 0.31)}
        eq = capacity.equal_load_comparison(points, ["llm-d"], 0.9, 3.83)
        bench = {"equal_load": eq, "target_attainment": 0.9, "best_baseline": "llm-d"}
        (line,) = capacity.equal_load_summary(bench)
        assert "x3.83" in line and "llm-d $0.3000/Mtok" in line and line.endswith("NO")
        points["slomesh"] = _point(0.85, 0.29)
        eq = capacity.equal_load_comparison(points, ["llm-d"], 0.9, 3.83)
        (line,) = capacity.equal_load_summary({**bench, "equal_load": eq})
        assert line.endswith("yes (but it misses 90 % itself)")


def test_run_bench_rejects_bad_policy_lists():
    settings = BenchSettings(trace=AZURE, limit=5)
    with pytest.raises(ValueError, match="duplicates"):
        run_bench(settings, ["slomesh", "slomesh"], jobs=1)
    with pytest.raises(ValueError, match="at least one"):
        run_bench(settings, [], jobs=1)


def test_sim_command_writes_every_replay_key(tmp_path):
    out = tmp_path / "sim.json"
    rows = tmp_path / "rows.jsonl"
    rc = slomesh_main(
        ["sim", "--trace", AZURE, "--policy", "least-load", "--limit", "40", "--rate-scale", "2",
         "--report-json", str(out), "--results-jsonl", str(rows), "--no-progress", "--quiet"]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    replay_keys = set(build_report([], trace="t", policy="p", duration_s=1.0)) | {
        "rate_scale", "trace_duration_s", "scheduler_address",
    }
    assert replay_keys <= set(report)
    assert report["requests"] == 40 and report["policy"] == "least-load"
    assert report["rate_scale"] == 2.0
    assert report["sim"]["speedup"] > 1 and report["gpus"] == 6
    assert report["fleet_cost_usd"] > 0
    assert len(rows.read_text().splitlines()) == 40


def test_sim_command_errors(tmp_path, capsys):
    args = ["sim", "--trace", AZURE, "--limit", "3", "--report-json", str(tmp_path / "x.json"),
            "--no-progress", "--quiet"]
    assert slomesh_main([*args, "--policy", "no-such-policy"]) == 2
    assert "no-such-policy" in capsys.readouterr().err
    assert slomesh_main([*args, "--state-period-ms", "0"]) == 2
    assert "state_period_ms" in capsys.readouterr().err


def test_bench_command_with_workers(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = slomesh_main(
        ["bench", "--trace", AZURE, "--policies", "round-robin,least-load", "--limit", "80",
         "--report-json", str(out), "--plot", str(png), "--max-points", "3", "--jobs", "2",
         "--no-progress"]
    )
    assert rc == 0
    bench = json.loads(out.read_text())
    assert set(bench["policies"]) == {"round-robin", "least-load"}
    assert all(1 <= len(p["points"]) <= 3 for p in bench["policies"].values())
    assert png.stat().st_size > 1000


def test_fit_context_drops_what_no_instance_can_serve(tmp_path):
    from tests.unit.sim.helpers import azure_trace, one_h100

    topo = one_h100(tmp_path, max_model_len=1024)
    azure_trace(tmp_path, [(0.0, 2000, 10), (0.5, 900, 100), (1.0, 100, 10)], topo)
    common = ["sim", "--trace", str(tmp_path / "tiny_conv.csv"), "--topology",
              str(tmp_path / "topology.yaml"), "--policy", "round-robin", "--no-progress",
              "--quiet"]
    assert slomesh_main([*common, "--report-json", str(tmp_path / "all.json")]) == 0
    full = json.loads((tmp_path / "all.json").read_text())
    assert full["requests"] == 3 and full["oversized_requests"] == 1  # 2000 + 10 > 1024
    assert full["errors"] == {"INVALID_ARGUMENT": 1}
    assert full["dropped_oversized_requests"] == 0
    assert slomesh_main([*common, "--fit-context", "--report-json", str(tmp_path / "fit.json")]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["requests"] == 2 and fit["oversized_requests"] == 0
    assert fit["dropped_oversized_requests"] == 1 and fit["failed"] == 0
