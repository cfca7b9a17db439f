"""Soft admission in the simulator: a best-effort request that no instance can take without
slowing the SLO requests running there waits in the scheduler's best-effort queue, and a flood
of later, more urgent SLO requests cannot starve it past ``best_effort_max_wait_ms``."""

from __future__ import annotations

import pytest
import yaml

from slomesh.scheduler.policy import BUILTIN_PROFILES
from slomesh.sim import SimConfig, Simulator
from slomesh.slo import load_slo_config
from tests.unit.sim.helpers import azure_trace, one_h100

FLOOD_S = 20.0
BULK_ARRIVAL_S = 0.5


def scenario(tmp_path):
    """One H100; an "interactive" SLO request (TPOT target 10 ms, priority 0) every 50 ms for
    20 s, each decoding 200 tokens (about 30 run at once, each step ~8 ms: within 90 % of
    10 ms); at 0.5 s one "bulk" request (best-effort tier, priority 2, an unreachable 1 ms
    TPOT target). At priority 2 the bulk request may slow the running requests' steps to at
    most 70 % of their 10 ms target (the profile's priority_slo_margins), which a batch of
    ~30 already exceeds: it is queued until the flood ends or its wait expires."""
    topo = one_h100(tmp_path)
    slo_path = tmp_path / "slo.yaml"
    classes = {
        "interactive": {"ttft_base_ms": 500, "ttft_per_prompt_token_ms": 0.25, "tpot_ms": 10},
        "bulk": {"tpot_ms": 1, "on_infeasible": "best_effort", "priority": 2},
    }
    slo_path.write_text(yaml.safe_dump({"classes": classes}))
    slo = load_slo_config(slo_path)
    rows = [(i * 0.05, 200, 200) for i in range(round(FLOOD_S / 0.05))]
    rows.append((BULK_ARRIVAL_S, 1000, 50))
    trace = azure_trace(tmp_path, sorted(rows), topo)
    for r in trace.requests:
        r.slo_class = "bulk" if r.prompt_tokens == 1000 else "interactive"
    return topo, slo, trace


def run(topo, slo, trace, max_wait_ms, config=None):
    decisions = []

    def on_decision(now, request, decision, view):
        if request.slo_class == "bulk":
            decisions.append((now, decision.outcome, decision.candidates[0].rejected_by))

    profile = {**BUILTIN_PROFILES["slomesh"], "best_effort_max_wait_ms": max_wait_ms}
    out = Simulator(topo, profile, config or SimConfig(), slo, on_decision=on_decision).run(trace)
    (bulk,) = [r for r in out.records if r.slo_class == "bulk"]
    return out, bulk, decisions


def test_a_flood_of_later_slo_requests_does_not_starve_a_queued_best_effort_request(tmp_path):
    topo, slo, trace = scenario(tmp_path)
    max_wait_ms = 2000.0
    out, bulk, decisions = run(topo, slo, trace, max_wait_ms)

    # Queued on arrival (its placement would slow the running requests too much), placed on
    # the lowest-TTFT instance once it had waited max_wait_ms -- while the flood still ran.
    assert decisions[0] == (BULK_ARRIVAL_S, "queued", "protect-inflight")
    (t_placed, outcome, _) = decisions[-1]
    assert outcome == "best_effort" and len(decisions) == 2
    assert t_placed == pytest.approx(BULK_ARRIVAL_S + max_wait_ms / 1000.0, abs=1e-5)
    assert t_placed < FLOOD_S
    assert bulk.ok and bulk.outcome == "best_effort"
    assert bulk.best_effort_wait_ms == pytest.approx(max_wait_ms, abs=0.01)
    # It completes within max_wait_ms plus its own service time (from reaching the engine to
    # its last token at the client) and the stack's way in.
    (result,) = [r for r in out.results if r.request_id == bulk.request_id]
    service_s = bulk.finish_s + bulk.return_delay_s - bulk.at_agent_s
    way_in_s = SimConfig().request_path_ms / 1000.0
    assert result.e2e_ms / 1000.0 <= max_wait_ms / 1000.0 + way_in_s + service_s + 1e-6
    assert result.ttft_ms >= max_wait_ms  # the time queued is part of its TTFT

    # Without the bound the same request waits for the whole flood: it would starve.
    _, starved, decisions = run(topo, slo, trace, 60_000.0)
    assert starved.ok and starved.best_effort_wait_ms > 10 * max_wait_ms
    (t_late, outcome, rejected_by) = decisions[-1]
    # Placed by a dispatch pass once capacity freed (not forced): it passes protect-inflight.
    assert t_late > FLOOD_S and outcome == "best_effort" and rejected_by == "slo-feasible"


def test_the_queue_keeps_the_simulation_exact(tmp_path):
    """Queued requests bound the decode runs computed ahead (`SimConfig.decode_runs`): the
    fast path gives exactly what stepping one by one gives."""
    topo, slo, trace = scenario(tmp_path)
    fast, _, _ = run(topo, slo, trace, 2000.0)
    slow, _, _ = run(topo, slo, trace, 2000.0, SimConfig(decode_runs=False))
    key = [(r.request_id, r.outcome, r.first_token_s, r.finish_s) for r in fast.records]
    assert key == [(r.request_id, r.outcome, r.first_token_s, r.finish_s) for r in slow.records]
    assert fast.stats["decode_runs"] > 0 and slow.stats["decode_runs"] == 0


def test_a_full_queue_refuses_best_effort_requests(tmp_path):
    topo, slo, trace = scenario(tmp_path)
    # A second bulk request right after the first: with room for one, it is refused.
    for r in trace.requests:
        if r.arrival_s == pytest.approx(0.55):
            r.slo_class = "bulk"
    profile = {**BUILTIN_PROFILES["slomesh"], "best_effort_queue_limit": 1}
    out = Simulator(topo, profile, SimConfig(), slo).run(trace)
    bulk = [r for r in out.records if r.slo_class == "bulk"]
    assert [r.error_code for r in bulk] == ["", "RESOURCE_EXHAUSTED"]
    assert bulk[1].outcome == "queued" and "queue full" in bulk[1].error
