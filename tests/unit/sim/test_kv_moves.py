"""KV moves and prefetches in the simulator: WAN links, the moved prefix served from cache,
the report's accounting, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slomesh.report import build_report
from slomesh.scheduler.policy import BUILTIN_PROFILES
from slomesh.sim.simulator import SimConfig, Simulator
from slomesh.sim.wan import WanLink
from slomesh.topology import Topology
from tests.unit.sim.helpers import TYO, WDC, mooncake_trace

KV_BYTES_PER_TOKEN = 131072
PREFIX = list(range(1, 25))  # 24 Mooncake blocks of 512 tokens


def topology(tmp: Path, link_bytes_per_s: float = 2.5e9, tokyo_gpu: str = "L4") -> Topology:
    """Washington DC (one H100) and Tokyo (one ``tokyo_gpu``), joined by a WAN link of the
    given rate."""
    data = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "max_model_len": 32768},
        "default_link_capacity_bytes_per_s": link_bytes_per_s,
        "regions": [
            {
                "name": name, "location": location, "cloud_region": cloud,
                "egress_usd_per_gb": 0.02, "instances": [{"id": iid, "gpu_type": gpu}],
            }
            for (name, location, cloud), (iid, gpu) in (
                (WDC, ("wdc-h100-0", "H100")), (TYO, ("tyo-0", tokyo_gpu))
            )
        ],
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return Topology.load(path)


def busy_source_trace(tmp: Path, topo: Topology):
    """Washington DC serves a 12,288-token prefix, then ten batch-class prompts keep its H100
    busy for seconds; a Tokyo client then sends that prefix plus 512 tokens (chat class), and
    again 19 s later."""
    rows = [(0.0, 24 * 512, 8, PREFIX)]
    rows += [(1.0 + 0.001 * k, 24 * 512, 8, list(range(100 + 30 * k, 124 + 30 * k))) for k in range(10)]
    rows += [(1.05, 25 * 512, 8, [*PREFIX, 900]), (20.0, 25 * 512, 8, [*PREFIX, 901])]
    trace = mooncake_trace(tmp, rows, topo)
    for i, r in enumerate(trace.requests):
        r.origin_region = "tokyo" if i >= 11 else "washington-dc"
        if 1 <= i <= 10:
            r.slo_class = "batch"
    return trace


class TestWanLink:
    def test_foreground_is_first_in_first_out_at_full_capacity(self):
        link = WanLink("a", "b", 1000.0)
        assert link.foreground(500, 0.0) == pytest.approx(0.5)
        assert link.foreground(1000, 0.1) == pytest.approx(1.5)  # behind the first
        assert link.foreground(100, 3.0) == pytest.approx(3.1)  # idle link again
        assert link.foreground_bytes == 1600

    def test_background_uses_only_what_the_foreground_leaves(self):
        link = WanLink("a", "b", 1000.0)
        link.background(1000, "p1", 0.0)
        assert link.next_background_end_s() == pytest.approx(1.0)
        link.foreground(500, 0.4)  # preempts it for 0.5 s
        assert link.next_background_end_s() == pytest.approx(1.5)
        link.advance(1.49)
        assert link.take_finished() == []
        link.advance(1.5)
        done = link.take_finished()
        assert [j.payload for j in done] == ["p1"] and done[0].end_s == pytest.approx(1.5)
        assert link.background_bytes == 1000 and link.next_background_end_s() is None

    def test_bad_capacity(self):
        with pytest.raises(ValueError, match="capacity_bytes_per_s"):
            WanLink("a", "b", 0.0)


PREFIX_MOVES = {**BUILTIN_PROFILES["slomesh"], "kv_move_scope": "prefix"}
"""slomesh moving any cached prefix (an engine whose connector loads the longest stored prefix):
the moved prefix here is a conversation's earlier turn, shorter than the prompt."""


class TestKvMoveInTheSimulator:
    def test_a_busy_source_makes_the_move_win_and_tokyo_serves_the_prefix_from_cache(
        self, tmp_path
    ):
        topo = topology(tmp_path)
        trace = busy_source_trace(tmp_path, topo)
        held_after: list[int] = []

        def on_decision(t, req, decision, view):
            if req.request_id == trace.requests[12].request_id:
                tokens = req.prompt_token_ids
                held_after.append(view.cached_prefix_tokens(["tyo-0"], tokens)["tyo-0"])

        out = Simulator(topo, PREFIX_MOVES, SimConfig(), on_decision=on_decision).run(trace)
        moved = out.records[11]
        assert moved.ok and moved.instance_id == "tyo-0"
        nbytes = 24 * 512 * KV_BYTES_PER_TOKEN
        assert moved.kv_move_bytes == nbytes and moved.kv_move_source_region == "washington-dc"
        # The link was idle: the bytes at 2.5 GB/s, then the two control round trips.
        rtt_ms = topo.rtt_ms("washington-dc", "tokyo")
        assert moved.kv_transfer_ms == pytest.approx(nbytes / 2.5e9 * 1000.0 + 2 * rtt_ms)
        assert moved.predicted_transfer_ms == pytest.approx(moved.kv_transfer_ms)
        # The engine found the moved blocks in its cache and the agent's index published them.
        assert moved.cached_prompt_tokens == 24 * 512
        assert held_after == [24 * 512]
        report = build_report(
            out.results, trace="t", policy="slomesh", duration_s=out.duration_s, topology=topo
        )
        assert report["kv_moves"] == 1 and report["cross_region_kv_bytes"] == nbytes
        assert report["cross_region_bytes"] >= nbytes
        assert report["egress_cost_usd"] >= nbytes / 1e9 * 0.02
        assert out.stats["kv_moves"] == 1 and out.stats["kv_move_bytes"] == nbytes

    def test_without_moves_tokyo_waits_longer(self, tmp_path):
        topo = topology(tmp_path)
        trace = busy_source_trace(tmp_path, topo)
        on = Simulator(topo, PREFIX_MOVES, SimConfig()).run(trace)
        off_profile = {**PREFIX_MOVES, "name": "off", "kv_moves": False}
        off = Simulator(topo, off_profile, SimConfig()).run(busy_source_trace(tmp_path, topo))
        assert off.records[11].kv_move_bytes == 0
        assert on.results[11].ttft_ms < off.results[11].ttft_ms or not off.results[11].ok

    def test_moves_are_deterministic(self, tmp_path):
        topo = topology(tmp_path)
        runs = [
            Simulator(topo, PREFIX_MOVES, SimConfig()).run(busy_source_trace(tmp_path, topo))
            for _ in range(2)
        ]
        assert [r.result() for r in runs[0].records] == [r.result() for r in runs[1].records]

    def test_a_slow_link_keeps_the_prefix_where_it_is(self, tmp_path):
        topo = topology(tmp_path, link_bytes_per_s=1e6)  # 1.6 GB would take half an hour
        out = Simulator(topo, PREFIX_MOVES, SimConfig()).run(busy_source_trace(tmp_path, topo))
        assert out.stats["kv_moves"] == 0


class TestBenchKvMoves:
    def test_modes_name_the_policies_run(self):
        from slomesh.benchmarks.capacity import with_kv_moves

        assert with_kv_moves(["slomesh", "llm-d"], "profile") == ["slomesh", "llm-d"]
        assert with_kv_moves(["slomesh", "llm-d"], "both") == [
            "slomesh", "slomesh-no-kv-moves", "llm-d"
        ]
        assert with_kv_moves(["slomesh", "llm-d"], "off") == ["slomesh-no-kv-moves", "llm-d"]
        with pytest.raises(ValueError, match="--kv-moves"):
            with_kv_moves(["slomesh"], "sometimes")

    def test_the_no_moves_variant_is_the_profile_without_moves_or_prefetch(self):
        from slomesh.benchmarks.capacity import policy_source
        from slomesh.scheduler.policy import make_policy

        assert policy_source("slomesh") == "slomesh"
        policy = make_policy(policy_source("oracle-no-kv-moves"))
        assert policy.name == "oracle-no-kv-moves"
        assert not policy.profile.kv_moves and policy.prefetch_config is None
        assert policy.predictor_config.use_true_output_length  # the rest is the oracle's
