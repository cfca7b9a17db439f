"""Predictor arithmetic on hand-checkable numbers, with the roofline and with fitted latency
profiles."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from datetime import UTC, datetime
from itertools import product

import pytest
import yaml

from slomesh.engine.profiles import DEFAULT_MODEL, PROFILES, step_time_s
from slomesh.profiling import (
    DecodeCoefficients,
    DecodeFit,
    DecodePoint,
    FitQuality,
    LatencyProfile,
    PrefillCoefficients,
    PrefillFit,
    PrefillPoint,
    SweepConfig,
)
from slomesh.scheduler.policy import PolicyConfigError, make_policy
from slomesh.scheduler.predictor import (
    Prediction,
    PredictorConfig,
    decode_throughput_tokens_per_s,
    fitted_step_ms,
    load_latency_profile,
    predict,
    prefill_ms,
    queue_wait_ms,
    tpot_ms,
)
from slomesh.scheduler.view import InstanceView
from slomesh.slo import load_slo_classes
from tests.unit.scheduler.factories import make_instance, make_request, make_state, prompt
from tests.unit.scheduler.test_policy import view_with

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
        # No GPU profile for "CPU": the measured prefill throughput times the queue.
        i = inst("CPU", queued_prefill_tokens=5000, prefill_tokens_per_s=10_000)
        assert queue_wait_ms(i, new_kv_tokens=100) == pytest.approx(500.0)

    def test_measured_throughput_is_ignored_where_the_roofline_knows_the_gpu(self):
        # The agent's tokens/TTFT counts waits and the path, not the engine's capacity.
        slow = inst("H100", queued_prefill_tokens=5000, prefill_tokens_per_s=1000)
        assert queue_wait_ms(slow, 0) == queue_wait_ms(inst("H100", queued_prefill_tokens=5000), 0)

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

    def test_chunked_prefill_steps_ahead_on_the_roofline(self):
        # Budget 8192 - 4 running decodes = 8188 prompt tokens per step. 20000 queued: the
        # request starts in the third step: half the step in flight + two full steps.
        busy = {"num_requests_running": 4, "kv_cache_usage": 0.5, "num_gpu_blocks": 1000}
        i = inst("H100", queued_prefill_tokens=20_000, **busy)
        full = step_time_s(
            PROFILES["H100"], DEFAULT_MODEL, 8188, 4, 8000 + 8188,
            attention_pairs=8000 + 8188 * 8189 / 2,
        )  # fmt: skip
        assert queue_wait_ms(i, 0) == pytest.approx(2.5 * full * 1000)
        # Less than a step ahead: only the rest of the step in flight, half of it.
        j = inst("H100", queued_prefill_tokens=1000, **busy)
        part = step_time_s(
            PROFILES["H100"], DEFAULT_MODEL, 1000, 4, 8000 + 1000,
            attention_pairs=8000 + 1000 * 1001 / 2,
        )  # fmt: skip
        assert queue_wait_ms(j, 0) == pytest.approx(part / 2 * 1000)
        assert queue_wait_ms(inst("H100"), 0) == 0.0
        assert decode_throughput_tokens_per_s(inst("L4")) < decode_throughput_tokens_per_s(inst())


def h100_prefill_ms(n: int, decodes: int = 0, context: int = 0, prior: int = 0) -> float:
    """One H100 roofline step of a chunk of ``n`` prompt tokens after ``prior`` tokens of its
    prompt (fresh: 0) beside ``decodes`` decodes over ``context`` KV tokens, ms."""
    return 1000 * step_time_s(
        PROFILES["H100"], DEFAULT_MODEL, n, decodes, context + prior + n,
        attention_pairs=context + n * prior + n * (n + 1) / 2,
    )  # fmt: skip


class TestQueueWaitTimeline:
    """The scheduler's own placements, timed step by step (`queue_wait_ms`'s timeline)."""

    def test_the_rest_of_the_step_a_placement_started(self):
        # 4000 tokens reached an idle instance 20 ms ago and started a step then.
        i = inst("H100", prefill_arrivals_ms=((-20.0, 4000, 0),), state_stamp_age_ms=50.0)
        assert queue_wait_ms(i, 0) == pytest.approx(h100_prefill_ms(4000) - 20.0)
        # Reaching it 30 ms from now: 30 ms less; after that step ends: no wait.
        assert queue_wait_ms(i, 0, arrival_ms=30.0) == pytest.approx(h100_prefill_ms(4000) - 50)
        assert queue_wait_ms(i, 0, arrival_ms=h100_prefill_ms(4000)) == 0.0

    def test_placements_arriving_after_the_request_are_behind_it(self):
        i = inst("H100", prefill_arrivals_ms=((40.0, 8000, 0),), state_stamp_age_ms=10.0)
        assert queue_wait_ms(i, 0, arrival_ms=30.0) == 0.0
        assert queue_wait_ms(i, 0, arrival_ms=50.0) == pytest.approx(h100_prefill_ms(8000) - 10)

    def test_prompts_waiting_for_the_next_step_share_it(self):
        # A (3000 tokens) starts a step at -10 ms; B (2000) arrives during it and waits for
        # the next one, which the new request joins behind B: it waits for A's step only,
        # and its first prefill step carries B's 2000 tokens besides its own 500.
        i = inst(
            "H100",
            prefill_arrivals_ms=((-10.0, 3000, 0), (-5.0, 2000, 0)),
            state_stamp_age_ms=100.0,
        )
        wait = h100_prefill_ms(3000) - 10.0
        assert queue_wait_ms(i, 0) == pytest.approx(wait)
        p = predict(i, rtt_ms=0.0, prompt_tokens=500, cached_prefix_tokens=0, output_tokens=10)
        assert p.queue_wait_ms == pytest.approx(wait)
        shared = h100_prefill_ms(2500) - h100_prefill_ms(500)
        assert p.prefill_ms == pytest.approx(prefill_ms(i, 500, 0) + shared)
        # Placed later at 4000 tokens/s, more prompts join it before it starts.
        j = dataclasses.replace(i, prefill_arrival_tokens_per_s=4000.0)
        q = predict(j, rtt_ms=0.0, prompt_tokens=500, cached_prefix_tokens=0, output_tokens=10)
        behind = int(4000 * wait / 1000)
        assert q.prefill_ms == pytest.approx(
            prefill_ms(i, 500, 0) + h100_prefill_ms(2500 + behind) - h100_prefill_ms(500)
        )

    def test_more_than_a_step_ahead_waits_full_steps(self):
        # 20000 tokens arrive at -1 ms during a step of 100 tokens started at -2 ms: after
        # it, two full steps (2 x 8192) run before the step the new request joins (the last
        # 3616 tokens and its own). The prompt's second chunk attends to its first 8192.
        i = inst("H100", prefill_arrivals_ms=((-2.0, 100, 0), (-1.0, 20_000, 0)))
        first = h100_prefill_ms(100)
        chunk1, chunk2 = h100_prefill_ms(8192), h100_prefill_ms(8192, prior=8192)
        assert chunk2 > 1.2 * chunk1
        assert queue_wait_ms(i, 0) == pytest.approx(first - 2.0 + chunk1 + chunk2)
        # Reaching it once the first full step runs: the rest of that one, then one more.
        assert queue_wait_ms(i, 0, arrival_ms=first) == pytest.approx(chunk1 + chunk2 - 2.0)

    def test_a_chunk_attends_to_the_cached_prefix_of_its_prompt(self):
        # 6000 uncached tokens after a 20000-token cached prefix, arrived 3 ms ago.
        i = inst("H100", prefill_arrivals_ms=((-3.0, 6000, 20_000),))
        assert queue_wait_ms(i, 0) == pytest.approx(h100_prefill_ms(6000, prior=20_000) - 3.0)

    def test_a_long_prompt_counts_whole_in_the_state_until_it_is_done(self):
        # A 30000-token prompt arrived 1 s ago: its first three chunks are done, its last
        # (5424 tokens) in flight. The state (stamped now) still counts all 30000 tokens
        # (an agent counts a prompt until its first token): none of them is unknown work.
        steps = [h100_prefill_ms(8192, prior=k * 8192) for k in range(3)]
        last = h100_prefill_ms(30_000 - 3 * 8192, prior=3 * 8192)
        start = -sum(steps) - last / 2  # halfway through the last chunk now
        i = inst(
            "H100",
            queued_prefill_tokens=30_000,
            state_prefill_tokens=30_000,
            prefill_arrivals_ms=((start, 30_000, 0),),
        )
        assert queue_wait_ms(i, 0) == pytest.approx(last / 2)
        # Work the state reports beyond it is unknown work of unknown phase.
        more = dataclasses.replace(i, queued_prefill_tokens=34_000, state_prefill_tokens=34_000)
        assert queue_wait_ms(more, 0) == pytest.approx(max(last / 2, h100_prefill_ms(4000) / 2))

    def test_prompts_the_state_reports_beyond_the_timeline_keep_the_formula(self):
        # The state (stamped 5 ms ago) reports 6000 tokens; the timeline holds the 1000 of a
        # placement that arrived 8 ms ago: 5000 unknown, in a step of unknown phase.
        i = inst(
            "H100",
            queued_prefill_tokens=6000,
            state_prefill_tokens=6000,
            state_stamp_age_ms=5.0,
            prefill_arrivals_ms=((-8.0, 1000, 0),),
        )
        assert queue_wait_ms(i, 0) == pytest.approx(h100_prefill_ms(5000) / 2)
        # What the timeline knows is not counted twice; without it, the state's tokens are.
        known = dataclasses.replace(i, state_prefill_tokens=1000, queued_prefill_tokens=1000)
        assert queue_wait_ms(known, 0) == pytest.approx(h100_prefill_ms(1000) - 8.0)
        alone = inst("H100", queued_prefill_tokens=6000, state_prefill_tokens=6000)
        assert queue_wait_ms(alone, 0) == pytest.approx(h100_prefill_ms(6000) / 2)

    def test_decodes_in_flight_delay_a_new_step_by_half_a_decode_step(self):
        busy = {"num_requests_running": 8, "kv_cache_usage": 0.25, "num_gpu_blocks": 1000}
        decode = h100_prefill_ms(0, 8, 4000)
        # Nothing queued: the rest of the decode step in flight, half of one.
        assert queue_wait_ms(inst("H100", **busy), 0) == pytest.approx(decode / 2)
        i = inst("H100", prefill_arrivals_ms=((-5.0, 2000, 0),), **busy)
        assert queue_wait_ms(i, 0) == pytest.approx(decode / 2 + h100_prefill_ms(2000, 8, 4000) - 5)


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
        quiet, _, _ = tpot_ms(inst(), 1000, 100)
        busy, batch, _ = tpot_ms(inst(num_requests_running=40, num_requests_waiting=9), 1000, 100)
        assert batch == 50 and busy > quiet
        capped = tpot_ms(inst(num_requests_running=999), 10, 10, PredictorConfig(max_num_seqs=8))
        assert capped[1] == 8

    def test_prompts_arriving_stretch_the_decode_step(self):
        # rho = arrival rate x time of a prompt token in a full 8192-token step.
        quiet, _, _ = tpot_ms(inst(), 1000, 100)
        step_s = step_time_s(
            PROFILES["H100"], DEFAULT_MODEL, 8192, 0, 8192, attention_pairs=8192 * 8193 / 2
        )
        rate = 0.4 / (step_s / 8192)  # prompt tokens/s that keep the GPU 40 % busy
        loaded, _, _ = tpot_ms(inst(prefill_arrival_tokens_per_s=rate), 1000, 100)
        assert loaded == pytest.approx(quiet / 0.6)
        flooded, _, _ = tpot_ms(inst(prefill_arrival_tokens_per_s=100 * rate), 1000, 100)
        assert flooded == pytest.approx(quiet / (1 - 0.9))  # capped at the configured 0.9
        off = PredictorConfig(prefill_interference_max=0.0)
        assert tpot_ms(inst(prefill_arrival_tokens_per_s=rate), 1000, 100, off)[0] == quiet
        with pytest.raises(ValueError, match="prefill_interference_max"):
            PredictorConfig(prefill_interference_max=1.0)

    def test_running_decodes_count_the_new_prompt_in_the_arrival_rate(self):
        # A 10 s rate window: the request's 0.2 x window x rate uncached tokens raise the rate
        # the running decodes see from 40 % to 48 % busy; its own decode, after its prefill,
        # sees the rate before it.
        step_s = step_time_s(
            PROFILES["H100"], DEFAULT_MODEL, 8192, 0, 8192, attention_pairs=8192 * 8193 / 2
        )
        rate = 0.4 / (step_s / 8192)
        quiet, _, quiet_inflight = tpot_ms(inst(), 1000, 100)
        assert quiet_inflight == quiet  # nothing to prefill, nothing arriving
        busy = inst(prefill_arrival_tokens_per_s=rate, prefill_rate_window_s=10.0)
        own, _, inflight = tpot_ms(busy, 1000, 100, uncached_prompt_tokens=int(0.2 * 10 * rate))
        assert own == pytest.approx(quiet / 0.6)
        assert inflight == pytest.approx(quiet / (1 - 0.48), rel=1e-4)
        p = predict(busy, rtt_ms=0, prompt_tokens=1000, cached_prefix_tokens=200, output_tokens=100)
        assert p.tpot_ms == pytest.approx(own)
        assert p.inflight_tpot_ms == tpot_ms(busy, 1000, 100, uncached_prompt_tokens=800)[2]
        assert p.inflight_tpot_ms > p.tpot_ms
        # Its GPU seconds count the decode step alone: the prompts stretching it pay for
        # their own chunks (the engine splits a step's time by tokens).
        assert p.gpu_seconds == pytest.approx(p.prefill_ms / 1e3 + 99 * quiet / 1e3 / p.batch_size)

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


# -- fitted latency profiles --------------------------------------------------------------------


def fitted_profile(model: str = DEFAULT_MODEL.name) -> LatencyProfile:
    """A profile holding exactly these coefficients (and no points)::

    prefill_step_ms = 5 + 0.05 * batch_tokens + 2e-5 * attention_pairs
    decode_step_ms  = 7 + 0.08 * batch_size + 3e-4 * context_tokens
    """
    exact = FitQuality(r2_train=1.0, r2_held_out=1.0, train_points=0, held_out_points=0)
    return LatencyProfile(
        model=model,
        gpu_type="H100",
        endpoint="http://127.0.0.1:8000",
        created_at=datetime(2025, 1, 2, tzinfo=UTC),
        max_model_len=32768,
        sweep=SweepConfig(),
        prefill=PrefillFit(
            coefficients=PrefillCoefficients(
                intercept_ms=5.0, per_batch_token_ms=0.05, per_attention_pair_ms=2e-5
            ),
            quality=exact,
            points=[],
        ),
        decode=DecodeFit(
            coefficients=DecodeCoefficients(
                intercept_ms=7.0, per_sequence_ms=0.08, per_context_token_ms=3e-4
            ),
            quality=exact,
            points=[],
        ),
    )


@pytest.fixture
def h100_profile_path(tmp_path):
    return str(fitted_profile().save(tmp_path / "h100.yaml"))


# KV capacity 1000 blocks x 16 tokens; a quarter in use: the running decodes attend to 4000.
BUSY = {"num_requests_running": 4, "kv_cache_usage": 0.25, "num_gpu_blocks": 1000}


class TestFittedProfiles:
    def test_step_takes_the_slower_of_the_compute_and_memory_sides(self):
        p = fitted_profile()
        # 10-token chunk beside 200 decodes over 200k KV tokens: memory-bound.
        compute = 5.0 + 0.05 * 210 + 2e-5 * (55 + 200_000)
        memory = 7.0 + 0.08 * 201 + 3e-4 * (200_000 + 10)
        assert memory > compute
        assert fitted_step_ms(p, 10, 55, 10, 200, 200_000) == pytest.approx(memory)
        # 1000-token chunk alone: compute-bound.
        compute = 5.0 + 0.05 * 1000 + 2e-5 * 500_500
        assert fitted_step_ms(p, 1000, 500_500, 1000, 0, 0) == pytest.approx(compute)
        assert fitted_step_ms(p, 0, 0.0, 0, 0, 0) == 0.0

    def test_prefill_over_chunks_and_tpot_use_the_coefficients(self, h100_profile_path):
        config = PredictorConfig(
            prefill_chunk_tokens=1000, latency_profiles={"H100": h100_profile_path}
        )
        i = inst("H100", **BUSY)
        p = predict(
            i,
            rtt_ms=30,
            prompt_tokens=2500,
            cached_prefix_tokens=0,
            output_tokens=200,
            config=config,
        )
        # Chunks (n, prior) = (1000, 0), (1000, 1000), (500, 2000), each beside 4 decodes over
        # 4000 KV tokens; compute side 5 + 0.05 (n + 4) + 2e-5 (n prior + n (n+1)/2 + 4000)
        # (memory side 7 + 0.08 * 5 + 3e-4 (4000 + prior + n) <= 9.35 ms, never the larger).
        chunks = [
            5 + 0.05 * 1004 + 2e-5 * (500_500 + 4000),
            5 + 0.05 * 1004 + 2e-5 * (1_000_000 + 500_500 + 4000),
            5 + 0.05 * 504 + 2e-5 * (1_000_000 + 125_250 + 4000),
        ]
        assert chunks == pytest.approx([65.29, 85.29, 52.785])
        assert p.prefill_ms == pytest.approx(65.29 + 85.29 + 52.785)
        # No prompt queued: the rest of the decode step in flight, half of one expected (memory
        # side 7 + 0.08 * 4 + 3e-4 * 4000 = 8.52 ms over compute 5 + 0.05 * 4 + 2e-5 * 4000).
        assert p.queue_wait_ms == pytest.approx(8.52 / 2)
        assert p.ttft_ms == pytest.approx(30 + p.queue_wait_ms + p.prefill_ms)
        # TPOT: batch 4 + 1 over 4000 + 2500 + 200 / 2 KV tokens, memory-bound.
        assert p.batch_size == 5
        assert p.tpot_ms == pytest.approx(7 + 0.08 * 5 + 3e-4 * 6600)
        assert p.decode_ms == pytest.approx(199 * p.tpot_ms)

    def test_throughputs_use_the_fitted_steps(self, h100_profile_path):
        config = PredictorConfig(
            prefill_chunk_tokens=1000, latency_profiles={"H100": h100_profile_path}
        )
        i = inst("H100", **BUSY)
        step_ms = 7 + 0.08 * 4 + 3e-4 * 4000
        assert decode_throughput_tokens_per_s(i, config) == pytest.approx(4 / step_ms * 1e3)
        # 500 queued tokens fit one step's budget (1000 - 4 decodes): half of that step, the
        # larger of its compute side (504 tokens, 125250 + 4000 pairs) and memory side (5
        # sequences over 4000 + 500 KV tokens).
        compute_ms = 5 + 0.05 * 504 + 2e-5 * (125_250 + 4000)
        memory_ms = 7 + 0.08 * 5 + 3e-4 * 4500
        assert queue_wait_ms(inst("H100", queued_prefill_tokens=500, **BUSY), 0, config) == (
            pytest.approx(max(compute_ms, memory_ms) / 2)
        )
        measured = inst("H100", prefill_tokens_per_s=123.0, decode_tokens_per_s=45.0, **BUSY)
        assert decode_throughput_tokens_per_s(measured, config) == 45.0

    def test_other_gpu_types_and_other_models_keep_the_roofline(self, h100_profile_path):
        fitted = PredictorConfig(
            prefill_chunk_tokens=1000, latency_profiles={"H100": h100_profile_path}
        )
        roofline = PredictorConfig(prefill_chunk_tokens=1000)

        def on(i: InstanceView, config: PredictorConfig) -> Prediction:
            return predict(
                i, rtt_ms=0, prompt_tokens=2500, cached_prefix_tokens=300, output_tokens=50,
                config=config,
            )  # fmt: skip

        h100 = inst("H100", **BUSY)
        assert on(h100, fitted).prefill_ms != pytest.approx(on(h100, roofline).prefill_ms)
        for i in (inst("A100", **BUSY), inst("H100", model="other/model-7b", **BUSY)):
            assert on(i, fitted) == on(i, roofline)

    def test_a_profile_takes_precedence_over_measured_throughputs(self, tmp_path):
        path = fitted_profile().save(tmp_path / "cpu.yaml")
        config = PredictorConfig(latency_profiles={"CPU": str(path)})
        i = inst("CPU", prefill_tokens_per_s=1000, decode_tokens_per_s=100)
        assert prefill_ms(i, 100, 0, config) == pytest.approx(5 + 0.05 * 100 + 2e-5 * 5050)
        assert tpot_ms(i, 100, 10, config)[:2] == (pytest.approx(7 + 0.08 + 3e-4 * 105), 1)
        assert prefill_ms(i, 100, 0) == pytest.approx(100.0)  # no profile: measured rate

    def test_config_stays_hashable_and_loads_each_file_once(self, h100_profile_path):
        a = PredictorConfig(latency_profiles={"H100": h100_profile_path, "A100": h100_profile_path})
        b = PredictorConfig(
            latency_profiles=[("A100", h100_profile_path), ("H100", h100_profile_path)]
        )
        assert a.latency_profiles == (("A100", h100_profile_path), ("H100", h100_profile_path))
        assert a == b and hash(a) == hash(b) and a != PredictorConfig()
        assert load_latency_profile(h100_profile_path) is load_latency_profile(h100_profile_path)
        assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a

    @pytest.mark.parametrize(
        ("profiles", "error", "message"),
        [
            ({"H100": "no/such/profile.yaml"}, ValueError, "latency_profiles.H100: cannot read"),
            ({"H100": 5}, TypeError, "latency_profiles.H100: must be a file path"),
            (["H100"], TypeError, "latency_profiles: must be a mapping"),
        ],
    )
    def test_bad_entries_name_the_field(self, profiles, error, message):
        with pytest.raises(error, match=message):
            PredictorConfig(latency_profiles=profiles)
        with pytest.raises(PolicyConfigError, match=message):
            make_policy({"name": "x", "predictor": {"latency_profiles": profiles}})

    def test_an_invalid_profile_file_is_a_policy_config_error(self, tmp_path):
        data = fitted_profile().model_dump(mode="json")
        data["decode"]["coefficients"]["per_sequence_ms"] = -1.0
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(data))
        with pytest.raises(
            PolicyConfigError,
            match=r"latency_profiles\.H100: .*decode\."
            r"coefficients\.per_sequence_ms",
        ):
            make_policy({"name": "x", "predictor": {"latency_profiles": {"H100": str(bad)}}})
        not_yaml = tmp_path / "not.yaml"
        not_yaml.write_text("prefill: [unclosed")
        with pytest.raises(PolicyConfigError, match=r"latency_profiles\.H100: .*not valid YAML"):
            make_policy({"name": "x", "predictor": {"latency_profiles": {"H100": str(not_yaml)}}})

    def test_a_policy_places_with_its_profiles(self, h100_profile_path):
        policy = make_policy("slomesh", predictor={"latency_profiles": {"H100": h100_profile_path}})
        assert policy.predictor_config.latency_profiles == (("H100", h100_profile_path),)
        view = view_with([make_state("tokyo", [make_instance("t", "H100")])])
        request = make_request(prompt(100), origin="tokyo", expected_output_tokens=64)
        p = policy.place(request, view).chosen.prediction
        # One 100-token step alone (compute side); TPOT at batch 1 over 100 + 64 / 2 tokens.
        assert p.prefill_ms == pytest.approx(5 + 0.05 * 100 + 2e-5 * 5050)
        assert p.tpot_ms == pytest.approx(7 + 0.08 + 3e-4 * 132)


def roofline_fitted_profile(gpu_type: str = "H100") -> LatencyProfile:
    """A profile fitted (by `slomesh.profiling`) to points the roofline itself generates.

    Prefill: k sequences of n uncached tokens after c cached ones in one step; decode: B
    sequences of n-token prompts at the mean context of a 32-token output. The sweep covers
    the requests of the test below (chunks up to 8192 tokens after prefixes up to 28k), so
    that the fit does not extrapolate and any gap to the roofline is the step composition's.
    """
    gpu, model = PROFILES[gpu_type], DEFAULT_MODEL
    prefill_points, decode_points = [], []
    for n, cached, k in product((256, 1024, 2048, 4096, 8192), (0, 8192, 24_576), (1, 2, 4)):
        point = PrefillPoint(uncached_tokens=n, cached_tokens=cached, batch_size=k, ttft_ms=0.0)
        step_s = step_time_s(
            gpu, model, k * n, 0, k * (cached + n), attention_pairs=point.attention_pairs
        )
        prefill_points.append(point.model_copy(update={"ttft_ms": step_s * 1e3}))
    for n, k in product((256, 1024, 4096, 16_384), (1, 2, 4, 8, 16, 32, 64)):
        point = DecodePoint(batch_size=k, prompt_tokens=n, output_tokens=32, tpot_ms=0.0)
        context = point.context_tokens
        step_s = step_time_s(gpu, model, 0, k, int(context), attention_pairs=context)
        decode_points.append(point.model_copy(update={"tpot_ms": step_s * 1e3}))
    return LatencyProfile.from_points(
        prefill_points,
        decode_points,
        model=model.name,
        gpu_type=gpu_type,
        endpoint="roofline",
        created_at=datetime(2025, 1, 2, tzinfo=UTC),
        max_model_len=model.max_model_len,
        sweep=SweepConfig(),
    )


def test_a_profile_fitted_to_the_roofline_predicts_what_the_roofline_does(tmp_path):
    # The composition of `fitted_step_ms` checked against the roofline on mixed steps:
    # compute-bound chunks beside decodes, and short chunks beside 250 decodes over 90 % of
    # the KV cache (memory-bound).
    profile = roofline_fitted_profile()
    assert profile.prefill.quality.r2_held_out > 0.999
    assert profile.decode.quality.r2_held_out > 0.999
    path = str(profile.save(tmp_path / "h100.yaml"))
    states = [
        {},
        {"num_requests_running": 16, "kv_cache_usage": 0.1},
        {
            "num_requests_running": 128,
            "num_requests_waiting": 8,
            "kv_cache_usage": 0.6,
            "queued_prefill_tokens": 6000,
        },
        {"num_requests_running": 250, "kv_cache_usage": 0.9},
    ]
    requests = [(100, 0, 10), (300, 0, 100), (2000, 1500, 400), (12_000, 0, 200),
                (30_000, 20_000, 50)]  # fmt: skip
    for chunk in (2048, 8192):
        roofline = PredictorConfig(prefill_chunk_tokens=chunk)
        fitted = PredictorConfig(prefill_chunk_tokens=chunk, latency_profiles={"H100": path})
        for state, (prompt_tokens, cached, out) in product(states, requests):
            i = inst("H100", **state)
            want, got = (
                predict(
                    i,
                    rtt_ms=0,
                    prompt_tokens=prompt_tokens,
                    cached_prefix_tokens=cached,
                    output_tokens=out,
                    config=config,
                )
                for config in (roofline, fitted)
            )
            case = (chunk, state, prompt_tokens, cached)
            assert got.ttft_ms == pytest.approx(want.ttft_ms, rel=0.01), case
            assert got.tpot_ms == pytest.approx(want.tpot_ms, rel=0.01), case
