"""The simulator on hand-checkable cases: exact TTFT from known step times, the RTT paid once
each way, refusals, determinism, the decode-run fast path, KV index flow, and stale state."""

from __future__ import annotations

import dataclasses

import pytest

from slomesh.engine.profiles import DEFAULT_MODEL, get_profile, step_time_s
from slomesh.report import build_report
from slomesh.sim import EPOCH_UNIX_NS, SimConfig, Simulator
from slomesh.topology import Topology, shared_data_dir
from slomesh.traces import load_trace
from tests.unit.sim.helpers import (
    WDC,
    azure_trace,
    make_topology,
    mooncake_trace,
    one_h100,
    wdc_and_tokyo,
)

H100 = get_profile("H100")
IDEAL_STACK = SimConfig(request_path_ms=0, token_path_ms=0)
"""No serving-stack latency: timings are the engine's steps and the WAN alone."""


def prefill_s(n: int, cached: int = 0, decode_seqs: int = 0, decode_context: int = 0) -> float:
    """One engine step computing `n` prompt tokens after `cached` ones, beside decodes."""
    pairs = decode_context + n * cached + n * (n + 1) / 2
    return step_time_s(
        H100, DEFAULT_MODEL, n, decode_seqs, decode_context + cached + n, attention_pairs=pairs
    )


def decode_s(context: int, batch: int = 1) -> float:
    """One decode step of `batch` sequences attending to `context` tokens in all."""
    return step_time_s(H100, DEFAULT_MODEL, 0, batch, context, attention_pairs=float(context))


def records_by_id(outcome):
    return {r.request_id: r for r in outcome.records}


class TestOneInstance:
    def test_ttft_tpot_e2e_are_the_step_times(self, tmp_path):
        topo = one_h100(tmp_path)
        trace = azure_trace(tmp_path, [(0.0, 100, 5)], topo)
        out = Simulator(topo, "round-robin", IDEAL_STACK).run(trace)
        (res,) = out.results
        # Prefill of 100 tokens (first token), then 4 decode steps over 101..104 tokens.
        d0 = prefill_s(100)
        decodes = [decode_s(101 + j) for j in range(4)]
        assert res.ok and res.completion_tokens == 5
        assert res.region == "washington-dc" and res.instance_id == "wdc-h100-0"
        assert res.ttft_ms == pytest.approx(d0 * 1000, rel=1e-12)
        assert res.e2e_ms == pytest.approx((d0 + sum(decodes)) * 1000, rel=1e-12)
        assert res.tpot_ms == pytest.approx(sum(decodes) / 4 * 1000, rel=1e-12)
        assert out.duration_s == pytest.approx(d0 + sum(decodes), rel=1e-12)

    def test_request_arriving_mid_step_joins_the_next_step(self, tmp_path):
        topo = one_h100(tmp_path)
        d_a = prefill_s(200)
        t_b = d_a / 2  # B arrives while A's prefill runs
        trace = azure_trace(tmp_path, [(0.0, 200, 3), (t_b, 64, 2)], topo)
        out = Simulator(topo, "round-robin", IDEAL_STACK).run(trace)
        a, b = out.results
        # Step 2 starts when A's prefill ends: A's first decode (context 201) beside B's whole
        # prefill of 64 tokens; it produces B's first token.
        step2 = prefill_s(64, decode_seqs=1, decode_context=201)
        rec_b = records_by_id(out)[b.request_id]
        assert rec_b.arrival_s == pytest.approx(t_b, abs=1e-6)
        assert b.ttft_ms == pytest.approx((d_a + step2 - rec_b.arrival_s) * 1000, rel=1e-9)
        assert a.ttft_ms == pytest.approx(d_a * 1000, rel=1e-12)

    def test_agent_accounting_and_pending_placements_reach_the_view(self, tmp_path):
        topo = one_h100(tmp_path)
        trace = azure_trace(tmp_path, [(0.0, 3000, 400), (0.01, 3000, 400), (0.2, 100, 5)], topo)
        seen = []

        def on_decision(now, request, decision, view):
            (inst,) = view.instances()
            seen.append((inst.num_requests_outstanding, inst.pending_placements))

        # States are published at -0.05, 0.05, 0.15, ... and delivered 5 ms later.
        config = SimConfig(warmup_ms=550)
        Simulator(topo, "least-load", config, on_decision=on_decision).run(trace)
        # Right after each placement: at 0 and 0.01 s no state reflects the requests yet, only
        # the view's optimistic accounting does; at 0.2 s the state of 0.15 s shows the first
        # two as outstanding at the agent, and only the third is pending.
        assert seen == [(1, 1), (2, 2), (3, 1)]


class TestWan:
    def test_rtt_is_paid_once_each_way(self, tmp_path):
        topo = wdc_and_tokyo(tmp_path)
        rtt_ms = topo.rtt_ms("tokyo", "washington-dc")
        assert rtt_ms > 100
        only_wdc = {
            "name": "only-wdc",
            "filters": [
                "healthy",
                "fresh",
                "serves-model",
                {"name": "region-allowlist", "params": {"regions": ["washington-dc"]}},
            ],
            "scorers": [],
            "picker": "round-robin",
        }
        trace = azure_trace(
            tmp_path, [(0.0, 100, 5)], topo, shares={"tokyo": 1.0, "washington-dc": 0.0}
        )
        out = Simulator(topo, only_wdc, IDEAL_STACK).run(trace)
        (res,) = out.results
        assert res.origin_region == "tokyo" and res.region == "washington-dc"
        d0 = prefill_s(100)
        decodes = sum(decode_s(101 + j) for j in range(4))
        assert res.ttft_ms == pytest.approx(d0 * 1000 + rtt_ms, rel=1e-12)
        assert res.e2e_ms == pytest.approx((d0 + decodes) * 1000 + rtt_ms, rel=1e-12)
        assert res.tpot_ms == pytest.approx(decodes / 4 * 1000, rel=1e-12)  # no RTT per token
        rec = out.records[0]
        assert rec.at_agent_s == pytest.approx(rtt_ms / 2000, rel=1e-12)
        report = build_report(out.results, trace="t", policy="p", duration_s=1.0, topology=topo)
        assert report["cross_region_bytes"] == (100 + 5) * 4


    def test_stack_latencies_add_to_ttft_and_e2e_once_each_way(self, tmp_path):
        topo = one_h100(tmp_path)
        trace = azure_trace(tmp_path, [(0.0, 100, 5)], topo)
        config = SimConfig(request_path_ms=3.0, token_path_ms=4.0)
        out = Simulator(topo, "round-robin", config).run(trace)
        (res,) = out.results
        d0 = prefill_s(100)
        decodes = sum(decode_s(101 + j) for j in range(4))
        assert out.records[0].at_agent_s == pytest.approx(0.003, rel=1e-12)
        assert res.ttft_ms == pytest.approx(3.0 + d0 * 1000 + 4.0, rel=1e-12)
        assert res.e2e_ms == pytest.approx(3.0 + (d0 + decodes) * 1000 + 4.0, rel=1e-12)
        assert res.tpot_ms == pytest.approx(decodes / 4 * 1000, rel=1e-12)

    def test_negative_stack_latency_is_rejected(self):
        with pytest.raises(ValueError, match="token_path_ms"):
            SimConfig(token_path_ms=-1)


class TestFailures:
    def test_refused_requests_fail_and_do_not_attain(self, tmp_path):
        topo = one_h100(tmp_path)
        slo_file = tmp_path / "slo.yaml"
        slo_file.write_text("classes:\n  chat: {ttft_base_ms: 1, ttft_per_prompt_token_ms: 0}\n")
        from slomesh.slo import load_slo_config

        trace = azure_trace(tmp_path, [(0.0, 500, 10), (1.0, 600, 10), (2.0, 700, 10)], topo)
        out = Simulator(topo, "slomesh", slo=load_slo_config(slo_file)).run(trace)
        assert [r.error_code for r in out.results] == ["RESOURCE_EXHAUSTED"] * 3
        assert all(not r.ok and r.region == "" for r in out.results)
        assert all(rec.outcome == "refused" for rec in out.records)
        report = build_report(
            out.results, trace="t", policy=out.policy, duration_s=1.0,
            slo_classes=load_slo_config(slo_file).classes,
        )
        assert report["failed"] == 3 and report["slo_attainment"] == 0.0
        assert report["errors"] == {"RESOURCE_EXHAUSTED": 3}

    def test_too_long_prompts_are_invalid(self, tmp_path):
        topo = one_h100(tmp_path, max_model_len=1024)
        trace = azure_trace(tmp_path, [(0.0, 2000, 10), (0.5, 1000, 100), (1.0, 100, 10)], topo)
        out = Simulator(topo, "round-robin").run(trace)
        codes = [r.error_code for r in out.results]
        assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", ""]
        assert "max_model_len" in out.results[0].error
        assert out.results[2].ok

    def test_a_region_without_state_for_longer_than_the_staleness_bound_is_unroutable(
        self, tmp_path
    ):
        topo = one_h100(tmp_path)
        trace = azure_trace(tmp_path, [(0.0, 100, 5), (2.0, 100, 5), (2.6, 100, 5)], topo)
        # States at -0.5 s and 2.5 s (delivered 5 ms later); the bound is 1 s.
        config = SimConfig(state_period_ms=3000, staleness_ms=1000, warmup_ms=500)
        out = Simulator(topo, "round-robin", config).run(trace)
        assert [r.error_code for r in out.results] == ["", "UNAVAILABLE", ""]
        assert out.records[1].outcome == "unavailable"


class TestStaleness:
    @pytest.mark.parametrize("delay_ms", [0.0, 40.0, 300.0])
    def test_policy_sees_state_exactly_as_old_as_delay_plus_period(self, tmp_path, delay_ms):
        topo = wdc_and_tokyo(tmp_path)
        period_ms = 100.0
        rows = [(0.05 + 0.137 * i, 300, 20) for i in range(30)]
        trace = azure_trace(tmp_path, rows, topo)
        ages = []

        def on_decision(now, request, decision, view):
            for region in ("washington-dc", "tokyo"):
                state = view.region_state(region)
                ages.append(now - (state.timestamp_unix_ns - EPOCH_UNIX_NS) / 1e9)

        config = SimConfig(state_delay_ms=delay_ms, state_period_ms=period_ms)
        Simulator(topo, "least-load", config, on_decision=on_decision).run(trace)
        assert len(ages) == 60
        # The newest state a decision can see was published at least `delay` ago and at most
        # `delay + period` ago.
        assert min(ages) >= delay_ms / 1000 - 1e-9
        assert max(ages) <= (delay_ms + period_ms) / 1000 + 1e-9
        assert max(ages) - min(ages) > period_ms / 1000 / 2  # decisions fall across the period

    def test_stale_state_changes_placements(self, tmp_path):
        """A burst to one origin: with fresh state least-load sees the queue build up; with
        state 2 s old (still fresh enough to route) every decision sees the same idle
        instances and relies on the optimistic accounting alone."""
        topo = wdc_and_tokyo(tmp_path)
        rows = [(0.3 * i, 2000, 300) for i in range(20)]
        trace = azure_trace(tmp_path, rows, topo, shares={"washington-dc": 1.0, "tokyo": 0.0})
        seen = {}

        def recorder(key):
            def on_decision(now, request, decision, view):
                seen.setdefault(key, []).append(
                    sum(i.num_requests_running for i in view.instances())
                )

            return on_decision

        fresh = SimConfig(state_delay_ms=0)
        stale = SimConfig(state_delay_ms=2000, staleness_ms=3000, warmup_ms=2500)
        Simulator(topo, "least-load", fresh, on_decision=recorder("fresh")).run(trace)
        Simulator(topo, "least-load", stale, on_decision=recorder("stale")).run(trace)
        assert max(seen["fresh"][:7]) > 0  # running requests show up within 2 s
        assert seen["stale"][:7] == [0] * 7  # the first 2 s are invisible with a 2 s delay


@pytest.fixture(scope="module")
def azure():
    """The default topology and a loader of the first 150 Azure requests at a rate scale."""
    topo = Topology.default()
    path = shared_data_dir() / "traces" / "azure_llm_2023_conv.csv"
    return topo, lambda scale: load_trace(path, limit=150, rate_scale=scale, regions=topo.region_names)


class TestDeterminismAndFastPath:
    def test_same_seed_same_results(self, azure):
        topo, trace = azure
        a = Simulator(topo, "slomesh", SimConfig(seed=3)).run(trace(4.0))
        b = Simulator(topo, "slomesh", SimConfig(seed=3)).run(trace(4.0))
        assert [dataclasses.asdict(r) for r in a.results] == [
            dataclasses.asdict(r) for r in b.results
        ]
        assert a.stats == b.stats

    @pytest.mark.parametrize("policy", ["slomesh", "least-load", "round-robin"])
    def test_decode_runs_change_nothing(self, azure, policy):
        topo, trace = azure
        fast = Simulator(topo, policy, SimConfig(decode_runs=True)).run(trace(6.0))
        slow = Simulator(topo, policy, SimConfig(decode_runs=False)).run(trace(6.0))
        assert fast.stats["decode_runs"] > 0 and slow.stats["decode_runs"] == 0
        assert fast.stats["engine_steps"] == slow.stats["engine_steps"]
        assert [dataclasses.asdict(r) for r in fast.records] == [
            dataclasses.asdict(r) for r in slow.records
        ]


class TestKvIndex:
    def test_a_repeated_prefix_is_found_by_the_scheduler_and_the_engine(self, tmp_path):
        """Two Mooncake requests sharing 3 of 4 hash blocks (1536 tokens), 2 s apart: the
        second is predicted and served with the shared prefix cached."""
        topo = one_h100(tmp_path)
        trace = mooncake_trace(
            tmp_path, [(0.0, 2000, 10, [1, 2, 3, 4]), (2.0, 2000, 10, [1, 2, 3, 9])], topo
        )
        predicted = []

        def on_decision(now, request, decision, view):
            predicted.append(decision.chosen.prediction.cached_prefix_tokens)

        out = Simulator(topo, "slomesh", on_decision=on_decision).run(trace)
        assert predicted == [0, 1536]
        assert [r.cached_prompt_tokens for r in out.results] == [0, 1536]
        assert out.stats["kv_deltas_applied"] >= 1


class TestOutputLengths:
    def test_the_scheduler_learns_output_lengths_at_stream_ends(self, tmp_path):
        """25 requests 1 s apart with outputs 5, 7, 9, 5, ...: each has ended at the scheduler
        before the next is placed. The first 20 are predicted with the class default (fewer
        than `output_length_min_samples` = 20 completions); from the 21st on, with the median
        of the completed ones (7), never with max_tokens (the true length under ignore_eos)."""
        topo = one_h100(tmp_path)
        lengths = [(5, 7, 9)[i % 3] for i in range(25)]
        trace = azure_trace(tmp_path, [(float(i), 100, n) for i, n in enumerate(lengths)], topo)
        predicted, defaults, seen = [], [], []

        def on_decision(now, request, decision, view):
            predicted.append(decision.chosen.prediction.output_tokens)
            defaults.append(request.slo.default_output_tokens)
            seen.append(view.output_lengths.count(request.model, request.slo_class))

        out = Simulator(topo, "slomesh", on_decision=on_decision).run(trace)
        assert all(r.ok for r in out.results)
        assert seen == list(range(25))
        assert predicted[:20] == defaults[:20]
        assert predicted[20:] == [7] * 5


class TestQueueWaitError:
    def test_mdape_over_waits_above_the_floor_and_mae_over_all(self):
        from slomesh.sim import SimRecord
        from slomesh.sim.simulator import queue_wait_error

        def rec(predicted, observed):
            return SimRecord("r", 0.0, "x", "chat", 10, 10, predicted_queue_wait_ms=predicted,
                             queue_wait_ms=observed)

        records = [rec(0.0, 5.0), rec(150.0, 100.0), rec(50.0, 100.0), rec(90.0, 100.0),
                   rec(0.0, None)]
        err = queue_wait_error(records, min_observed_ms=50.0)
        assert err["placed"] == 4 and err["compared"] == 3
        assert err["mdape"] == pytest.approx(0.5)  # APEs 0.5, 0.5, 0.1
        assert err["mae_ms"] == pytest.approx((5 + 50 + 50 + 10) / 4)
        assert queue_wait_error([])["compared"] == 0

    def test_the_simulator_records_predicted_and_observed_waits(self, tmp_path):
        topo = one_h100(tmp_path)
        # Two prompts longer than a step's 8192-token budget at once: the second is scheduled
        # only in the step after the first one's first chunk.
        trace = azure_trace(tmp_path, [(0.0, 9000, 5), (0.0, 9000, 5)], topo)
        out = Simulator(topo, "round-robin", IDEAL_STACK).run(trace)
        first, second = out.records
        assert first.queue_wait_ms == pytest.approx(0.0)
        assert second.queue_wait_ms > 0
        assert second.predicted_queue_wait_ms > 0  # the first one's prefill was pending


def test_preemptions_are_counted_and_kv_room_avoids_them(tmp_path):
    # One L4 (~46k tokens of KV): twelve 3000-token prompts arriving together, each decoding
    # 2000 tokens, outgrow its cache (12 x 5000 = 60k tokens) once their decodes run.
    topology = make_topology(tmp_path, [(*WDC, [("wdc-l4-0", "L4")])])
    rows = [(0.01 * i, 3000, 2000) for i in range(12)]
    trace = azure_trace(tmp_path, rows, topology)
    flooded = Simulator(topology, "round-robin").run(trace)
    assert flooded.stats["preemptions"] > 0
    assert flooded.stats["preemptions_by_instance"] == {"wdc-l4-0": flooded.stats["preemptions"]}
    # The oracle (slomesh with the true output lengths) admits only what the cache holds to
    # the end; the rest is refused rather than preempted on the engine.
    held = Simulator(topology, "oracle").run(trace)
    assert held.stats["preemptions"] == 0 and held.stats["preemptions_by_instance"] == {}
    assert any(r.ok for r in held.results)
    refused = [r for r in held.results if not r.ok]
    assert refused and all(r.error_code == "RESOURCE_EXHAUSTED" for r in refused)
