""""Move the prefix, then run here": the move prediction, the policy's choice, the placement."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slomesh.scheduler import predictor as pred
from slomesh.scheduler.policy import BUILTIN_PROFILES, PlacementContext, make_policy
from slomesh.v1 import state_pb2
from tests.unit.scheduler.factories import make_instance, make_request, make_state, prompt
from tests.unit.scheduler.test_policy import T0, cache, view_with

KV_BYTES_PER_TOKEN = 131072  # Llama-3.1-8B: 2 x 32 layers x 8 KV heads x 128 x 2 bytes


def spare(view, src: str, dst: str, bytes_per_s: float) -> None:
    """Publishes the spare bandwidth of the link src -> dst to the view."""
    view.apply_link_stats(
        state_pb2.LinkStatsReport(
            region=src, links={dst: state_pb2.LinkStats(spare_bytes_per_s=bytes_per_s)}
        ),
        received_unix_ns=T0,
    )


def busy_source_view(*, tokyo_gpu: str = "L40S", spare_bytes_per_s: float = 1e9):
    """Washington DC's H100 holds 16,000 tokens of the prompt but has a long queue; Tokyo's
    instance is idle and holds the first 3,200."""
    tokens = prompt(16_384)
    view = view_with(
        [
            make_state(
                "washington-dc",
                [make_instance("wdc-0", "H100", queued_prefill_tokens=400_000, price_usd_per_hour=4.0)],
            ),
            make_state("tokyo", [make_instance("tyo-0", tokyo_gpu, price_usd_per_hour=2.0)]),
        ]
    )
    cache(view, "washington-dc", {"wdc-0": tokens[:16_000]})
    cache(view, "tokyo", {"tyo-0": tokens[:3_200]})
    spare(view, "washington-dc", "tokyo", spare_bytes_per_s)
    return view, tokens


class TestPlanKvMove:
    def test_known_answer(self):
        move = pred.plan_kv_move(
            source_region="washington-dc",
            source_instance="wdc-0",
            source_prefix_tokens=16_000,
            cached_prefix_tokens=3_200,
            block_size=16,
            kv_bytes_per_token=KV_BYTES_PER_TOKEN,
            control_rtt_ms=139.0,
            spare_bytes_per_s=1e9,
            egress_usd_per_gb=0.02,
            link_queue_ms=50.0,
        )
        nbytes = 800 * 16 * KV_BYTES_PER_TOKEN  # the 800 blocks tokyo lacks
        assert move is not None
        assert move.bytes == nbytes == 1_677_721_600
        assert move.prefix_tokens == 16_000
        assert move.transfer_ms == pytest.approx(2 * 139.0 + 50.0 + nbytes / 1e9 * 1000.0)
        assert move.egress_cost_usd == pytest.approx(nbytes / 1e9 * 0.02)

    @pytest.mark.parametrize("spare_bytes_per_s", [None, 0.0, math.inf, math.nan])
    def test_no_move_without_spare_bandwidth(self, spare_bytes_per_s):
        assert pred.plan_kv_move(
            source_region="a", source_instance="x", source_prefix_tokens=1600,
            cached_prefix_tokens=0, block_size=16, kv_bytes_per_token=1, control_rtt_ms=1.0,
            spare_bytes_per_s=spare_bytes_per_s, egress_usd_per_gb=0.0,
        ) is None

    def test_no_move_without_a_whole_block_to_gain(self):
        assert pred.plan_kv_move(
            source_region="a", source_instance="x", source_prefix_tokens=1600,
            cached_prefix_tokens=1590, block_size=16, kv_bytes_per_token=1, control_rtt_ms=1.0,
            spare_bytes_per_s=1e9, egress_usd_per_gb=0.0,
        ) is None

    def test_predict_waits_for_the_move_then_prefills_the_rest(self):
        view, _ = busy_source_view()
        inst = next(i for i in view.instances() if i.instance_id == "tyo-0")
        move = pred.plan_kv_move(
            source_region="washington-dc", source_instance="wdc-0", source_prefix_tokens=16_000,
            cached_prefix_tokens=3_200, block_size=16, kv_bytes_per_token=KV_BYTES_PER_TOKEN,
            control_rtt_ms=139.0, spare_bytes_per_s=1e9, egress_usd_per_gb=0.02,
        )
        kw = {"rtt_ms": 0.0, "prompt_tokens": 16_384, "output_tokens": 32}
        recompute = pred.predict(inst, cached_prefix_tokens=3_200, **kw)
        held = pred.predict(inst, cached_prefix_tokens=16_000, **kw)
        moved = pred.predict(inst, cached_prefix_tokens=3_200, kv_move=move, **kw)
        assert moved.prefill_ms == pytest.approx(held.prefill_ms)
        assert moved.prefill_ms < recompute.prefill_ms / 10
        assert moved.uncached_prompt_tokens == 384
        assert moved.ttft_ms == pytest.approx(held.ttft_ms + move.transfer_ms)
        assert moved.cost_usd == pytest.approx(held.cost_usd + move.egress_cost_usd)
        assert (moved.bytes_moved, moved.transfer_prefix_tokens) == (move.bytes, 16_000)
        assert (moved.transfer_source_region, moved.transfer_source_instance) == (
            "washington-dc", "wdc-0"
        )
        assert recompute.bytes_moved == 0 and recompute.transfer_ms == 0.0


class TestPolicyMoves:
    def test_move_chosen_when_it_beats_recompute(self):
        # Without a price on money the move wins on latency alone: 0.3 s over a 10 GB/s link
        # against over a second of prefill on the L40S.
        view, tokens = busy_source_view(spare_bytes_per_s=1e10)
        policy = make_policy("slomesh", kv_move_scope="prefix", alpha_s_per_usd=0.0, cost_first_slo_usage=0.0)
        decision = policy.place(make_request(tokens, origin="tokyo", max_tokens=32), view)
        chosen = decision.chosen
        assert decision.outcome == "placed" and chosen.instance_id == "tyo-0"
        p = chosen.prediction
        nbytes = 800 * 16 * KV_BYTES_PER_TOKEN
        assert p.transfer_source_instance == "wdc-0"
        assert p.bytes_moved == nbytes
        expected_ms = 2 * view.rtt_ms("washington-dc", "tokyo") + nbytes / 1e10 * 1000.0
        assert p.transfer_ms == pytest.approx(expected_ms)
        assert chosen.prefix_hit_tokens == 3_200 and p.cached_prefix_tokens == 16_000
        placement = decision.to_placement("tyo.agent:50051")
        assert placement.kv_transfer_source_region == "washington-dc"
        assert placement.kv_transfer_source_instance == "wdc-0"
        assert placement.kv_transfer_prefix_tokens == 16_000
        assert placement.kv_transfer_bytes == nbytes
        assert placement.predicted.transfer_ms == pytest.approx(expected_ms)
        # The view queues the next move on that link behind this one.
        decision.record_in(view)
        assert view.link_queue_ms("washington-dc", "tokyo", T0) == pytest.approx(
            nbytes / 1e10 * 1000.0, rel=1e-6
        )

    def test_a_queued_move_counts_once_not_also_as_load_on_the_link(self):
        view, _ = busy_source_view(spare_bytes_per_s=1e9)
        view.record_kv_move("washington-dc", "tokyo", 500_000_000, T0)  # 0.5 s at 1 GB/s
        assert view.link_queue_ms("washington-dc", "tokyo", T0) == pytest.approx(500.0)
        # The link's service then publishes what that move leaves spare: a next move waits
        # for it (the queue), then gets the bandwidth it had.
        spare(view, "washington-dc", "tokyo", 1e8)
        assert view.link_spare_bytes_per_s("washington-dc", "tokyo", T0) == 1e9
        # Once it is done, the published figure stands again.
        later = T0 + 600_000_000
        view.apply_link_stats(
            state_pb2.LinkStatsReport(
                region="washington-dc",
                links={"tokyo": state_pb2.LinkStats(spare_bytes_per_s=2e8)},
            ),
            received_unix_ns=later,
        )
        assert view.link_queue_ms("washington-dc", "tokyo", later) == 0.0
        assert view.link_spare_bytes_per_s("washington-dc", "tokyo", later) == 2e8

    def test_whole_prompt_scope_moves_only_a_prefix_the_destination_can_load(self):
        # vLLM's ExampleConnector loads the one object of align(len(prompt) - 1) tokens: the
        # 16,000 cached tokens of a 16,384-token prompt are not it, the whole prompt is.
        view, tokens = busy_source_view(spare_bytes_per_s=1e10)
        req = make_request(tokens, origin="tokyo", max_tokens=32)
        default = make_policy("slomesh", alpha_s_per_usd=0.0, cost_first_slo_usage=0.0)
        assert default.profile.kv_move_scope == "whole-prompt"
        assert default.place(req, view).chosen.prediction.bytes_moved == 0
        cache(view, "washington-dc", {"wdc-0": tokens})
        p = default.place(req, view).chosen.prediction
        assert p.transfer_source_instance == "wdc-0"
        assert p.transfer_prefix_tokens == (16_384 - 1) // 16 * 16

    def test_egress_price_keeps_recompute_when_both_meet_the_slo(self):
        # 1.7 GB at 0.02 USD/GB is 0.034 USD: 34 s of objective at alpha 1000 s/USD, far more
        # than the second of prefill it saves.
        view, tokens = busy_source_view()
        decision = make_policy("slomesh", kv_move_scope="prefix").place(make_request(tokens, origin="tokyo"), view)
        assert decision.chosen.instance_id == "tyo-0"
        assert decision.chosen.prediction.bytes_moved == 0

    def test_move_makes_a_request_feasible_that_recompute_misses(self):
        view, tokens = busy_source_view(tokyo_gpu="L4")
        req = make_request(tokens, origin="tokyo", max_tokens=32)
        without = make_policy("slomesh", kv_move_scope="prefix", kv_moves=False).place(req, view)
        assert without.outcome == "refused"
        decision = make_policy("slomesh", kv_move_scope="prefix").place(req, view)
        assert decision.outcome == "placed" and decision.chosen.instance_id == "tyo-0"
        assert decision.chosen.prediction.transfer_source_instance == "wdc-0"
        assert decision.chosen.feasible

    @pytest.mark.parametrize("spare_bytes_per_s", [0.0, 1.0])
    def test_never_over_a_link_without_spare_bandwidth(self, spare_bytes_per_s):
        view, tokens = busy_source_view(tokyo_gpu="L4", spare_bytes_per_s=spare_bytes_per_s)
        decision = make_policy("slomesh", kv_move_scope="prefix").place(make_request(tokens, origin="tokyo"), view)
        assert all(
            c.prediction is None or c.prediction.bytes_moved == 0 for c in decision.candidates
        )

    def test_baselines_and_profiles_without_moves_never_move(self):
        view, tokens = busy_source_view(tokyo_gpu="L4")
        req = make_request(tokens, origin="tokyo")
        for name in BUILTIN_PROFILES:
            if name in ("slomesh", "oracle"):
                assert make_policy(name).profile.kv_moves
                continue
            decision = make_policy(name).place(req, view)
            assert decision.chosen.prediction.bytes_moved == 0, name

    def test_short_gains_are_not_moved(self):
        view, tokens = busy_source_view(tokyo_gpu="L4")
        # The source holds 800 blocks more than Tokyo; ask for 801.
        decision = make_policy("slomesh", kv_move_scope="prefix", kv_move_min_blocks=801).place(
            make_request(tokens, origin="tokyo"), view
        )
        assert decision.outcome == "refused"


REGIONS = ("washington-dc", "frankfurt", "tokyo")


@st.composite
def move_clusters(draw):
    tokens = prompt(draw(st.integers(2_000, 20_000)))
    states, held = [], {}
    for region in REGIONS:
        insts = []
        for i in range(draw(st.integers(1, 2))):
            iid = f"{region}-{i}"
            insts.append(make_instance(
                iid,
                draw(st.sampled_from(("H100", "A100", "L40S", "L4"))),
                queued_prefill_tokens=draw(st.integers(0, 300_000)),
                running=draw(st.integers(0, 32)),
                price_usd_per_hour=draw(st.floats(0.5, 8.0)),
            ))
            held[(region, iid)] = draw(st.integers(0, len(tokens)))
        states.append(make_state(region, insts))
    view = view_with(states)
    for region in REGIONS:
        cache(view, region, {iid: tokens[:n] for (r, iid), n in held.items() if r == region})
        for dst in REGIONS:
            if dst != region:
                spare(view, region, dst, draw(st.sampled_from((0.0, 1e8, 6.25e8, 1e10))))
    return view, tokens, draw(st.sampled_from(REGIONS)), draw(st.floats(0.0, 2000.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(move_clusters())
def test_a_move_is_only_chosen_over_its_own_recompute_when_it_is_better(case):
    """Invariant: a candidate's move variant replaces its recompute variant only when it meets
    the SLO and recompute does not, or both meet it and the move ranks ahead (cost-first
    band, then the lower objective); it never crosses a link the view sees without spare
    bandwidth, and always gains at least ``kv_move_min_blocks`` blocks."""
    view, tokens, origin, alpha = case
    policy = make_policy("slomesh", kv_move_scope="prefix", alpha_s_per_usd=alpha)
    req = make_request(tokens, origin=origin, max_tokens=64)
    decision = policy.place(req, view)
    ctx = PlacementContext(req, view, T0, policy.profile.slo_margin_for(req.priority))
    for cand in decision.candidates:
        p = cand.prediction
        if p is None or not p.bytes_moved:
            continue
        assert cand.feasible
        assert p.transfer_source_region != cand.region
        assert view.link_spare_bytes_per_s(p.transfer_source_region, cand.region, T0) > 0
        base = pred.predict(
            cand.instance,
            rtt_ms=p.rtt_ms,
            prompt_tokens=req.prompt_tokens,
            cached_prefix_tokens=cand.prefix_hit_tokens,
            output_tokens=p.output_tokens,
            config=policy.predictor_config,
        )
        if base.meets(req.slo, req.prompt_tokens, ctx.slo_margin):
            base_cost_first, base_objective = policy._objective(ctx, base)
            assert (not cand.cost_first, cand.objective) < (not base_cost_first, base_objective)
        assert p.cached_prefix_tokens >= cand.prefix_hit_tokens + 16 * 16
