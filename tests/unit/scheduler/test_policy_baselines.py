"""Baseline placement policies from the field: nearest, llm-d, dynamo, qlm, and the oracle."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from slomesh.engine.profiles import DEFAULT_MODEL, get_profile
from slomesh.scheduler import predictor as pred
from slomesh.scheduler.policy import (
    BUILTIN_PROFILES,
    Candidate,
    KvCacheUtilizationScorer,
    KvOverlapCostScorer,
    LowestQueueWaitScorer,
    NearestRegionFilter,
    PlacementContext,
    PolicyConfigError,
    PrefixCacheHitScorer,
    QueueDepthScorer,
    SoftmaxSamplePicker,
    make_policy,
)
from slomesh.scheduler.view import ClusterView
from slomesh.v1 import state_pb2
from tests.unit.scheduler.factories import (
    default_topology,
    keys_of,
    make_instance,
    make_request,
    make_state,
    prompt,
)
from tests.unit.scheduler.test_policy import T0, cache, view_with

BASELINES = ["round-robin", "least-load", "nearest", "llm-d", "dynamo", "qlm"]


def candidates_of(view: ClusterView, request, policy: str = "slomesh") -> tuple:
    """Candidates of every instance, with predictions, as a policy's scorers see them."""
    decision = make_policy(policy).place(request, view)
    ctx = PlacementContext(request, view, T0, 0.9, output_tokens=256)
    return ctx, decision.candidates


def by_id(candidates, instance_id: str) -> Candidate:
    return next(c for c in candidates if c.instance_id == instance_id)


class TestNearest:
    def test_stays_in_the_origin_region_even_when_another_is_idle(self):
        busy = make_instance("tyo", outstanding=40, waiting=30, queued_prefill_tokens=500_000)
        view = view_with(
            [
                make_state("tokyo", [busy]),
                make_state("washington-dc", [make_instance("wdc")]),
                make_state("frankfurt", [make_instance("fra")]),
            ]
        )
        decision = make_policy("nearest").place(make_request(origin="tokyo"), view)
        assert decision.outcome == "placed" and decision.chosen.instance_id == "tyo"
        assert not decision.feasible  # it places anyway: never refuses
        reasons = {c.instance_id: c.rejected_by for c in decision.candidates}
        assert reasons == {"tyo": "", "wdc": "nearest-region", "fra": "nearest-region"}

    def test_without_a_serving_origin_instance_goes_to_the_lowest_rtt_region(self):
        view = view_with(
            [
                make_state("washington-dc", [make_instance("wdc", healthy=False)]),
                make_state("frankfurt", [make_instance("fra")]),  # 86 ms from washington-dc
                make_state("tokyo", [make_instance("tyo")]),  # 142 ms
            ]
        )
        decision = make_policy("nearest").place(make_request(origin="washington-dc"), view)
        assert decision.chosen.instance_id == "fra"
        assert decision.chosen.prediction.rtt_ms == 86.0
        assert by_id(decision.candidates, "wdc").rejected_by == "healthy"
        assert by_id(decision.candidates, "tyo").rejected_by == "nearest-region"

    def test_measured_rtts_decide_which_region_is_nearest(self):
        view = view_with([make_state(r, [make_instance(r)]) for r in ("frankfurt", "tokyo")])
        policy = make_policy("nearest")
        assert policy.place(make_request(origin="washington-dc"), view).chosen.region == "frankfurt"
        view.apply_rtt(state_pb2.RttReport(region="tokyo", rtt_ms={"washington-dc": 40.0}))
        assert policy.place(make_request(origin="washington-dc"), view).chosen.region == "tokyo"

    def test_least_load_within_the_region(self):
        view = view_with(
            [
                make_state(
                    "frankfurt",
                    [
                        make_instance("f-busy", outstanding=7),
                        make_instance("f-free", outstanding=2),
                    ],
                ),
                make_state("tokyo", [make_instance("t-idle", outstanding=0)]),
            ]
        )
        decision = make_policy("nearest").place(make_request(origin="frankfurt"), view)
        assert decision.chosen.instance_id == "f-free"

    def test_tie_tolerance(self):
        view = view_with([make_state(r, [make_instance(r)]) for r in ("frankfurt", "tokyo")])
        request = make_request(origin="washington-dc")  # 86 ms and 142 ms away
        ctx = PlacementContext(request, view, T0, 0.9)
        cands = [Candidate(i) for i in view.instances()]
        assert NearestRegionFilter().keep_many(ctx, cands) == [True, False]
        assert NearestRegionFilter(tie_tolerance_ms=60).keep_many(ctx, cands) == [True, True]
        with pytest.raises(ValueError, match="tie_tolerance_ms"):
            NearestRegionFilter(tie_tolerance_ms=-1)


class TestLlmD:
    def test_prefers_the_prefix_holder_at_equal_load(self):
        tokens = prompt(512)
        view = view_with([make_state("tokyo", [make_instance("a"), make_instance("b")])])
        cache(view, "tokyo", {"b": tokens})
        policy = make_policy("llm-d")
        for i in range(10):
            decision = policy.place(make_request(tokens, origin="tokyo", request_id=f"q{i}"), view)
            assert decision.chosen.instance_id == "b"
        # 3 x 1 (whole prompt cached) + 2 x 1 (queues equal) + 2 x (1 - 0) against 0 + 2 + 2.
        assert by_id(decision.candidates, "b").score == pytest.approx(7.0)
        assert by_id(decision.candidates, "a").score == pytest.approx(4.0)

    def test_prefers_the_idle_instance_at_equal_prefix(self):
        tokens = prompt(512)
        busy = make_instance("busy", waiting=6, kv_cache_usage=0.7)
        idle = make_instance("idle")
        view = view_with([make_state("tokyo", [busy, idle])])
        cache(view, "tokyo", {"busy": tokens, "idle": tokens})
        decision = make_policy("llm-d").place(make_request(tokens, origin="tokyo"), view)
        assert decision.chosen.instance_id == "idle"

    def test_weighted_sum_trades_prefix_against_load(self):
        tokens = prompt(512)  # 32 blocks of 16
        holder = make_instance("holder", waiting=4, kv_cache_usage=0.25)
        idle = make_instance("idle", kv_cache_usage=0.5)
        view = view_with([make_state("tokyo", [holder, idle])])
        cache(view, "tokyo", {"holder": tokens[:384]})  # 24 of 32 blocks
        decision = make_policy("llm-d").place(make_request(tokens, origin="tokyo"), view)
        # holder: 3 x 0.75 + 2 x 0 + 2 x 0.75 = 3.75; idle: 0 + 2 x 1 + 2 x 0.5 = 3.0
        assert by_id(decision.candidates, "holder").score == pytest.approx(3.75)
        assert by_id(decision.candidates, "idle").score == pytest.approx(3.0)
        assert decision.chosen.instance_id == "holder"
        cache(view, "tokyo", {"holder": tokens[:128]})  # 8 of 32 blocks: 0.75 + 1.5 = 2.25
        again = make_policy("llm-d").place(make_request(tokens, origin="tokyo"), view)
        assert again.chosen.instance_id == "idle"

    def test_is_region_agnostic(self):
        # The prefix holder is in Tokyo, 142 ms from the client; llm-d goes there anyway.
        tokens = prompt(512)
        view = view_with(
            [
                make_state("washington-dc", [make_instance("wdc")]),
                make_state("tokyo", [make_instance("tyo")]),
            ]
        )
        cache(view, "tokyo", {"tyo": tokens})
        request = make_request(tokens, origin="washington-dc")
        assert make_policy("llm-d").place(request, view).chosen.instance_id == "tyo"
        assert make_policy("slomesh").place(request, view).chosen.instance_id == "wdc"

    def test_scorers(self):
        tokens = prompt(100)  # 6 full blocks of 16; the last 4 tokens form no block
        view = view_with(
            [
                make_state(
                    "tokyo",
                    [
                        make_instance("a", waiting=2, kv_cache_usage=0.3),
                        make_instance("b", waiting=10, kv_cache_usage=1.2),
                        make_instance("c", waiting=6),
                    ],
                )
            ]
        )
        cache(view, "tokyo", {"a": tokens[:48], "b": tokens[:96]})
        ctx, cands = candidates_of(view, make_request(tokens, origin="tokyo"))
        assert [c.prefix_hit_tokens for c in cands] == [48, 96, 0]
        assert PrefixCacheHitScorer().score(ctx, cands) == [0.5, 1.0, 0.0]
        assert QueueDepthScorer().score(ctx, cands) == [1.0, 0.0, 0.5]
        assert KvCacheUtilizationScorer().score(ctx, cands) == pytest.approx([0.7, 0.0, 1.0])
        short_ctx, short = candidates_of(view, make_request(prompt(10), origin="tokyo"))
        assert PrefixCacheHitScorer().score(short_ctx, short) == [0.0, 0.0, 0.0]


class TestDynamo:
    @staticmethod
    def instance(iid: str, **kw) -> state_pb2.InstanceState:
        inst = make_instance(iid, **kw)
        inst.num_gpu_blocks = 1000
        return inst

    def test_cost_arithmetic_on_known_blocks(self):
        tokens = prompt(100)  # 6 full blocks of 16
        inst = self.instance("a", kv_cache_usage=0.1, queued_prefill_tokens=40)
        view = view_with([make_state("tokyo", [inst])])
        cache(view, "tokyo", {"a": tokens[:32]})  # 2 blocks cached -> 68 tokens to prefill
        ctx, cands = candidates_of(view, make_request(tokens, origin="tokyo"))
        cand = cands[0]
        prefill_blocks, decode_blocks = KvOverlapCostScorer.blocks(ctx, cand)
        assert prefill_blocks == pytest.approx((68 + 40) / 16)  # 6.75
        assert decode_blocks == 100 + 3 + 6  # in use + ceil(40 / 16) queued + prompt blocks
        assert KvOverlapCostScorer().cost(ctx, cand) == pytest.approx(6.75 + 109)
        assert KvOverlapCostScorer(overlap_score_weight=2).cost(ctx, cand) == pytest.approx(
            2 * 6.75 + 109
        )
        assert KvOverlapCostScorer(overlap_score_weight=0).cost(ctx, cand) == 109

    def test_num_gpu_blocks_fall_back_to_the_gpu_profile(self):
        view = view_with([make_state("tokyo", [make_instance("a", "H100", kv_cache_usage=0.5)])])
        ctx, cands = candidates_of(view, make_request(prompt(16), origin="tokyo"))
        total = pred.kv_capacity_blocks(cands[0].instance)
        assert total == get_profile("H100").num_gpu_blocks(DEFAULT_MODEL, 16)
        # in use + no queued prompts + the prompt's one block
        assert KvOverlapCostScorer.blocks(ctx, cands[0])[1] == round(0.5 * total) + 0 + 1

    @pytest.mark.parametrize(("usage_a", "expected"), [(0.199, "a"), (0.201, "b")])
    def test_one_uncached_block_weighs_as_much_as_one_active_block(self, usage_a, expected):
        # a holds the whole 1600-token prompt (100 blocks) but has more blocks in use than b:
        # cost a = 0 + (1000 * usage_a + 100); cost b = 100 + (100 + 100) = 300.
        tokens = prompt(1600)
        a = self.instance("a", kv_cache_usage=usage_a)
        b = self.instance("b", kv_cache_usage=0.1)
        view = view_with([make_state("tokyo", [a, b])])
        cache(view, "tokyo", {"a": tokens})
        decision = make_policy("dynamo").place(make_request(tokens, origin="tokyo"), view)
        assert decision.outcome == "placed" and decision.chosen.instance_id == expected

    def test_picks_the_minimum_cost_among_many(self):
        tokens = prompt(320)  # 20 blocks
        insts = [
            self.instance("w1", kv_cache_usage=0.010),  # 10 in use, 8 blocks cached
            self.instance("w2", kv_cache_usage=0.005),  # 5 in use, 15 cached
            self.instance("w3", kv_cache_usage=0.009),  # 9 in use, 18 cached
        ]
        view = view_with([make_state("tokyo", insts)])
        cache(view, "tokyo", {"w1": tokens[:128], "w2": tokens[:240], "w3": tokens[:288]})
        request = make_request(tokens, origin="tokyo")
        decision = make_policy("dynamo").place(request, view)
        ctx = PlacementContext(request, view, T0, 0.9)
        costs = {c.instance_id: KvOverlapCostScorer().cost(ctx, c) for c in decision.candidates}
        assert costs == pytest.approx({"w1": 12 + 30, "w2": 5 + 25, "w3": 2 + 29})
        assert decision.chosen.instance_id == "w2"

    def test_counts_a_placement_the_moment_it_routes_it(self):
        tokens = [prompt(800, start=i * 10_000) for i in range(2)]
        view = view_with([make_state("tokyo", [self.instance("a"), self.instance("b")])])
        policy = make_policy("dynamo")
        first = policy.place(make_request(tokens[0], origin="tokyo", request_id="q0"), view)
        p = first.chosen.prediction
        view.record_placement(
            "tokyo",
            first.chosen.instance_id,
            "q0",
            p.uncached_prompt_tokens,
            p.output_tokens,
            placed_unix_ns=T0,
        )
        second = policy.place(make_request(tokens[1], origin="tokyo", request_id="q1"), view)
        assert second.chosen.instance_id != first.chosen.instance_id

    def test_ties_go_to_the_instance_with_fewest_cached_blocks(self):
        view = view_with([make_state("tokyo", [self.instance("a"), self.instance("b")])])
        cache(view, "tokyo", {"a": prompt(160, start=50_000), "b": []})  # unrelated blocks
        policy = make_policy("dynamo")
        picks = {
            policy.place(make_request(origin="tokyo", request_id=f"q{i}"), view).chosen.instance_id
            for i in range(20)
        }
        assert picks == {"b"}

    def test_is_region_agnostic(self):
        tokens = prompt(4096)
        view = view_with(
            [
                make_state("washington-dc", [self.instance("wdc")]),
                make_state("tokyo", [self.instance("tyo")]),
            ]
        )
        cache(view, "tokyo", {"tyo": tokens})
        decision = make_policy("dynamo").place(make_request(tokens, origin="washington-dc"), view)
        assert decision.chosen.instance_id == "tyo" and decision.chosen.prediction.rtt_ms > 0

    def test_softmax_sampling_at_a_temperature(self):
        view = view_with([make_state("tokyo", [self.instance("a"), self.instance("b")])])
        request = make_request(origin="tokyo")
        ctx = PlacementContext(request, view, T0, 0.9)
        cands = [Candidate(i) for i in view.instances()]
        picker = SoftmaxSamplePicker(temperature=1.0, seed=7)
        counts = Counter(picker.pick(ctx, cands, [1.0, 0.0]).instance_id for _ in range(4000))
        assert counts["a"] / 4000 == pytest.approx(math.e / (1 + math.e), abs=0.03)
        cold = SoftmaxSamplePicker(temperature=0.0)
        assert {cold.pick(ctx, cands, [1.0, 0.0]).instance_id for _ in range(50)} == {"a"}
        with pytest.raises(ValueError, match="temperature"):
            SoftmaxSamplePicker(temperature=-0.5)

    def test_bad_weight_is_rejected(self):
        profile = {
            **BUILTIN_PROFILES["dynamo"],
            "scorers": [{"name": "kv-overlap-cost", "params": {"overlap_score_weight": -1}}],
        }
        with pytest.raises(PolicyConfigError, match="overlap_score_weight"):
            make_policy(profile)


class TestQlm:
    def test_picks_the_lowest_predicted_queue_wait(self):
        # a has more queued tokens but drains them faster: 10k at 10k tok/s = 1 s;
        # b: 3k at 1k tok/s = 3 s.
        # (GPU type "CPU" has no roofline: the measured throughputs time the queue.)
        a = make_instance(
            "a", gpu_type="CPU", queued_prefill_tokens=10_000, prefill_tokens_per_s=10_000
        )
        b = make_instance(
            "b", gpu_type="CPU", queued_prefill_tokens=3_000, prefill_tokens_per_s=1_000
        )
        view = view_with([make_state("tokyo", [a, b])])
        request = make_request(origin="tokyo")
        decision = make_policy("qlm").place(request, view)
        assert decision.chosen.instance_id == "a"
        ctx = PlacementContext(request, view, T0, 0.9, output_tokens=256)
        waits = [pred.queue_wait_ms(c.instance, 100 + 256) for c in decision.candidates]
        assert waits == pytest.approx([1000.0, 3000.0])
        assert LowestQueueWaitScorer().score(ctx, decision.candidates) == [1.0, 0.0]

    def test_ignores_prefix_and_rtt(self):
        tokens = prompt(2048)
        near = make_instance("near", queued_prefill_tokens=2_000, prefill_tokens_per_s=10_000)
        holder = make_instance("holder", queued_prefill_tokens=2_100, prefill_tokens_per_s=10_000)
        far = make_instance("far", queued_prefill_tokens=1_000, prefill_tokens_per_s=10_000)
        view = view_with([make_state("washington-dc", [near, holder]), make_state("tokyo", [far])])
        cache(view, "washington-dc", {"holder": tokens})
        request = make_request(tokens, origin="washington-dc")
        assert make_policy("qlm").place(request, view).chosen.instance_id == "far"
        view_near = view_with([make_state("washington-dc", [near, holder])])
        cache(view_near, "washington-dc", {"holder": tokens})
        assert make_policy("qlm").place(request, view_near).chosen.instance_id == "near"


class TestOracle:
    def test_profile_is_slomesh_plus_true_output_lengths(self):
        slomesh, oracle = BUILTIN_PROFILES["slomesh"], BUILTIN_PROFILES["oracle"]
        differ = {k for k in slomesh.keys() | oracle.keys() if slomesh.get(k) != oracle.get(k)}
        assert differ == {"name", "description", "predictor"}
        assert oracle["predictor"] == {"use_true_output_length": True}
        assert make_policy("oracle").predictor_config.use_true_output_length
        assert not make_policy("slomesh").predictor_config.use_true_output_length

    def test_same_decisions_as_slomesh_without_a_true_length(self):
        tokens = prompt(1024)
        view = view_with(
            [
                make_state(r, [make_instance(f"{r}-0", "L40S", price_usd_per_hour=2.0, running=3)])
                for r in ("washington-dc", "frankfurt", "tokyo")
            ]
        )
        cache(view, "frankfurt", {"frankfurt-0": tokens})
        for kwargs in ({}, {"expected_output_tokens": 40}, {"max_tokens": 20}):
            request = make_request(tokens, **kwargs)  # no ignore_eos: nobody knows the length
            a = make_policy("slomesh").place(request, view)
            b = make_policy("oracle").place(request, view)
            assert (a.outcome, a.chosen.instance_id) == (b.outcome, b.chosen.instance_id)
            assert [c.prediction for c in a.candidates] == [c.prediction for c in b.candidates]

    def test_only_the_oracle_reads_the_true_length(self):
        view = view_with([make_state("tokyo", [make_instance("t")])])
        true_length = 900
        request = make_request(origin="tokyo", max_tokens=true_length, ignore_eos=True)
        honest = make_policy("slomesh").place(request, view).chosen.prediction
        oracle = make_policy("oracle").place(request, view).chosen.prediction
        assert honest.output_tokens == 256  # the chat class default, not max_tokens
        assert oracle.output_tokens == true_length
        hinted = make_request(
            origin="tokyo", max_tokens=true_length, ignore_eos=True, expected_output_tokens=50
        )
        assert make_policy("slomesh").place(hinted, view).chosen.prediction.output_tokens == 50
        assert make_policy("oracle").place(hinted, view).chosen.prediction.output_tokens == 900
        short = make_request(origin="tokyo", max_tokens=3, ignore_eos=True)
        # Not even as a cap: min(256, max_tokens) would reveal a short true length.
        assert make_policy("slomesh").place(short, view).chosen.prediction.output_tokens == 256

    def test_knowing_a_short_output_changes_the_placement(self):
        # A slow-decoding L4 next to the client, a fast H100 86 ms away. For the class-default
        # 256 output tokens the H100 finishes far sooner; for the true single token the local
        # L4 answers first.
        view = view_with(
            [
                make_state("washington-dc", [make_instance("wdc", "L4", price_usd_per_hour=1.0)]),
                make_state("frankfurt", [make_instance("fra", "H100", price_usd_per_hour=1.0)]),
            ]
        )
        # Latency alone decides (no cost-first band): at equal prices the H100 is also the
        # cheaper per request, and money would pick it for both.
        request = make_request(prompt(200), max_tokens=1, ignore_eos=True)
        honest = make_policy("slomesh", cost_first_slo_usage=0.0).place(request, view)
        oracle = make_policy("oracle", cost_first_slo_usage=0.0).place(request, view)
        assert honest.chosen.instance_id == "fra" and oracle.chosen.instance_id == "wdc"
        assert oracle.chosen.prediction.e2e_ms < by_id(oracle.candidates, "fra").prediction.e2e_ms


    def test_predictor_flag_must_be_a_bool(self):
        with pytest.raises(PolicyConfigError, match="use_true_output_length"):
            make_policy({"name": "x", "predictor": {"use_true_output_length": "yes"}})


class TestAllBaselines:
    @pytest.mark.parametrize("name", BASELINES)
    def test_never_refuses(self, name):
        busy = make_instance(
            "a",
            "L4",
            waiting=50,
            outstanding=80,
            kv_cache_usage=0.95,
            queued_prefill_tokens=10**7,
            prefill_tokens_per_s=1000,
        )
        view = view_with([make_state("tokyo", [busy])])
        decision = make_policy(name).place(make_request(origin="tokyo"), view)
        assert decision.outcome == "placed" and not decision.feasible
        placement = decision.to_placement("relay:1")
        assert placement.policy == name and placement.instance_id == "a"
        assert placement.predicted.ttft_ms > 1000

    @pytest.mark.parametrize("name", [*BASELINES, "slomesh", "oracle"])
    def test_unhealthy_and_stale_instances_are_never_chosen(self, name):
        view = ClusterView(default_topology(), clock_ns=lambda: T0, staleness_ms=100)
        view.apply_state(make_state("tokyo", [make_instance("stale")]), T0 - 500 * 10**6)
        view.apply_state(
            make_state("frankfurt", [make_instance("sick", healthy=False), make_instance("ok")]),
            T0,
        )
        rng = random.Random(1)
        for i in range(5):
            request = make_request(prompt(rng.randint(20, 400)), origin="tokyo", request_id=f"q{i}")
            assert make_policy(name).place(request, view).chosen.instance_id == "ok"

    @pytest.mark.parametrize(
        "cls",
        [
            NearestRegionFilter,
            PrefixCacheHitScorer,
            QueueDepthScorer,
            KvCacheUtilizationScorer,
            KvOverlapCostScorer,
            LowestQueueWaitScorer,
            SoftmaxSamplePicker,
        ],
    )
    def test_plugins_name_their_source(self, cls):
        assert "Source:" in cls.__doc__

    def test_prefix_hit_is_the_unclipped_index_match(self):
        # A fully cached 64-token prompt: the predictor recomputes the last token (63 cached),
        # the prefix-hit scorers see all 4 blocks.
        tokens = prompt(64)
        view = view_with([make_state("tokyo", [make_instance("a"), make_instance("b")])])
        view.apply_kv_snapshot(
            state_pb2.KvIndexSnapshot(
                region="tokyo",
                agent_incarnation="inc-1",
                instances=[
                    state_pb2.InstanceBlockDelta(
                        instance_id="a", stored_keys=keys_of(tokens), block_size=16
                    ),
                    state_pb2.InstanceBlockDelta(
                        instance_id="b", stored_keys=keys_of(tokens)[:3], block_size=16
                    ),
                ],
            )
        )
        ctx, cands = candidates_of(view, make_request(tokens, origin="tokyo"))
        assert [c.prefix_hit_tokens for c in cands] == [64, 48]
        assert [c.prediction.cached_prefix_tokens for c in cands] == [63, 48]
        assert PrefixCacheHitScorer().score(ctx, cands) == [1.0, 0.75]
