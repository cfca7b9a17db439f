"""Cluster view: staleness, KV index sequencing and snapshots, RTTs, optimistic accounting."""

from __future__ import annotations

import math

import pytest

from slomesh.scheduler.view import (
    PREFILL_TIMELINE_HORIZON_S,
    PREFILL_TIMELINE_MAX_ARRIVALS,
    ClusterView,
)
from slomesh.v1 import state_pb2
from tests.unit.scheduler.factories import (
    MODEL,
    default_topology,
    keys_of,
    make_instance,
    make_kv_delta,
    make_state,
    prompt,
)

MS = 1_000_000
T0 = 1_700_000_000 * 10**9


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def make_view(**kw):
    clock = Clock()
    asked: list[str] = []
    view = ClusterView(default_topology(), clock_ns=clock, request_snapshot=asked.append, **kw)
    return view, clock, asked


def snapshot(region, seq, keys_by_instance, incarnation="inc-1"):
    return state_pb2.KvIndexSnapshot(
        region=region,
        seq=seq,
        agent_incarnation=incarnation,
        instances=[
            state_pb2.InstanceBlockDelta(instance_id=i, stored_keys=k, cleared=True, block_size=16)
            for i, k in keys_by_instance.items()
        ],
    )


class TestStaleness:
    def test_region_older_than_bound_is_not_routable(self):
        view, clock, _ = make_view(staleness_ms=500)
        view.apply_state(make_state("tokyo", [make_instance("tyo-l40s-0", "L40S")]))
        assert view.routable_regions() == ["tokyo"]
        clock.now += 500 * MS
        assert view.is_fresh("tokyo")
        clock.now += 1 * MS
        assert not view.is_fresh("tokyo") and view.routable_regions() == []
        assert view.state_age_ms("tokyo") == pytest.approx(501)
        # A new state makes it routable again.
        view.apply_state(make_state("tokyo", [make_instance("tyo-l40s-0", "L40S")], seq=2))
        assert view.routable_regions() == ["tokyo"]

    def test_region_without_healthy_instance_is_not_routable(self):
        view, _, _ = make_view()
        view.apply_state(make_state("tokyo", [make_instance("tyo-l4-0", "L4", healthy=False)]))
        assert view.routable_regions() == []

    def test_older_state_of_same_incarnation_is_ignored(self):
        view, _, _ = make_view()
        view.apply_state(make_state("tokyo", [make_instance("a", running=5)], seq=5))
        view.apply_state(make_state("tokyo", [make_instance("a", running=1)], seq=4))
        assert view.instances()[0].num_requests_running == 5
        view.apply_state(
            make_state("tokyo", [make_instance("a", running=2)], seq=1, incarnation="inc-2")
        )
        assert view.instances()[0].num_requests_running == 2

    def test_known_models_and_regions(self):
        view, _, _ = make_view()
        view.apply_state(
            make_state("tokyo", [make_instance("a", model="small", max_model_len=2048)])
        )
        # The topology serves Llama 3.1 with its 128k context.
        assert view.known_models() == {MODEL: 131072, "small": 2048}
        assert {"washington-dc", "frankfurt", "tokyo"} <= view.known_region_names()


class TestKvSequencing:
    def test_first_sight_asks_for_snapshot_then_deltas_apply_in_order(self):
        view, _, asked = make_view()
        view.apply_state(make_state("tokyo", [make_instance("a")]))
        assert asked == ["tokyo"]
        assert not view.apply_kv_delta(make_kv_delta("tokyo", 1, {"a": [11]}))  # buffered
        view.apply_kv_snapshot(snapshot("tokyo", 0, {"a": [10]}))
        assert view.prefix_index.keys("a") == {10, 11}  # snapshot + buffered delta 1
        assert view.kv_sequence("tokyo") == ("inc-1", 1, False)
        assert view.apply_kv_delta(make_kv_delta("tokyo", 2, {"a": [12]}))
        assert view.prefix_index.keys("a") == {10, 11, 12}
        assert not view.apply_kv_delta(make_kv_delta("tokyo", 2, {"a": [99]}))  # repeat
        assert 99 not in view.prefix_index.keys("a")
        assert asked == ["tokyo"]

    def test_gap_asks_for_snapshot_which_replaces_the_regions_keys(self):
        view, _, asked = make_view()
        view.apply_kv_snapshot(snapshot("tokyo", 5, {"a": [1, 2], "b": [3]}))
        assert not view.apply_kv_delta(make_kv_delta("tokyo", 7, {"a": [4]}))  # 6 missing
        assert asked == ["tokyo"]
        assert view.kv_sequence("tokyo")[2]  # awaiting
        view.apply_kv_snapshot(snapshot("tokyo", 6, {"a": [5]}))
        # Old keys of the region are gone (b too); the buffered delta 7 is replayed.
        assert view.prefix_index.keys("a") == {4, 5}
        assert view.prefix_index.keys("b") == frozenset()
        assert view.kv_sequence("tokyo") == ("inc-1", 7, False)

    def test_new_incarnation_asks_for_snapshot(self):
        view, _, asked = make_view()
        view.apply_kv_snapshot(snapshot("tokyo", 3, {"a": [1]}))
        view.apply_kv_delta(make_kv_delta("tokyo", 1, {"a": [2]}, incarnation="inc-2"))
        assert asked == ["tokyo"]
        view.apply_state(make_state("frankfurt", [make_instance("f")], incarnation="x"))
        assert asked == ["tokyo", "frankfurt"]

    def test_snapshot_with_remaining_gap_asks_again(self):
        view, _, asked = make_view()
        view.apply_kv_snapshot(snapshot("tokyo", 1, {}))
        view.apply_kv_delta(make_kv_delta("tokyo", 5, {"a": [5]}))
        view.apply_kv_snapshot(snapshot("tokyo", 2, {}))  # delta 5 does not follow 2
        assert asked == ["tokyo", "tokyo"]
        assert view.kv_sequence("tokyo") == ("inc-1", 2, True)

    def test_unanswered_snapshot_is_asked_again_after_retry_interval(self):
        view, clock, asked = make_view(snapshot_retry_ms=1000)
        view.apply_state(make_state("tokyo", [make_instance("a")]))
        view.apply_state(make_state("tokyo", [make_instance("a")], seq=2))
        assert asked == ["tokyo"]
        clock.now += 1000 * MS
        view.apply_state(make_state("tokyo", [make_instance("a")], seq=3))
        assert asked == ["tokyo", "tokyo"]
        view.snapshot_failed("tokyo")
        view.apply_kv_delta(make_kv_delta("tokyo", 1, {"a": [1]}))
        assert asked == ["tokyo", "tokyo", "tokyo"]

    def test_without_snapshot_callback_deltas_are_adopted(self):
        view = ClusterView(default_topology())
        assert not view.apply_kv_delta(make_kv_delta("tokyo", 4, {"a": [1]}))
        assert view.prefix_index.keys("a") == {1}
        assert view.apply_kv_delta(make_kv_delta("tokyo", 5, {"a": [2]}))

    def test_prefix_lookup(self):
        view, _, _ = make_view()
        tokens = prompt(100)
        view.apply_kv_snapshot(snapshot("tokyo", 0, {"a": keys_of(tokens[:64]), "b": []}))
        assert view.cached_prefix_tokens(["a", "b", "c"], tokens) == {"a": 64, "b": 0, "c": 0}


class TestRtt:
    def test_seeded_from_topology_and_updated_by_reports(self):
        view, _, _ = make_view()
        topo = default_topology()
        assert view.rtt_ms("tokyo", "tokyo") == 0.0
        assert view.rtt_ms("tokyo", "frankfurt") == topo.rtt_ms("tokyo", "frankfurt")
        view.apply_rtt(state_pb2.RttReport(region="frankfurt", rtt_ms={"tokyo": 250.0}))
        assert view.rtt_ms("frankfurt", "tokyo") == 250.0
        assert view.rtt_ms("tokyo", "frankfurt") == 250.0  # the reverse direction is used
        assert view.rtt_ms("tokyo", "nowhere") == view.unknown_rtt_ms


class TestOptimisticAccounting:
    def test_placements_count_until_a_state_reflects_them(self):
        view, _clock, _ = make_view()
        view.apply_state(
            make_state(
                "tokyo", [make_instance("a", queued_prefill_tokens=100)], timestamp_unix_ns=T0
            )
        )
        view.record_placement(
            "tokyo", "a", "q1", 1000, 50, placed_unix_ns=T0 + 10 * MS, one_way_ms=20
        )
        view.record_placement(
            "tokyo", "a", "q2", 2000, 60, placed_unix_ns=T0 + 40 * MS, one_way_ms=20
        )
        inst = view.instances()[0]
        assert inst.queued_prefill_tokens == 100 + 3000
        assert inst.queued_decode_tokens == 110
        assert inst.pending_placements == 2 and inst.num_requests_waiting == 2
        # A state stamped before q1 could reach the agent (placed + 20 ms) keeps both.
        view.apply_state(
            make_state("tokyo", [make_instance("a")], seq=2, timestamp_unix_ns=T0 + 25 * MS)
        )
        assert view.instances()[0].pending_placements == 2
        # One stamped after q1 arrived but before q2 did drops q1 only.
        view.apply_state(
            make_state("tokyo", [make_instance("a")], seq=3, timestamp_unix_ns=T0 + 30 * MS)
        )
        assert [p.request_id for p in view.pending_placements("tokyo", "a")] == ["q2"]
        view.apply_state(
            make_state("tokyo", [make_instance("a")], seq=4, timestamp_unix_ns=T0 + 60 * MS)
        )
        assert view.instances()[0].queued_prefill_tokens == 0

    def test_placed_prefill_rate_decays_with_its_window(self):
        view, clock, _ = make_view(prefill_rate_window_s=10.0)
        view.apply_state(make_state("tokyo", [make_instance("a")], timestamp_unix_ns=T0))
        assert view.prefill_arrival_tokens_per_s("a", T0) == 0.0
        view.record_placement("tokyo", "a", "q1", 1000, 50, placed_unix_ns=T0)
        view.record_placement("tokyo", "a", "q2", 3000, 50, placed_unix_ns=T0 + 10_000 * MS)
        # q1 adds 1000 / 10 tokens/s, decayed by e^-1 over 10 s; q2 adds 300 tokens/s.
        expected = 100 * math.exp(-1) + 300
        assert view.prefill_arrival_tokens_per_s("a", T0 + 10_000 * MS) == pytest.approx(expected)
        clock.now = T0 + 20_000 * MS
        assert view.instances()[0].prefill_arrival_tokens_per_s == pytest.approx(
            expected * math.exp(-1)
        )
        with pytest.raises(ValueError, match="prefill_rate_window_s"):
            ClusterView(prefill_rate_window_s=0)

    def test_unknown_region_is_ignored(self):
        view, _, _ = make_view()
        view.record_placement("mars", "a", "q", 1, 1)
        assert view.pending_placements("mars", "a") == []

    def test_placement_arrivals_feed_the_queue_wait_timeline(self):
        view, clock, _ = make_view()
        view.apply_state(
            make_state(
                "tokyo", [make_instance("a", queued_prefill_tokens=700)], timestamp_unix_ns=T0
            )
        )
        # Decided in this order, they reach the instance in the other (one-way delays differ).
        view.record_placement("tokyo", "a", "far", 1000, 9, placed_unix_ns=T0, one_way_ms=70)
        view.record_placement("tokyo", "a", "near", 2000, 9, placed_unix_ns=T0, one_way_ms=5)
        clock.now = T0 + 20 * MS
        inst = view.instances()[0]
        assert inst.prefill_arrivals_ms == ((-15.0, 2000, 0), (50.0, 1000, 0))
        assert inst.state_prefill_tokens == 700 and inst.queued_prefill_tokens == 3700
        assert inst.state_stamp_age_ms == 20.0
        # Past the horizon they are forgotten: when listed, and when the next one is recorded.
        horizon_ms = PREFILL_TIMELINE_HORIZON_S * 1000
        clock.now = T0 + int((70 + horizon_ms) * MS) + 1
        assert view.instances()[0].prefill_arrivals_ms == ()
        view.record_placement("tokyo", "a", "next", 10, 1, cached_tokens=32)
        assert view._prefill_arrivals["a"] == [(clock.now, 10, 32, clock.now)]

    def test_a_placement_stays_on_the_timeline_while_its_prefill_runs(self):
        view, clock, _ = make_view()
        view.apply_state(make_state("tokyo", [make_instance("a")], timestamp_unix_ns=T0))
        # A long prompt predicted to prefill for 3 s, then a short one behind it.
        view.record_placement("tokyo", "a", "long", 60_000, 9, placed_unix_ns=T0,
                              prefill_busy_ms=3000.0)  # fmt: skip
        view.record_placement("tokyo", "a", "short", 100, 9, placed_unix_ns=T0 + MS,
                              prefill_busy_ms=10.0)  # fmt: skip
        horizon_ms = PREFILL_TIMELINE_HORIZON_S * 1000
        # Past the horizon from their arrivals, but not from the long one's prefill end: both
        # stay (the short one queues behind the long one).
        clock.now = T0 + int((2000 + horizon_ms) * MS)
        assert [n for _, n, _ in view.instances()[0].prefill_arrivals_ms] == [60_000, 100]
        clock.now = T0 + int((3000 + horizon_ms) * MS) + 1
        assert view.instances()[0].prefill_arrivals_ms == ()

    def test_placement_arrivals_are_capped(self):
        view, _clock, _ = make_view()
        view.apply_state(make_state("tokyo", [make_instance("a")], timestamp_unix_ns=T0))
        for k in range(PREFILL_TIMELINE_MAX_ARRIVALS + 5):
            view.record_placement("tokyo", "a", f"q{k}", k + 1, 1, placed_unix_ns=T0 + k * MS)
        arrivals = view.instances()[0].prefill_arrivals_ms
        assert len(arrivals) == PREFILL_TIMELINE_MAX_ARRIVALS
        assert arrivals[0][1] == 6 and arrivals[-1][1] == PREFILL_TIMELINE_MAX_ARRIVALS + 5


class TestInflight:
    def test_tightest_tpot_target_with_expiry(self):
        view, clock, _ = make_view()
        assert view.tightest_inflight_tpot_ms("tokyo", "a") == float("inf")
        view.track_inflight("tokyo", "a", "chat-1", 100.0)
        view.track_inflight("tokyo", "a", "code-1", 50.0, expires_unix_ns=T0 + 5 * MS)
        view.track_inflight("tokyo", "a", "batch-1", float("inf"))  # no TPOT target
        assert view.tightest_inflight_tpot_ms("tokyo", "a") == 50.0
        view.apply_state(make_state("tokyo", [make_instance("a")]))
        assert view.instances()[0].tightest_inflight_tpot_ms == 50.0
        clock.now += 5 * MS
        assert view.tightest_inflight_tpot_ms("tokyo", "a") == 100.0  # code-1 expired
        view.untrack_request("chat-1")
        assert view.tightest_inflight_tpot_ms("tokyo", "a") == float("inf")
        view.untrack_inflight("tokyo", "a", "never-there")


def test_staleness_must_be_positive():
    with pytest.raises(ValueError, match="staleness_ms"):
        ClusterView(staleness_ms=0)
