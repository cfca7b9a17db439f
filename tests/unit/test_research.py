"""Tests of the two research studies (`slomesh.research`) on tiny settings."""

from __future__ import annotations

import itertools
import json

import pytest

from slomesh import research
from slomesh.research import (
    HETEROGENEITY_LADDER,
    LOCAL_REGION,
    REMOTE_REGION,
    TAIL_TOKENS,
    heterogeneity_ladder,
    heterogeneity_level,
    prefix_wan_trace,
    study_heterogeneity,
    study_prefix_wan,
)
from slomesh.topology import Topology

PREFIX_KEYS = {
    "rtt_ms",
    "prompt_tokens",
    "ttft_local_ms",
    "ttft_remote_ms",
    "benefit_remote_ms",
    "break_even_rtt_ms",
    "cached_tokens_remote",
    "slomesh_remote_fraction",
    "ttft_slomesh_ms",
    "failed",
}
HETERO_KEYS = {
    "rung",
    "heterogeneity",
    "gpus",
    "policy",
    "slo_attainment",
    "cost_per_mtok_usd",
    "fleet_cost_per_mtok_usd",
    "ttft_p90_ms",
    "fleet_usd_per_hour",
    "fleet_peak_pflops",
    "requests",
    "failed",
}


def _gpus(topology: Topology) -> list[list[str]]:
    return [sorted(i.gpu_type for i in r.instances) for r in topology.regions]


class TestPrefixWan:
    def test_trace_shares_prefix_between_phases_only(self):
        trace = prefix_wan_trace(prompt_tokens=256, requests=2)
        by_id = {r.request_id: r for r in trace.requests}
        assert set(by_id) == {"warm-0", "warm-1", "measure-0", "measure-1"}
        assert by_id["warm-0"].origin_region == REMOTE_REGION
        assert by_id["measure-0"].origin_region == LOCAL_REGION
        warm, meas = by_id["warm-0"].prompt_token_ids, by_id["measure-0"].prompt_token_ids
        assert len(warm) == len(meas) == 256
        prefix = 256 - TAIL_TOKENS
        assert (warm[:prefix] == meas[:prefix]).all()
        assert (warm[prefix:] != meas[prefix:]).any()
        assert (warm[:prefix] != by_id["warm-1"].prompt_token_ids[:prefix]).any()
        # Every warm-up arrives before every measured request.
        assert max(by_id[f"warm-{k}"].arrival_s for k in range(2)) < by_id["measure-0"].arrival_s
        # Tokens survive release (the simulator releases them after sending).
        by_id["measure-0"].release_tokens()
        assert len(by_id["measure-0"].prompt_token_ids) == 256

    def test_trace_rejects_short_prompts(self):
        with pytest.raises(ValueError, match="prompt_tokens"):
            prefix_wan_trace(prompt_tokens=TAIL_TOKENS, requests=1)

    def test_physics_of_the_break_even(self):
        rows = study_prefix_wan(rtts_ms=[1.0, 400.0], prompt_tokens=[512, 16384], requests=1)
        assert [(r["rtt_ms"], r["prompt_tokens"]) for r in rows] == [
            (1.0, 512),
            (1.0, 16384),
            (400.0, 512),
            (400.0, 16384),
        ]
        for r in rows:
            assert set(r) == PREFIX_KEYS
            assert r["failed"] == 0
            # The remote instance really holds the prefix (full blocks of it).
            assert r["cached_tokens_remote"] >= (r["prompt_tokens"] - TAIL_TOKENS) // 16 * 16
        cell = {(r["rtt_ms"], r["prompt_tokens"]): r for r in rows}
        far_short = cell[(400.0, 512)]
        near_long = cell[(1.0, 16384)]
        # Far away, short prompt: recompute locally wins.
        assert far_short["ttft_remote_ms"] > far_short["ttft_local_ms"]
        assert far_short["benefit_remote_ms"] < 0
        # Next door, long prompt: the cached prefix wins by a wide margin.
        assert near_long["ttft_remote_ms"] < near_long["ttft_local_ms"] / 2
        assert near_long["benefit_remote_ms"] > 0
        # Remote TTFT grows with the RTT (one round trip), local TTFT does not depend on it.
        delta = cell[(400.0, 16384)]["ttft_remote_ms"] - near_long["ttft_remote_ms"]
        assert delta == pytest.approx(399.0, abs=5.0)
        assert cell[(400.0, 512)]["ttft_local_ms"] == pytest.approx(
            cell[(1.0, 512)]["ttft_local_ms"], rel=1e-6
        )
        # slomesh takes the better side in these clear-cut cells.
        assert near_long["slomesh_remote_fraction"] == 1.0
        assert far_short["slomesh_remote_fraction"] == 0.0
        assert far_short["ttft_slomesh_ms"] == pytest.approx(far_short["ttft_local_ms"])
        # The break-even RTT is a property of the prompt length, not of the RTT swept.
        assert cell[(1.0, 512)]["break_even_rtt_ms"] == pytest.approx(
            far_short["break_even_rtt_ms"], abs=1.0
        )
        assert 1.0 < far_short["break_even_rtt_ms"] < 400.0

    def test_cli_writes_table_plot_and_json(self, tmp_path, capsys):
        plot = tmp_path / "wan.png"
        out = tmp_path / "wan.json"
        rc = research.prefix_wan_main(
            [
                "--rtts-ms",
                "5,300",
                "--prompt-tokens",
                "1024",
                "--requests",
                "1",
                "--plot",
                str(plot),
                "--report-json",
                str(out),
            ]
        )
        assert rc == 0
        assert plot.stat().st_size > 1000
        data = json.loads(out.read_text())
        assert [r["rtt_ms"] for r in data["rows"]] == [5.0, 300.0]
        assert "Prefix across the WAN" in capsys.readouterr().out

    def test_cli_rejects_bad_list(self, tmp_path):
        rc = research.prefix_wan_main(["--rtts-ms", "ten", "--plot", str(tmp_path / "x.png")])
        assert rc == 2


class TestHeterogeneity:
    def test_ladder_levels_increase_from_zero(self):
        ladder = heterogeneity_ladder()
        assert [rung.name for rung, _ in ladder] == [r.name for r in HETEROGENEITY_LADDER]
        levels = [heterogeneity_level(topo) for _, topo in ladder]
        assert levels[0] == 0.0
        assert all(b > a for a, b in itertools.pairwise(levels))
        default = Topology.default()
        for _, topo in ladder:
            assert topo.region_names == default.region_names
            assert sum(len(r.instances) for r in topo.regions) == 6
        # The last rung is the default topology's GPU mix.
        assert _gpus(ladder[-1][1]) == _gpus(default)
        assert heterogeneity_level(ladder[-1][1]) == pytest.approx(heterogeneity_level(default))

    def test_study_rows(self, tmp_path):
        rows = study_heterogeneity(limit=20, rate_scale=1.0, policies=["least-load"])
        assert len(rows) == len(HETEROGENEITY_LADDER)
        for r in rows:
            assert set(r) == HETERO_KEYS
            assert r["policy"] == "least-load"
            assert r["requests"] == 20
            assert 0.0 <= r["slo_attainment"] <= 1.0
            assert r["cost_per_mtok_usd"] > 0 and r["fleet_usd_per_hour"] > 0
        assert [r["heterogeneity"] for r in rows] == sorted(r["heterogeneity"] for r in rows)
        path = research.plot_heterogeneity(rows, tmp_path / "h.png", "tiny")
        assert path.stat().st_size > 1000

    def test_unknown_policy_exits_2(self, tmp_path):
        rc = research.heterogeneity_main(
            ["--limit", "5", "--policies", "no-such-policy", "--plot", str(tmp_path / "h.png")]
        )
        assert rc == 2
