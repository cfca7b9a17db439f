from __future__ import annotations

import math

import pytest

from slomesh.engine.profiles import (
    ACTIVATION_RESERVE_BYTES,
    DEFAULT_MODEL,
    GIB,
    PROFILES,
    GpuProfile,
    decode_step_time_s,
    get_model_spec,
    get_profile,
    prefill_time_s,
    step_time_s,
)


def test_llama_8b_kv_bytes_per_token_and_weights():
    assert DEFAULT_MODEL.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert DEFAULT_MODEL.weight_bytes == int(8.03e9 * 2)
    assert DEFAULT_MODEL.max_model_len == 32768


@pytest.mark.parametrize(("gpu", "lo_ms", "hi_ms"), [("H100", 6.0, 8.0), ("L4", 55.0, 65.0)])
def test_decode_step_at_batch_1_matches_measured_vllm(gpu, lo_ms, hi_ms):
    t_ms = 1000 * decode_step_time_s(get_profile(gpu), DEFAULT_MODEL, 1, 512)
    assert lo_ms <= t_ms <= hi_ms


def test_h100_prefill_of_8k_tokens():
    t = prefill_time_s(get_profile("H100"), DEFAULT_MODEL, 8192)
    assert 0.3 <= t <= 0.6


@pytest.mark.parametrize("gpu", sorted(PROFILES))
def test_step_time_grows_with_work_and_orders_gpus(gpu):
    p = get_profile(gpu)
    m = DEFAULT_MODEL
    assert step_time_s(p, m, 0, 0, 0) == 0.0
    small = decode_step_time_s(p, m, 1, 100)
    big = decode_step_time_s(p, m, 128, 4000)
    assert big > small > p.step_overhead_s
    # Prefill of 4k tokens is compute bound: doubling the tokens roughly doubles its time.
    t4k = prefill_time_s(p, m, 4096)
    t8k = prefill_time_s(p, m, 8192)
    assert 1.9 < t8k / t4k < 2.6
    # A cached prefix makes the same prompt cheaper.
    assert prefill_time_s(p, m, 1024, cached_tokens=3072) < prefill_time_s(p, m, 4096)


def test_h100_is_fastest_and_l4_slowest_at_decode():
    times = {g: decode_step_time_s(get_profile(g), DEFAULT_MODEL, 8, 1000) for g in PROFILES}
    assert min(times, key=times.get) == "H100"
    assert max(times, key=times.get) == "L4"


def test_default_attention_estimate_is_used_when_pairs_not_given():
    p, m = get_profile("H100"), DEFAULT_MODEL
    explicit = step_time_s(p, m, 4096, 0, 4096, attention_pairs=4096 + 4096 * 4096 / 2)
    assert step_time_s(p, m, 4096, 0, 4096) == pytest.approx(explicit)


def test_negative_counts_raise():
    p = get_profile("A100")
    with pytest.raises(ValueError, match="prefill_tokens"):
        step_time_s(p, DEFAULT_MODEL, -1, 0, 0)
    with pytest.raises(ValueError, match="attention_pairs"):
        step_time_s(p, DEFAULT_MODEL, 1, 0, 1, attention_pairs=-1)


@pytest.mark.parametrize("gpu", sorted(PROFILES))
def test_num_gpu_blocks_formula(gpu):
    p = get_profile(gpu)
    m = DEFAULT_MODEL
    expected = math.floor(
        (p.mem_bytes * p.gpu_memory_utilization - m.weight_bytes - ACTIVATION_RESERVE_BYTES)
        / (16 * m.kv_bytes_per_token)
    )
    assert p.num_gpu_blocks(m, 16) == expected
    assert expected > 0  # an 8B bf16 model fits every card, even the 24 GiB ones
    assert p.num_gpu_blocks(m, 32) == p.kv_cache_bytes(m) // (32 * m.kv_bytes_per_token)


def test_24gib_cards_hold_tens_of_thousands_of_tokens():
    blocks = get_profile("L4").num_gpu_blocks(DEFAULT_MODEL, 16)
    assert 40_000 < blocks * 16 < 60_000
    assert get_profile("L4").mem_bytes == 24 * GIB


def test_unknown_gpu_and_model_names_are_named_in_the_error():
    with pytest.raises(ValueError, match="B200"):
        get_profile("B200")
    with pytest.raises(ValueError, match="no-such-model"):
        get_model_spec("no-such-model")


def test_profile_validation_names_the_field():
    with pytest.raises(ValueError, match="compute_efficiency"):
        GpuProfile(
            "X", 1e12, 1e12, GIB, compute_efficiency=1.5, memory_efficiency=0.8, step_overhead_s=0.0
        )
    with pytest.raises(ValueError, match="step_overhead_s"):
        GpuProfile(
            "X",
            1e12,
            1e12,
            GIB,
            compute_efficiency=0.5,
            memory_efficiency=0.8,
            step_overhead_s=-1.0,
        )
