"""Model switches in the simulator (issue 4, item 5): region A serves model X only, region B
model Y only; a burst of Y requests from A's origin goes to B across the WAN until B is
saturated, then slomesh switches A's idle swappable instance to Y and counts the load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slomesh.sim import Simulator
from slomesh.sim.agent import SimInstance, SimRegion
from slomesh.topology import Topology
from tests.unit.sim.helpers import azure_trace

X = "meta-llama/Llama-3.1-8B-Instruct"
Y = "Qwen/Qwen2.5-7B-Instruct"
Y_BYTES = int(7.61e9 * 2)
OVERHEAD_S = 2.0
CACHE_GB_PER_S = 4.0
REMOTE_GB_PER_S = 1.0


def two_model_mesh(tmp: Path, *, a_caches_y: bool) -> Topology:
    """Washington DC (A): two H100s serving X, one swappable; Frankfurt (B): one L4 serving Y."""
    data = {
        "models": [{"name": X}, {"name": Y}],
        "regions": [
            {
                "name": "washington-dc",
                "location": "Washington DC",
                "cloud_region": "us-east-1",
                "weight_cache": [Y] if a_caches_y else [],
                "model_load_overhead_s": OVERHEAD_S,
                "weight_cache_gb_per_s": CACHE_GB_PER_S,
                "remote_weights_gb_per_s": REMOTE_GB_PER_S,
                "instances": [
                    {"id": "wdc-h100-0", "gpu_type": "H100"},
                    {"id": "wdc-h100-1", "gpu_type": "H100", "swappable": True},
                ],
            },
            {
                "name": "frankfurt",
                "location": "Frankfurt",
                "cloud_region": "eu-central-1",
                "instances": [{"id": "fra-l4-0", "gpu_type": "L4", "model": Y}],
            },
        ],
    }
    path = tmp / f"mesh-{a_caches_y}.yaml"
    path.write_text(yaml.safe_dump(data))
    return Topology.load(path)


def burst_of_y(tmp: Path, topo: Topology, n: int = 30):
    """``n`` batch-class Y requests from Washington DC, 50 ms apart, then one X request."""
    rows = [(0.05 * i, 1000, 400) for i in range(n)] + [(0.05 * n, 500, 20)]
    trace = azure_trace(
        tmp, rows, topo, shares={"washington-dc": 1.0, "frankfurt": 0.0}, name=f"burst{n}"
    )
    for req in trace.requests[:n]:
        req.model = Y
    for req in trace.requests:
        req.slo_class = "batch"
    return trace


def run(tmp: Path, a_caches_y: bool):
    topo = two_model_mesh(tmp, a_caches_y=a_caches_y)
    return Simulator(topo, "slomesh").run(burst_of_y(tmp, topo))


@pytest.mark.parametrize("a_caches_y", [True, False])
def test_y_goes_cross_region_then_loads_on_the_idle_instance(tmp_path, a_caches_y):
    out = run(tmp_path, a_caches_y)
    records = out.records
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    ys, x = records[:-1], records[-1]
    # The first Y requests cross the WAN to Frankfurt, the only region serving Y.
    assert ys[0].region == "frankfurt" and ys[0].wan_rtt_ms > 0
    assert not ys[0].loads_model and ys[0].predicted_model_load_ms == 0.0
    # Once Frankfurt is saturated, slomesh switches wdc-h100-1 to Y: once.
    assert out.stats["model_switches"] == 1
    first = next(r for r in ys if r.loads_model)
    assert first.instance_id == "wdc-h100-1"
    assert any(r.region == "frankfurt" for r in ys[: ys.index(first)])
    bandwidth = CACHE_GB_PER_S if a_caches_y else REMOTE_GB_PER_S
    load_s = OVERHEAD_S + Y_BYTES / (bandwidth * 1e9)
    assert first.predicted_model_load_ms == pytest.approx(load_s * 1000)
    # It waited at the instance the whole load (it started the switch on arrival) ...
    assert first.model_load_wait_s == pytest.approx(load_s)
    # ... and its measured TTFT is close to the predicted one (the requests held with it
    # share its first prefill step, which the prediction does not know of).
    result = out.results[ys.index(first)]
    assert result.ttft_ms == pytest.approx(first.predicted_ttft_ms, rel=0.1)
    assert result.ttft_ms > load_s * 1000
    # Later Y requests join the switched instance and wait for the rest of the load only.
    later = [r for r in ys if r.instance_id == "wdc-h100-1" and r is not first]
    assert later and all(r.model_load_wait_s < load_s for r in later)
    # Model X is still served by the other instance.
    assert x.instance_id == "wdc-h100-0"


def test_a_load_from_the_cache_beats_one_from_the_remote_store_by_weights_over_bandwidth(
    tmp_path,
):
    def first_switch_ttft_ms(a_caches_y: bool) -> float:
        out = run(tmp_path, a_caches_y)
        i = next(i for i, r in enumerate(out.records) if r.loads_model)
        return out.results[i].ttft_ms

    gap_ms = first_switch_ttft_ms(False) - first_switch_ttft_ms(True)
    expected_ms = (Y_BYTES / (REMOTE_GB_PER_S * 1e9) - Y_BYTES / (CACHE_GB_PER_S * 1e9)) * 1000
    assert gap_ms == pytest.approx(expected_ms, rel=0.05)


def test_the_agent_publishes_the_switch_and_the_cache(tmp_path):
    topo = two_model_mesh(tmp_path, a_caches_y=False)
    sim = Simulator(topo, "slomesh")
    (wdc, _fra) = sim._build_regions()
    assert isinstance(wdc, SimRegion)
    inst: SimInstance = wdc.instances[1]
    state = wdc.region_state(1, [(0, 0, 0.0), (0, 0, 0.0)], 0.0)
    assert list(state.weight_cache_models) == [X]
    assert (state.weight_cache_gb_per_s, state.remote_weights_gb_per_s) == (4.0, 1.0)
    proto = state.instances[1]
    assert proto.swappable and proto.model_load_overhead_s == OVERHEAD_S
    assert proto.model == X and proto.model_load_remaining_s == 0.0
    assert inst.can_switch()
    inst.begin_model_load(sim._engine("H100", Y, 32768), Y, 1, until_s=10.0)
    assert not inst.can_switch()
    state = wdc.region_state(2, [(0, 0, 0.0), (0, 0, 0.0)], 4.0)
    assert state.instances[1].model == Y
    assert state.instances[1].model_load_remaining_s == pytest.approx(6.0)
    assert state.instances[1].max_model_len == 32768
    inst.engine_ready(10.0)
    wdc.cache_model(Y)
    state = wdc.region_state(3, [(0, 0, 0.0), (0, 0, 0.0)], 11.0)
    assert state.instances[1].model_load_remaining_s == 0.0
    assert list(state.weight_cache_models) == [X, Y]
