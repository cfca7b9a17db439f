"""The simulated region agent: accounting as the live agent's, KV events into the index."""

from __future__ import annotations

import pytest

from slomesh.engine import kv_cache as engine_kv
from slomesh.engine.model import Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import DEFAULT_MODEL, get_profile
from slomesh.kv import events as kv_events
from slomesh.kv.hashing import compute_block_keys
from slomesh.sim.agent import EWMA_ALPHA, SimInstance, SimRegion, to_agent_events
from slomesh.topology import Topology


@pytest.fixture
def region():
    topo = Topology.default()
    spec = topo.region("washington-dc")
    insts = [
        SimInstance(
            spec.name,
            i,
            Engine(get_profile(i.gpu_type), DEFAULT_MODEL, EngineConfig(block_size=4)),
            DEFAULT_MODEL.name,
            *topo.gpu_price_usd_per_hour(i.gpu_type, spec.cloud_region),
        )
        for i in spec.instances
    ]
    return SimRegion(spec, insts, incarnation="sim-test")


def test_queued_tokens_and_throughputs(region):
    inst = region.instances[0]
    inst.start_request("a", prompt_tokens=1000, cached_prefix_tokens=200, max_tokens=50, now_s=0.0)
    inst.start_request("b", prompt_tokens=300, cached_prefix_tokens=0, max_tokens=10, now_s=0.0)
    assert inst.queued_prefill_tokens == 800 + 300
    assert inst.queued_decode_tokens == 0
    inst.tick(0.0)
    # "a" gets its first token at 0.4 s: 800 uncached tokens / 0.4 s.
    inst.tokens_received("a", 1, 0.4)
    assert inst.prefill_tokens_per_s == pytest.approx(2000.0)
    assert inst.queued_prefill_tokens == 300
    assert inst.queued_decode_tokens == 49
    inst.tokens_received("b", 1, 0.5)  # 300 / 0.5 = 600 tok/s
    assert inst.prefill_tokens_per_s == pytest.approx(2000.0 + EWMA_ALPHA * (600.0 - 2000.0))
    inst.decode_tokens_received(["a", "b"], 4)
    assert inst.queued_decode_tokens == 45 + 5
    inst.tick(1.0)
    # Only "a" was running at the previous tick: no sample yet.
    assert inst.decode_tokens_per_s is None
    inst.decode_tokens_received(["a", "b"], 5)  # "b" reaches its 10 tokens
    inst.tick(1.5)
    assert inst.decode_tokens_per_s == pytest.approx(10 / 0.5)
    assert inst.queued_decode_tokens == 40
    inst.finish_request("b")
    inst.finish_request("a")
    assert (inst.queued_prefill_tokens, inst.queued_decode_tokens) == (0, 0)
    assert inst.num_running_forwarded == 0 and not inst.outstanding
    inst.finish_request("a")  # unknown: ignored


def test_the_agent_sees_tokens_in_stream_interval_chunks_whatever_the_delivery():
    topo = Topology.default()
    spec = topo.region("washington-dc")
    engine_spec = spec.instances[0]

    def instance():
        return SimInstance(
            spec.name, engine_spec,
            Engine(get_profile(engine_spec.gpu_type), DEFAULT_MODEL, EngineConfig()),
            DEFAULT_MODEL.name, 1.0, 0.5, stream_interval=10,
        )

    stepwise, at_once = instance(), instance()
    for inst in (stepwise, at_once):
        inst.start_request("a", prompt_tokens=100, cached_prefix_tokens=0, max_tokens=50,
                           now_s=0.0)
        inst.tokens_received("a", 1, 0.1)  # the first token goes out at once
        assert inst.queued_decode_tokens == 49
    for _ in range(9):
        stepwise.decode_tokens_received(["a"], 1)
    assert stepwise.queued_decode_tokens == 49  # 9 tokens held back in the engine's stream
    stepwise.decode_tokens_received(["a"], 1)
    assert stepwise.queued_decode_tokens == 39  # the chunk of 10 arrived
    for _ in range(14):
        stepwise.tokens_received("a", 1, 0.2)
    at_once.decode_tokens_received(["a"], 24)  # a decode run delivered at once
    assert stepwise.queued_decode_tokens == at_once.queued_decode_tokens == 29
    with pytest.raises(ValueError, match="stream_interval"):
        SimInstance(spec.name, engine_spec, stepwise.engine, DEFAULT_MODEL.name, 1.0, 0.5, 0)


def test_finishing_before_the_first_token_releases_queued_prefill(region):
    inst = region.instances[0]
    inst.start_request("x", 100, 0, 5, now_s=0.0)
    inst.finish_request("x")
    assert inst.queued_prefill_tokens == 0 and len(inst.outstanding) == 0


def test_engine_events_become_index_keys_and_deltas(region):
    inst = region.instances[0]
    engine = inst.engine
    prompt = list(range(100, 114))  # 3 full blocks of 4 (+2 tokens)
    engine.add_request(EngineRequest("r", prompt, 1), now_s=0.0)
    step = engine.step(0.0)
    assert any(isinstance(e, engine_kv.BlockStored) for e in step.kv_events)
    region.on_kv_events(inst, step.kv_events)
    assert region.index.num_blocks(inst.instance_id) == 0  # indexed when read
    cached = region.cached_prefix_tokens(inst, prompt)
    assert cached == 12
    delta = region.take_kv_delta(now_unix_ns=123)
    assert delta.seq == 1 and delta.region == "washington-dc"
    assert delta.agent_incarnation == "sim-test" and delta.timestamp_unix_ns == 123
    (inst_delta,) = delta.instances
    assert set(inst_delta.stored_keys) == set(compute_block_keys(prompt, 4))
    assert region.take_kv_delta(now_unix_ns=124) is None  # nothing new


def test_region_state_fields(region):
    inst = region.instances[0]
    inst.start_request("a", 10, 0, 5, now_s=0.0)
    state = region.region_state(now_unix_ns=7, gauges=[(1, 2, 0.25), (0, 0, 0.0)])
    assert (state.seq, state.timestamp_unix_ns, state.region) == (1, 7, "washington-dc")
    s0 = state.instances[0]
    assert (s0.num_requests_running, s0.num_requests_waiting) == (1, 2)
    assert s0.kv_cache_usage == pytest.approx(0.25)
    assert s0.num_requests_outstanding == 1 and s0.queued_prefill_tokens == 10
    assert s0.gpu_type == "H100" and s0.block_size == 4 and s0.healthy
    assert s0.num_gpu_blocks == inst.engine.num_gpu_blocks
    assert s0.max_model_len == inst.engine.max_model_len
    assert s0.price_usd_per_hour > 0 and s0.model == DEFAULT_MODEL.name
    assert region.region_state(now_unix_ns=8, gauges=[(0, 0, 0.0)] * 2).seq == 2


def test_event_conversion():
    stored = engine_kv.BlockStored(
        block_hashes=[1, 2], parent_block_hash=None, token_ids=list(range(8)), block_size=4
    )
    removed = engine_kv.BlockRemoved(block_hashes=[2])
    out = to_agent_events([stored, removed, engine_kv.AllBlocksCleared()])
    assert out[0] == kv_events.BlockStored(
        block_hashes=(1, 2), parent_block_hash=None, token_ids=tuple(range(8)), block_size=4,
        medium="GPU",
    )
    assert out[1] == kv_events.BlockRemoved(block_hashes=(2,), medium="GPU")
    assert isinstance(out[2], kv_events.AllBlocksCleared)
    with pytest.raises(TypeError):
        to_agent_events(["nope"])


def test_requests_prefilled_alone_are_counted_for_the_fit(region):
    inst = region.instances[0]
    counters = inst.engine_metrics.counters

    def engine_finished(n: int, prompt_tokens: int = 3000, prefill_s: float = 0.1) -> None:
        counters.request_prefill_time_sum_s += n * prefill_s
        counters.request_prefill_time_count += n
        counters.request_prompt_tokens_sum += n * prompt_tokens
        counters.request_prompt_tokens_count += n
        counters.request_prefill_kv_computed_tokens_sum += n * prompt_tokens
        counters.request_prefill_kv_computed_tokens_count += n

    compared = inst.latency_fit.prefill_errors
    inst.observe_step_times((0, 0, 0.0))  # baseline
    # "a" alone: forwarded, first token, finished.
    inst.start_request("a", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2, now_s=0.0)
    inst.tokens_received("a", 1, 0.1)
    inst.finish_request("a")
    engine_finished(1)
    inst.observe_step_times((0, 0, 0.0))
    assert compared.count == 1
    # "b" is forwarded while "c" waits for its first token: both may share steps.
    inst.start_request("c", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2, now_s=1.0)
    inst.start_request("b", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2, now_s=1.0)
    inst.tokens_received("c", 1, 1.1)
    inst.tokens_received("b", 1, 1.2)
    inst.finish_request("b")
    inst.finish_request("c")
    engine_finished(2)
    inst.observe_step_times((0, 0, 0.0))
    assert compared.count == 1
    # "d" forwarded after "e" got its first token (still decoding): both alone.
    inst.start_request("e", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=9, now_s=2.0)
    inst.tokens_received("e", 1, 2.1)
    inst.start_request("d", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2, now_s=2.2)
    inst.tokens_received("d", 1, 2.3)
    inst.finish_request("d")
    inst.finish_request("e")
    engine_finished(2)
    inst.observe_step_times((0, 0, 0.0))
    assert compared.count == 2
    # A request that failed before its first token is no solo prefill.
    inst.start_request("f", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2, now_s=3.0)
    inst.finish_request("f")
    engine_finished(1)
    inst.observe_step_times((0, 0, 0.0))
    assert compared.count == 2
