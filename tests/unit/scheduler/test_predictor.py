"""Predictor arithmetic on hand-checkable numbers."""

from __future__ import annotations

import pytest

from slomesh.engine.profiles import DEFAULT_MODEL, PROFILES, step_time_s
from slomesh.scheduler.predictor import (
    PredictorConfig,
    decode_throughput_tokens_per_s,
    predict,
    prefill_ms,
    prefill_throughput_tokens_per_s,
    queue_wait_ms,
    tpot_ms,
)
from slomesh.scheduler.view import InstanceView
from slomesh.slo import load_slo_classes

SLO = load_slo_classes()


def inst(gpu_type: str = "H100", **kw) -> InstanceView:
    fields = {
        "region": "r",
        "instance_id": "i",
        "agent_endpoint": "a:1",
        "gpu_type": gpu_type,
        "model": DEFAULT_MODEL.name,
        "healthy": True,
        "num_requests_running": 0,
        "num_requests_waiting": 0,
        "num_requests_outstanding": 0,
        "kv_cache_usage": 0.0,
        "queued_prefill_tokens": 0,
        "queued_decode_tokens": 0,
        "prefill_tokens_per_s": 0.0,
        "decode_tokens_per_s": 0.0,
        "block_size": 16,
        "num_gpu_blocks": 0,
        "max_model_len": 32768,
        "price_usd_per_hour": 0.0,
        "egress_usd_per_gb": 0.0,
        "state_age_ms": 0.0,
    }
    fields.update(kw)
    return InstanceView(**fields)


class TestQueueWait:
    def test_prefill_work_ahead_over_measured_throughput(self):
        i = inst(queued_prefill_tokens=5000, prefill_tokens_per_s=10_000)
        assert queue_wait_ms(i, new_kv_tokens=100) == pytest.approx(500.0)

    def test_no_decode_wait_while_kv_fits(self):
        i = inst(queued_decode_tokens=4000, decode_tokens_per_s=1000, num_gpu_blocks=10_000)
        assert queue_wait_ms(i, new_kv_tokens=1000) == 0.0

    def test_share_of_decode_work_when_kv_is_oversubscribed(self):
        # capacity 1000 blocks * 16 = 16000 tokens, 8000 in use; ahead = 8000 + 0 + 4000;
        # deficit = 12000 + 8000 - 16000 = 4000 -> share 1/3 of 4000 tokens / 1000 tok/s.
        i = inst(
            kv_cache_usage=0.5,
            num_gpu_blocks=1000,
            queued_decode_tokens=4000,
            decode_tokens_per_s=1000,
        )
        assert queue_wait_ms(i, new_kv_tokens=8000) == pytest.approx(4000 / 3)

    def test_profile_fallback_when_throughput_unknown(self):
        i = inst("H100", queued_prefill_tokens=8192)
        rate = prefill_throughput_tokens_per_s(i)
        step = step_time_s(PROFILES["H100"], DEFAULT_MODEL, 8192, 0, 8192)
        assert rate == pytest.approx(8192 / step)
        assert queue_wait_ms(i, 0) == pytest.approx(step * 1000)
        assert decode_throughput_tokens_per_s(inst("L4")) < decode_throughput_tokens_per_s(inst())


class TestPrefill:
    def test_only_uncached_tokens_are_computed(self):
        i = inst("A100")
        expected = step_time_s(
            PROFILES["A100"],
            DEFAULT_MODEL,
            1000,
            0,
            4000,
            attention_pairs=1000 * 3000 + 1000 * 1001 / 2,
        )
        assert prefill_ms(i, 1000, 3000) == pytest.approx(expected * 1000)
        assert prefill_ms(i, 0, 4000) == 0.0
        assert prefill_ms(i, 1000, 3000) < prefill_ms(i, 4000, 0)

    def test_long_prompts_are_chunked(self):
        config = PredictorConfig(prefill_chunk_tokens=4096)
        one = prefill_ms(inst(), 4096, 0, config)
        two = prefill_ms(inst(), 8192, 0, config)
        second = step_time_s(
            PROFILES["H100"],
            DEFAULT_MODEL,
            4096,
            0,
            8192,
            attention_pairs=4096 * 4096 + 4096 * 4097 / 2,
        )
        assert two == pytest.approx(one + second * 1000)


class TestEndToEnd:
    def test_hand_checked_prediction_with_measured_throughputs(self):
        # No profile for "CPU": measured throughputs are used directly.
        i = inst(
            "CPU",
            prefill_tokens_per_s=1000,
            decode_tokens_per_s=100,
            num_requests_running=1,
            queued_prefill_tokens=500,
            price_usd_per_hour=7.2,
        )
        p = predict(i, rtt_ms=80, prompt_tokens=1000, cached_prefix_tokens=600, output_tokens=11)
        assert p.uncached_prompt_tokens == 400 and p.cached_prefix_tokens == 600
        assert p.queue_wait_ms == pytest.approx(500)  # 500 tokens / 1000 tok/s
        assert p.prefill_ms == pytest.approx(400)  # 400 uncached tokens / 1000 tok/s
        assert p.batch_size == 2 and p.tpot_ms == pytest.approx(20)  # 2 seqs / 100 tok/s
        # RTT once: rtt/2 there and rtt/2 back for the first token; decode adds none.
        assert p.ttft_ms == pytest.approx(80 + 500 + 400)
        assert p.decode_ms == pytest.approx(10 * 20)
        assert p.e2e_ms == pytest.approx(980 + 200)
        # GPU seconds: prefill + this request's share of each of its 10 decode steps.
        assert p.gpu_seconds == pytest.approx(0.4 + 10 * 0.020 / 2)
        assert p.cost_usd == pytest.approx(0.5 * 7.2 / 3600)
        assert p.bytes_moved == 0 and p.transfer_ms == 0

    def test_fully_cached_prompt_still_computes_the_last_token(self):
        p = predict(inst(), rtt_ms=0, prompt_tokens=64, cached_prefix_tokens=64, output_tokens=1)
        assert p.cached_prefix_tokens == 63 and p.uncached_prompt_tokens == 1

    def test_tpot_grows_with_batch_and_context(self):
        quiet, _ = tpot_ms(inst(), 1000, 100)
        busy, batch = tpot_ms(inst(num_requests_running=40, num_requests_waiting=9), 1000, 100)
        assert batch == 50 and busy > quiet
        capped = tpot_ms(inst(num_requests_running=999), 10, 10, PredictorConfig(max_num_seqs=8))
        assert capped[1] == 8

    def test_meets_uses_margin(self):
        p = predict(inst(), rtt_ms=0, prompt_tokens=1000, cached_prefix_tokens=0, output_tokens=10)
        chat = SLO["chat"]
        assert p.meets(chat, 1000, margin=1.0)
        assert not p.meets(chat, 1000, margin=p.ttft_ms / chat.ttft_target_ms(1000) * 0.99)
        pb = p.to_pb()
        assert (pb.ttft_ms, pb.queue_wait_ms, pb.rtt_ms) == (p.ttft_ms, p.queue_wait_ms, 0.0)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        PredictorConfig(prefill_chunk_tokens=0)
    with pytest.raises(ValueError, match="fallback_gpu_type"):
        PredictorConfig(fallback_gpu_type="TPU")
