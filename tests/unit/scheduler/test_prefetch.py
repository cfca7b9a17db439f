"""Hot-prefix prefetch: decayed demand, plans only for growing demand where the prefix is
missing, and the hit rate it adds in the simulator."""

from __future__ import annotations

import pytest

from slomesh.report import build_report
from slomesh.scheduler.policy import BUILTIN_PROFILES, PolicyConfigError, make_policy
from slomesh.scheduler.prefetch import HotPrefixTracker, PrefetchConfig
from slomesh.sim.cli import _add_prefetch
from slomesh.sim.simulator import SimConfig, Simulator
from tests.unit.scheduler.factories import MODEL, make_instance, make_state, prompt
from tests.unit.scheduler.test_policy import T0, cache, view_with
from tests.unit.sim.helpers import mooncake_trace
from tests.unit.sim.test_kv_moves import PREFIX, topology

SHARED = prompt(1024)  # 64 blocks: two tracked prefixes of 32 blocks


def two_regions(tokyo_holds: int = 0):
    view = view_with(
        [
            make_state("washington-dc", [make_instance("wdc-0", "H100")]),
            make_state("tokyo", [make_instance("tyo-0", "L4"), make_instance("tyo-1", "L4")]),
        ]
    )
    cache(view, "washington-dc", {"wdc-0": SHARED})
    cache(view, "tokyo", {"tyo-1": SHARED[:tokyo_holds]} if tokyo_holds else {})
    return view


def tracker(**kw) -> HotPrefixTracker:
    return HotPrefixTracker(PrefetchConfig(min_demand=2.0, half_life_s=10.0, **kw))


class TestHotPrefixTracker:
    def test_demand_decays_with_its_half_life(self):
        t = tracker()
        keys = t.observe(MODEL, "tokyo", [*SHARED, *prompt(10, 9)], now_s=0.0)
        assert len(keys) == 2  # the 512- and 1024-token prefixes
        t.observe(MODEL, "tokyo", SHARED, now_s=10.0)
        assert t.demand(MODEL, keys[1], "tokyo", 10.0) == pytest.approx(1.5)
        assert t.demand(MODEL, keys[1], "tokyo", 20.0) == pytest.approx(0.75)
        assert t.demand(MODEL, keys[1], "frankfurt", 20.0) == 0.0

    def test_copies_the_longest_hot_prefix_to_the_region_asking_for_it(self):
        t, view = tracker(), two_regions(tokyo_holds=512)
        for i in range(3):
            t.observe(MODEL, "tokyo", [*SHARED, *prompt(20, 50_000 + 100 * i)], now_s=float(i))
        orders = t.plan(view, 3.0, T0)
        assert len(orders) == 1  # the 512-token prefix is covered by the 1024-token one
        order = orders[0]
        assert (order.source_instance, order.dest_region) == ("wdc-0", "tokyo")
        assert order.dest_instance == "tyo-1"  # it holds half already
        assert (len(order.token_ids), order.from_tokens) == (1024, 512)
        assert order.bytes == 512 * 131072
        # Nothing new: demand does not grow, and the order is still in flight.
        assert t.plan(view, 4.0, T0) == []
        t.observe(MODEL, "tokyo", SHARED, now_s=5.0)
        assert t.plan(view, 5.0, T0) == []  # in flight
        t.done(order)
        t.observe(MODEL, "tokyo", SHARED, now_s=6.0)
        assert len(t.plan(view, 6.0, T0)) == 1

    def test_no_order_where_the_prefix_is_held_or_the_demand_is_low(self):
        t, view = tracker(), two_regions(tokyo_holds=1024)
        for i in range(3):
            t.observe(MODEL, "tokyo", SHARED, now_s=float(i))
        t.observe(MODEL, "washington-dc", SHARED, now_s=2.0)
        assert t.plan(view, 3.0, T0) == []  # tokyo holds it; washington's demand is 1

    def test_bad_config_names_the_field(self):
        with pytest.raises(ValueError, match="half_life_s"):
            PrefetchConfig(half_life_s=0)
        with pytest.raises(PolicyConfigError, match="min_blocks"):
            make_policy("slomesh", kv_prefetch={"min_blocks": 0})


def test_prefetched_blocks_serve_tokyo_in_the_simulator(tmp_path):
    """Tokyo asks for a prefix Washington DC holds; once its demand grows the prefix is
    copied on the prefetch class, and later Tokyo requests are served from it locally while
    Washington DC is busy."""
    topo = topology(tmp_path, tokyo_gpu="H100")
    rows = [(0.0, 24 * 512, 8, PREFIX)]
    rows += [(1.0 + k, 25 * 512, 8, [*PREFIX, 900 + k]) for k in range(8)]
    rows += [(3.5 + 0.001 * k, 24 * 512, 400, list(range(100 + 30 * k, 124 + 30 * k))) for k in range(10)]
    trace = mooncake_trace(tmp_path, sorted(rows), topo)
    for r in trace.requests:
        r.origin_region = "washington-dc" if r.prompt_tokens == 24 * 512 else "tokyo"
        if r.output_tokens == 400:
            r.slo_class = "batch"
    profile = {
        **BUILTIN_PROFILES["slomesh"],
        "name": "prefetch",
        "kv_moves": False,
        "kv_prefetch": {"period_s": 0.5, "min_demand": 1.5},
    }
    out = Simulator(topo, profile, SimConfig()).run(trace)
    assert out.stats["prefetches"] == 1 and out.stats["kv_moves"] == 0
    assert out.stats["prefetch_bytes"] == 24 * 512 * 131072
    # Its export on Washington DC and import on Tokyo ran as one-token requests, charged to it.
    assert out.stats["prefetch_requests"] == 2
    assert 0 < out.stats["prefetch_gpu_seconds"] < 1.0
    assert out.stats["prefetch_gpu_usd"] > 0
    served = [r for r in out.records if r.prefetched_prompt_tokens]
    assert served and all(r.instance_id == "tyo-0" for r in served)
    assert all(r.prefetched_prompt_tokens == 24 * 512 for r in served)
    report = build_report(out.results, trace="t", policy="p", duration_s=1.0, topology=topo)
    before = report["cost_usd"]
    _add_prefetch(report, out)
    total = sum(r.prompt_tokens for r in out.records if r.ok)
    assert report["prefetch"]["hit_rate"] == pytest.approx(len(served) * 24 * 512 / total)
    assert report["cross_region_kv_bytes"] == out.stats["prefetch_bytes"]
    prefetch_usd = out.stats["prefetch_egress_usd"] + out.stats["prefetch_gpu_usd"]
    assert report["cost_usd"] == pytest.approx(before + prefetch_usd)
    assert report["prefetch"]["gpu_cost_usd"] == out.stats["prefetch_gpu_usd"]
