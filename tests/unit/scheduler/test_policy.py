"""Placement policies: SLO-feasible lowest objective, refusal, best effort, baselines."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from slomesh.scheduler.policy import (
    BUILTIN_PROFILES,
    PolicyConfigError,
    load_profile,
    make_policy,
)
from slomesh.scheduler.predictor import decode_throughput_tokens_per_s, kv_capacity_blocks
from slomesh.scheduler.view import ClusterView
from slomesh.v1 import state_pb2
from tests.unit.scheduler.factories import (
    MODEL,
    SLO,
    default_topology,
    keys_of,
    make_instance,
    make_request,
    make_state,
    prompt,
)

REPO = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000 * 10**9


def view_with(states, **kw) -> ClusterView:
    view = ClusterView(default_topology(), clock_ns=lambda: T0, **kw)
    for state in states:
        view.apply_state(state, received_unix_ns=T0)
    return view


def cache(view: ClusterView, region: str, prefixes: dict[str, list[int]]) -> None:
    """Replaces `region`'s prefix index: instance id -> cached prompt prefix (tokens)."""
    view.apply_kv_snapshot(
        state_pb2.KvIndexSnapshot(
            region=region,
            agent_incarnation="inc-1",
            instances=[
                state_pb2.InstanceBlockDelta(
                    instance_id=iid, stored_keys=keys_of(tokens), cleared=True, block_size=16
                )
                for iid, tokens in prefixes.items()
            ],
        )
    )


class TestSlomeshPolicy:
    def test_picks_the_instance_holding_the_prefix_when_it_saves_enough(self):
        tokens = prompt(16_384)
        view = view_with(
            [make_state("washington-dc", [make_instance("a", "L40S"), make_instance("b", "L40S")])]
        )
        cache(view, "washington-dc", {"b": tokens[:16_000]})
        decision = make_policy("slomesh").place(make_request(tokens, max_tokens=32), view)
        assert decision.outcome == "placed"
        assert decision.chosen.instance_id == "b"
        assert decision.chosen.prediction.cached_prefix_tokens == 16_000
        other = next(c for c in decision.candidates if c.instance_id == "a")
        assert other.prediction.prefill_ms > 5 * decision.chosen.prediction.prefill_ms

    def test_picks_the_near_region_when_rtt_dominates(self):
        states = [
            make_state(r, [make_instance(f"{r}-0", "H100", price_usd_per_hour=10.0)])
            for r in ("washington-dc", "frankfurt", "tokyo")
        ]
        view = view_with(states)
        policy = make_policy("slomesh")
        for origin in ("washington-dc", "frankfurt", "tokyo"):
            decision = policy.place(make_request(origin=origin), view)
            assert decision.chosen.region == origin
            assert decision.chosen.prediction.rtt_ms == 0.0
            far = [c for c in decision.candidates if c.region != origin]
            assert all(c.prediction.rtt_ms > 0 for c in far)

    def test_prefix_far_away_loses_to_a_short_local_prefill(self):
        tokens = prompt(512)
        view = view_with(
            [
                make_state("tokyo", [make_instance("tyo", "H100", price_usd_per_hour=10.0)]),
                make_state(
                    "washington-dc", [make_instance("wdc", "H100", price_usd_per_hour=10.0)]
                ),
            ]
        )
        cache(view, "washington-dc", {"wdc": tokens})
        request = make_request(tokens, origin="tokyo")
        decision = make_policy("slomesh", cost_first_slo_usage=0.0).place(request, view)
        assert decision.chosen.instance_id == "tyo"
        # With the SLO slack both leave, the shipped profile lets money decide: the cached
        # prefix saves the prefill's GPU seconds, and the RTT still fits the TTFT target.
        decision = make_policy("slomesh").place(request, view)
        wdc = next(c for c in decision.candidates if c.instance_id == "wdc")
        tyo = next(c for c in decision.candidates if c.instance_id == "tyo")
        assert wdc.cost_first and tyo.cost_first
        assert wdc.prediction.cost_usd < tyo.prediction.cost_usd
        assert decision.chosen.instance_id == "wdc"

    def test_refuses_with_retry_hint_when_nothing_is_feasible(self):
        busy = make_instance(
            "a", "H100", queued_prefill_tokens=200_000, prefill_tokens_per_s=50_000
        )
        view = view_with([make_state("washington-dc", [busy])])
        decision = make_policy("slomesh").place(make_request(prompt(1000)), view)
        assert decision.outcome == "refused" and decision.chosen is None
        # The queue wait is ~4 s; the TTFT target with margin is 0.9 * 750 ms: the excess must
        # drain first.
        cand = decision.candidates[0]
        excess = cand.prediction.ttft_ms - 0.9 * 750
        assert decision.retry_after_ms == pytest.approx(excess)
        assert cand.rejected_by == "slo-feasible" and not cand.feasible
        assert "chat" in decision.reason

    def test_a_tenant_tier_overrides_the_class_and_residency_binds_every_policy(self):
        from slomesh.scheduler.validation import validate_request
        from slomesh.slo import TenantPolicy
        from slomesh.v1 import scheduler_pb2

        busy = make_instance(
            "a", "H100", queued_prefill_tokens=200_000, prefill_tokens_per_s=50_000
        )
        view = view_with([make_state("washington-dc", [busy])])
        tenants = {
            "nightly": TenantPolicy(name="nightly", on_infeasible="best_effort"),
            "eu": TenantPolicy(name="eu", allowed_regions=frozenset({"frankfurt"})),
        }

        def request(tenant):
            msg = scheduler_pb2.GenerateRequest(
                request_id="r", model=MODEL, prompt_token_ids=prompt(1000), max_tokens=64,
                origin_region="washington-dc", tenant=tenant,
            )
            return validate_request(
                msg, models={MODEL: 32768}, slo_classes=SLO.classes, default_slo_class="chat",
                regions={"washington-dc", "frankfurt", "tokyo"}, tenants=tenants,
            )

        policy = make_policy("slomesh")
        assert policy.place(request(""), view).outcome == "refused"  # chat refuses
        placed = policy.place(request("nightly"), view)
        assert placed.outcome == "best_effort" and placed.chosen.instance_id == "a"
        for name in ("slomesh", "round-robin", "least-load", "llm-d"):
            decision = make_policy(name).place(request("eu"), view)
            assert decision.outcome == "unavailable", name
            assert decision.candidates[0].rejected_by == "tenant-regions"
            assert "frankfurt" in decision.reason and "'eu'" in decision.reason

    def test_retry_hint_is_capped_when_waiting_cannot_help(self):
        view = view_with([make_state("washington-dc", [make_instance("a", "L4")])])
        # 30k-token prompt on an L4: prefill alone misses the TTFT target; no queue to drain.
        decision = make_policy("slomesh").place(make_request(prompt(30_000), max_tokens=16), view)
        assert decision.outcome == "refused"
        assert decision.retry_after_ms == 30_000

    def test_kv_room_keeps_every_request_there_within_the_kv_cache(self):
        # Two idle-looking L40S: "tight" has its cache nearly full of running sequences, whose
        # predicted outputs and this request's would outgrow it (vLLM would admit the prompt,
        # then preempt a running decode); "roomy" holds them.
        probe = view_with([make_state("washington-dc", [make_instance("x", "L40S")])])
        capacity = kv_capacity_blocks(probe.instances()[0]) * 16
        n_out, prompt_tokens, outstanding = 200, 4000, 10
        demand_past_usage = prompt_tokens + (outstanding + 1) * n_out  # 6200 tokens
        tight_usage = 1 - (demand_past_usage - 16) / capacity  # 16 tokens short of room
        roomy_usage = 1 - (demand_past_usage + 16) / capacity  # 16 tokens to spare
        view = view_with(
            [
                make_state(
                    "washington-dc",
                    [
                        make_instance(
                            i, "L40S", running=outstanding, outstanding=outstanding,
                            kv_cache_usage=usage,
                        )
                        for i, usage in (("tight", tight_usage), ("roomy", roomy_usage))
                    ],
                )
            ]
        )  # fmt: skip
        request = make_request(
            prompt(prompt_tokens), max_tokens=n_out, expected_output_tokens=n_out
        )
        decision = make_policy("slomesh").place(request, view)
        assert decision.outcome == "placed" and decision.chosen.instance_id == "roomy"
        tight = next(c for c in decision.candidates if c.instance_id == "tight")
        assert tight.feasible and tight.rejected_by == "kv-room"
        # The baselines know nothing of it.
        assert make_policy("qlm").place(request, view).outcome == "placed"

    def test_a_refusal_for_kv_room_waits_for_the_requests_there_to_release_it(self):
        # One L40S whose cache lacks 1000 tokens for its requests' outputs and this prompt:
        # refused (chat); one of its ten requests must end first (each holds ~19k tokens), a
        # tenth of its decode drain time.
        probe = view_with([make_state("washington-dc", [make_instance("x", "L40S")])])
        capacity = kv_capacity_blocks(probe.instances()[0]) * 16
        n_out, prompt_tokens, outstanding, missing = 200, 4000, 10, 1000
        usage = 1 - (prompt_tokens + (outstanding + 1) * n_out - missing) / capacity
        view = view_with(
            [
                make_state(
                    "washington-dc",
                    [
                        make_instance(
                            "full", "L40S", running=outstanding, outstanding=outstanding,
                            kv_cache_usage=usage, queued_decode_tokens=outstanding * n_out,
                        )
                    ],
                )
            ]
        )  # fmt: skip
        request = make_request(
            prompt(prompt_tokens), max_tokens=n_out, expected_output_tokens=n_out
        )
        policy = make_policy("slomesh")
        decision = policy.place(request, view)
        assert decision.outcome == "refused" and "kv-room" in decision.reason
        (cand,) = decision.candidates
        assert cand.feasible and cand.rejected_by == "kv-room"
        drain_ms = (
            outstanding * n_out
            / decode_throughput_tokens_per_s(cand.instance, policy.predictor_config)
            * 1000.0
        )  # fmt: skip
        assert (usage * capacity + outstanding * n_out) / outstanding > missing
        assert decision.retry_after_ms == pytest.approx(drain_ms / outstanding, rel=1e-6)
        assert decision.retry_after_ms > 100.0

    def test_a_long_prompt_is_kept_off_decodes_its_prefill_would_slow_past_their_tpot(self):
        view = view_with([make_state("washington-dc", [make_instance("a", "H100", running=8)])])
        policy = make_policy("slomesh")
        short, long = (
            make_request(prompt(n), max_tokens=64, request_id=f"r{n}") for n in (1000, 30_000)
        )
        unprotected = [policy.place(r, view).chosen.prediction for r in (short, long)]
        # Its own decode comes after its prefill; the decodes running there share its 30 000
        # prefill tokens' steps.
        assert unprotected[1].inflight_tpot_ms > 1.1 * unprotected[1].tpot_ms
        assert unprotected[0].inflight_tpot_ms < 1.02 * unprotected[0].tpot_ms
        # A running request whose target passes the short prompt and the long one's own TPOT.
        passing = max(unprotected[0].inflight_tpot_ms, unprotected[1].tpot_ms)
        between = (passing + unprotected[1].inflight_tpot_ms) / 2
        view.track_inflight("washington-dc", "a", "coding-1", between / 0.9)
        assert policy.place(short, view).outcome == "placed"
        refused = policy.place(long, view)
        assert refused.outcome == "refused"
        assert refused.candidates[0].rejected_by == "protect-inflight"

    def test_batch_class_is_placed_best_effort_on_lowest_ttft(self):
        # Unprofiled GPUs: the queues (60 and 80 s of prefill at the measured 500 tokens/s)
        # miss the batch class's 60 s E2E; their KV caches (the fallback L4's) hold them.
        slow = make_instance("slow", "CPU", queued_prefill_tokens=30_000, prefill_tokens_per_s=500)
        slower = make_instance(
            "slower", "CPU", queued_prefill_tokens=40_000, prefill_tokens_per_s=500
        )
        view = view_with([make_state("washington-dc", [slower, slow])])
        decision = make_policy("slomesh").place(make_request(slo_class="batch"), view)
        assert decision.outcome == "best_effort"
        assert decision.chosen.instance_id == "slow" and not decision.feasible

    def test_unavailable_when_no_candidate_passes_the_filters(self):
        view = view_with([make_state("washington-dc", [make_instance("a", healthy=False)])])
        decision = make_policy("slomesh").place(make_request(), view)
        assert decision.outcome == "unavailable"
        assert decision.candidates[0].rejected_by == "healthy"
        empty = make_policy("slomesh").place(make_request(), view_with([]))
        assert empty.outcome == "unavailable" and "no region" in empty.reason

    def test_stale_and_wrong_model_instances_are_filtered(self):
        view = ClusterView(default_topology(), clock_ns=lambda: T0, staleness_ms=100)
        view.apply_state(
            make_state("tokyo", [make_instance("t")]), received_unix_ns=T0 - 200 * 10**6
        )
        view.apply_state(
            make_state(
                "frankfurt",
                [make_instance("f", model="other"), make_instance("g", max_model_len=50)],
            ),
            received_unix_ns=T0,
        )
        view.apply_state(make_state("washington-dc", [make_instance("w")]), received_unix_ns=T0)
        decision = make_policy("slomesh").place(make_request(origin="tokyo"), view)
        assert decision.chosen.instance_id == "w"
        reasons = {c.instance_id: c.rejected_by for c in decision.candidates}
        assert reasons == {"t": "fresh", "f": "serves-model", "g": "serves-model", "w": ""}

    def test_requests_running_on_an_instance_keep_their_tpot(self):
        # Two L4s (decode step ~60-70 ms: fine for chat's 100 ms TPOT, not for coding's 50 ms);
        # "a" is cheaper but runs a coding request that another request would slow down.
        a = make_instance("a", "L4", price_usd_per_hour=1.0)
        b = make_instance("b", "L4", price_usd_per_hour=2.0)
        view = view_with([make_state("washington-dc", [a, b])])
        policy = make_policy("slomesh")
        assert policy.place(make_request(), view).chosen.instance_id == "a"
        view.track_inflight("washington-dc", "a", "coding-1", 50.0)
        decision = policy.place(make_request(), view)
        assert decision.chosen.instance_id == "b"
        rejected = next(c for c in decision.candidates if c.instance_id == "a")
        assert rejected.feasible and rejected.rejected_by == "protect-inflight"
        view.track_inflight("washington-dc", "b", "coding-2", 50.0)
        refused = policy.place(make_request(), view)
        assert refused.outcome == "refused" and refused.retry_after_ms >= 100

    def test_excluded_regions(self):
        view = view_with([make_state(r, [make_instance(r)]) for r in ("tokyo", "frankfurt")])
        decision = make_policy("slomesh").place(
            make_request(origin="tokyo"), view, exclude_regions=frozenset({"tokyo"})
        )
        assert decision.chosen.region == "frankfurt"

    def test_cost_breaks_near_ties(self):
        cheap = make_instance("cheap", "H100", price_usd_per_hour=1.0)
        dear = make_instance("dear", "H100", price_usd_per_hour=100.0)
        view = view_with([make_state("washington-dc", [dear, cheap])])
        decision = make_policy("slomesh").place(make_request(), view)
        assert decision.chosen.instance_id == "cheap"
        assert decision.chosen.objective < decision.candidates[0].objective

    def test_placement_message(self):
        view = view_with([make_state("washington-dc", [make_instance("a")])])
        decision = make_policy("slomesh").place(make_request(request_id="q-9"), view)
        msg = decision.to_placement("relay:1")
        assert (msg.request_id, msg.region, msg.instance_id, msg.agent_endpoint) == (
            "q-9",
            "washington-dc",
            "a",
            "relay:1",
        )
        assert msg.slo_feasible and msg.policy == "slomesh" and msg.slo_class == "chat"
        assert msg.predicted.ttft_ms == decision.chosen.prediction.ttft_ms

    def test_bursts_spread_over_instances_with_optimistic_accounting(self):
        # "a" is a little cheaper, and batching makes a busy instance cheaper per request: the
        # objective packs the burst onto "a" until its predicted TTFT (which grows with the
        # placements not yet in its state) would miss the SLO; then "b" takes the rest.
        a = make_instance("a", "H100", price_usd_per_hour=10.0)
        b = make_instance("b", "H100", price_usd_per_hour=11.0)
        view = view_with([make_state("washington-dc", [a, b])])
        policy = make_policy("slomesh")
        chosen = Counter()
        ttft_target_ms = 0.9 * (500 + 0.25 * 2000)
        for i in range(16):
            d = policy.place(make_request(prompt(2000, start=i * 10_000), request_id=f"q{i}"), view)
            assert d.outcome == "placed"
            p = d.chosen.prediction
            assert p.ttft_ms <= ttft_target_ms
            view.record_placement(
                d.chosen.region,
                d.chosen.instance_id,
                f"q{i}",
                p.uncached_prompt_tokens,
                p.output_tokens,
                placed_unix_ns=T0,
            )
            chosen[d.chosen.instance_id] += 1
        assert chosen["a"] >= 3 and chosen["b"] >= 3
        assert len(view.pending_placements("washington-dc", "a")) == chosen["a"]
        # Without the pending placements every request would have gone to "a":
        fresh = view_with([make_state("washington-dc", [a, b])])
        assert (
            policy.place(make_request(prompt(2000, start=999_000)), fresh).chosen.instance_id == "a"
        )

    def test_fast_enough(self):
        # 3 regions x 2 instances, an 8k-token prompt, prefix lookups that hit.
        tokens = prompt(8192)
        topo = default_topology()
        view = view_with(
            [
                make_state(
                    r.name,
                    [
                        make_instance(
                            i.id,
                            i.gpu_type,
                            running=8,
                            queued_prefill_tokens=3000,
                            queued_decode_tokens=2000,
                            kv_cache_usage=0.3,
                        )
                        for i in r.instances
                    ],
                )
                for r in topo.regions
            ]
        )
        for r in topo.regions:
            cache(view, r.name, {i.id: tokens[:4096] for i in r.instances})
        policy = make_policy("slomesh")
        request = make_request(tokens, max_tokens=128)
        policy.place(request, view)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            decision = policy.place(request, view)
        per_call_ms = (time.perf_counter() - t0) * 1000 / n
        assert decision.chosen.prediction.cached_prefix_tokens == 4096
        assert per_call_ms < 5.0  # generous bound on a shared 2-core machine; target <= 1 ms


class TestCostFirstObjective:
    """`PolicyProfile.cost_first_slo_usage`: placements with SLO slack to spare go by cost."""

    @staticmethod
    def place(**overrides):
        fast = make_instance("fast", "H100", price_usd_per_hour=12.29)
        cheap = make_instance("cheap", "L40S", price_usd_per_hour=1.86)
        view = view_with([make_state("washington-dc", [fast, cheap])])
        decision = make_policy("slomesh", **overrides).place(
            make_request(expected_output_tokens=200), view
        )
        assert decision.outcome == "placed"
        by_id = {c.instance_id: c for c in decision.candidates}
        return decision.chosen.instance_id, by_id["fast"], by_id["cheap"]

    @staticmethod
    def usage(cand) -> float:
        req = make_request(expected_output_tokens=200)
        return cand.prediction.slo_usage(req.slo, req.prompt_tokens)

    def test_latency_decides_when_off(self):
        chosen, fast, cheap = self.place(cost_first_slo_usage=0.0)
        # Both meet the SLO; the H100 is dearer per request but faster by more than
        # alpha_s_per_usd says the difference is worth.
        assert fast.feasible and cheap.feasible and not fast.cost_first
        assert cheap.prediction.cost_usd < fast.prediction.cost_usd
        assert fast.prediction.e2e_ms < cheap.prediction.e2e_ms
        assert chosen == "fast"
        for cand in (fast, cheap):
            assert cand.feasible == (self.usage(cand) <= 0.9)

    def test_cheaper_wins_among_candidates_with_slack(self):
        _, fast, cheap = self.place(cost_first_slo_usage=0.0)
        assert self.usage(fast) < self.usage(cheap) <= 0.9
        chosen, fast, cheap = self.place(cost_first_slo_usage=self.usage(cheap))
        assert fast.cost_first and cheap.cost_first and chosen == "cheap"
        # The shipped profile (0.6): an idle L40S leaves that slack on a chat request.
        assert self.usage(cheap) <= 0.6 and self.place()[0] == "cheap"
        # cost_first_alpha_s_per_usd prices the latency: at 0 the faster one wins again.
        chosen, _, _ = self.place(
            cost_first_slo_usage=self.usage(cheap), cost_first_alpha_s_per_usd=0.0
        )
        assert chosen == "fast"

    def test_a_candidate_with_slack_beats_a_cheaper_tight_one(self):
        _, fast, cheap = self.place(cost_first_slo_usage=0.0)
        between = (self.usage(fast) + self.usage(cheap)) / 2
        # Money weighs so much here that the objective alone picks "cheap" ...
        assert self.place(cost_first_slo_usage=0.0, alpha_s_per_usd=1e6)[0] == "cheap"
        chosen, fast, cheap = self.place(cost_first_slo_usage=between, alpha_s_per_usd=1e6)
        # ... but only "fast" leaves the slack, so it goes first.
        assert fast.cost_first and not cheap.cost_first and cheap.feasible
        assert chosen == "fast"

    def test_shipped_profiles_use_the_same_objective(self):
        fields = ("alpha_s_per_usd", "cost_first_slo_usage", "cost_first_alpha_s_per_usd")
        profiles = [load_profile(n) for n in ("slomesh", "oracle")] + [
            load_profile(REPO / "configs" / "policies" / f"{n}.yaml") for n in ("slomesh", "oracle")
        ]
        assert len({tuple(getattr(p, f) for f in fields) for p in profiles}) == 1
        assert profiles[0].cost_first_slo_usage > 0


class TestBaselines:
    def test_round_robin_cycles_over_every_instance(self):
        view = view_with(
            [
                make_state(r, [make_instance(f"{r}-0"), make_instance(f"{r}-1")])
                for r in ("tokyo", "frankfurt")
            ]
        )
        policy = make_policy("round-robin")
        picks = [policy.place(make_request(), view).chosen.instance_id for _ in range(8)]
        assert picks[:4] == ["frankfurt-0", "frankfurt-1", "tokyo-0", "tokyo-1"]
        assert picks[4:] == picks[:4]

    def test_round_robin_never_refuses(self):
        busy = make_instance("a", queued_prefill_tokens=10**7, prefill_tokens_per_s=1000)
        decision = make_policy("round-robin").place(
            make_request(), view_with([make_state("tokyo", [busy])])
        )
        assert decision.outcome == "placed" and not decision.feasible

    def test_least_load_picks_fewest_outstanding(self):
        view = view_with(
            [
                make_state("tokyo", [make_instance("t", outstanding=5)]),
                make_state(
                    "frankfurt",
                    [make_instance("f", outstanding=2), make_instance("g", outstanding=9)],
                ),
            ]
        )
        decision = make_policy("least-load").place(make_request(), view)
        assert decision.chosen.instance_id == "f"

    def test_least_load_breaks_ties_among_equals(self):
        view = view_with([make_state("tokyo", [make_instance("a"), make_instance("b")])])
        policy = make_policy("least-load")
        picks = {policy.place(make_request(), view).chosen.instance_id for _ in range(30)}
        assert picks == {"a", "b"}


class TestProfiles:
    @pytest.mark.parametrize("name", sorted(BUILTIN_PROFILES))
    def test_yaml_files_spell_out_the_builtins(self, name):
        assert load_profile(REPO / "configs" / "policies" / f"{name}.yaml") == load_profile(name)

    def test_overrides_and_yaml_path(self, tmp_path):
        policy = make_policy("slomesh", slo_margin=0.5, alpha_s_per_usd=0.0)
        assert policy.profile.slo_margin == 0.5 and policy.name == "slomesh"
        path = tmp_path / "p.yaml"
        path.write_text("name: mine\nfilters: [healthy]\nscorers: [lowest-ttft]\n")
        assert make_policy(str(path)).name == "mine"

    @pytest.mark.parametrize(
        ("profile", "fragment"),
        [
            ({"name": "x", "scorers": ["nope"]}, "unknown scorer 'nope'"),
            ({"name": "x", "filters": ["nope"]}, "unknown filter 'nope'"),
            ({"name": "x", "picker": "nope"}, "unknown picker 'nope'"),
            ({"name": "x", "slo_margin": 2}, "slo_margin"),
            ({"name": "x", "colour": "red"}, "colour"),
            (
                {"name": "x", "filters": [{"name": "region-allowlist", "params": {"regions": []}}]},
                "regions",
            ),
            ({"name": "x", "predictor": {"max_num_seqs": 0}}, "max_num_seqs"),
        ],
    )
    def test_bad_profiles_are_rejected_naming_the_problem(self, profile, fragment):
        with pytest.raises(PolicyConfigError) as info:
            make_policy(profile)
        assert fragment in str(info.value)

    def test_unknown_policy_name(self):
        with pytest.raises(PolicyConfigError, match="round-robin"):
            make_policy("fastest")

    def test_region_allowlist(self):
        view = view_with([make_state(r, [make_instance(r)]) for r in ("tokyo", "frankfurt")])
        profile = {
            **BUILTIN_PROFILES["slomesh"],
            "name": "eu-only",
            "filters": [
                "healthy",
                {"name": "region-allowlist", "params": {"regions": ["frankfurt"]}},
            ],
        }
        decision = make_policy(profile).place(make_request(origin="tokyo"), view)
        assert decision.chosen.region == "frankfurt"


class TestPriorityAndBestEffort:
    """Priorities tighten the SLO margin; best-effort requests take only spare capacity, else
    are queued (and placed anyway once their wait expired)."""

    @staticmethod
    def loaded_view():
        # ~505 ms of queued prefill ahead: a 1000-token chat request (TTFT target 750 ms) is
        # predicted at ~72 % of its target.
        busy = make_instance("a", "H100", queued_prefill_tokens=12_000, prefill_tokens_per_s=50_000)
        return view_with([make_state("washington-dc", [busy])])

    def test_a_less_urgent_request_is_refused_where_an_urgent_one_is_placed(self):
        view = self.loaded_view()
        policy = make_policy("slomesh")
        urgent = policy.place(make_request(prompt(1000), priority=0), view)
        assert urgent.outcome == "placed"
        used = urgent.chosen.prediction.ttft_ms / 750.0
        assert 0.7 < used < 0.8  # the premise: between the margins of priorities 1 and 2
        assert policy.place(make_request(prompt(1000), priority=1), view).outcome == "placed"
        assert policy.place(make_request(prompt(1000), priority=-5), view).outcome == "placed"
        lax = policy.place(make_request(prompt(1000), priority=2), view)
        assert lax.outcome == "refused" and lax.chosen is None
        (cand,) = lax.candidates
        # Same prediction, judged against 70 % of the target instead of 90 %.
        assert cand.prediction.ttft_ms == pytest.approx(urgent.chosen.prediction.ttft_ms)
        assert not cand.feasible and cand.rejected_by == "slo-feasible"
        # The retry hint drains the excess over 70 % of the target (at least the floor).
        excess_ms = cand.prediction.ttft_ms - 0.7 * 750
        assert lax.retry_after_ms == pytest.approx(max(100.0, excess_ms))
        # Without priority margins the priority changes nothing.
        flat = make_policy("slomesh", priority_slo_margins={})
        assert flat.place(make_request(prompt(1000), priority=2), view).outcome == "placed"

    def test_priority_margins(self):
        profile = make_policy("slomesh", slo_margin=0.85).profile
        assert profile.priority_slo_margins == {1: 0.8, 2: 0.7}
        got = {p: profile.slo_margin_for(p) for p in (-3, 0, 1, 2, 7)}
        assert got == {-3: 0.85, 0: 0.85, 1: 0.8, 2: 0.7, 7: 0.7}
        # A listed margin above slo_margin is capped by it.
        assert make_policy("slomesh", slo_margin=0.5).profile.slo_margin_for(1) == 0.5

    @pytest.mark.parametrize("margins", [{1: 0.8, 2: 0.85}, {1: 0.0}, {1: 1.5}, {"x": 0.5}])
    def test_bad_priority_margins_name_the_field(self, margins):
        with pytest.raises(PolicyConfigError, match="priority_slo_margins"):
            make_policy("slomesh", priority_slo_margins=margins)

    @pytest.mark.parametrize(
        ("field", "value"),
        [("best_effort_max_wait_ms", -1), ("best_effort_queue_limit", -1)],
    )
    def test_bad_best_effort_settings_name_the_field(self, field, value):
        with pytest.raises(PolicyConfigError, match=field):
            make_policy("slomesh", **{field: value})

    def test_best_effort_goes_where_running_requests_keep_their_tpot(self):
        # "fast" has the lower TTFT but runs a request with a tight TPOT target; "slow" runs
        # nothing this scheduler protects. Neither meets the batch class's E2E target.
        fast = make_instance("fast", "CPU", queued_prefill_tokens=30_000, prefill_tokens_per_s=500)
        slow = make_instance("slow", "CPU", queued_prefill_tokens=40_000, prefill_tokens_per_s=500)
        view = view_with([make_state("washington-dc", [fast, slow])])
        view.track_inflight("washington-dc", "fast", "coding-1", 5.0)
        policy = make_policy("slomesh")
        decision = policy.place(make_request(slo_class="batch"), view)
        assert decision.outcome == "best_effort" and decision.chosen.instance_id == "slow"
        by_id = {c.instance_id: c for c in decision.candidates}
        assert by_id["fast"].prediction.ttft_ms < by_id["slow"].prediction.ttft_ms
        assert by_id["fast"].rejected_by == "protect-inflight"

        # Both protected: queued, with a retry estimate; no placement to record.
        view.track_inflight("washington-dc", "slow", "coding-2", 5.0)
        queued = policy.place(make_request(slo_class="batch"), view)
        assert queued.outcome == "queued" and queued.chosen is None
        assert queued.retry_after_ms is not None and "best-effort admission" in queued.reason
        assert {c.rejected_by for c in queued.candidates} == {"protect-inflight"}
        # Its wait expired: the lowest TTFT, whatever runs there.
        forced = policy.place(make_request(slo_class="batch"), view, wait_expired=True)
        assert forced.outcome == "best_effort" and forced.chosen.instance_id == "fast"
        # A refuse-tier request is still refused, never queued.
        refused = policy.place(make_request(slo_class="chat"), view, wait_expired=True)
        assert refused.outcome == "refused"

    def test_instances_held_for_requests_queued_ahead_are_not_candidates(self):
        view = view_with([make_state("washington-dc", [make_instance("a"), make_instance("b")])])
        policy = make_policy("slomesh")
        decision = policy.place(
            make_request(slo_class="batch"), view, exclude_instances=frozenset({"a"})
        )
        assert decision.chosen.instance_id == "b"
        assert {c.instance_id: c.rejected_by for c in decision.candidates}["a"] == "queued-ahead"
        none_left = policy.place(
            make_request(slo_class="batch"), view, exclude_instances=frozenset({"a", "b"})
        )
        assert none_left.outcome == "unavailable" and "queued ahead" in none_left.reason
