"""Latency profiles: features, the non-negative fit, R² on held-out points, YAML files, sweep
planning, and the HTTP probe against a stand-in that speaks vLLM 0.32's wire format."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime
from itertools import product

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from slomesh import cli
from slomesh.profiling import (
    DecodePoint,
    LatencyProfile,
    LatencyProfileError,
    PrefillPoint,
    ProfilingError,
    SequenceTiming,
    ServerLimits,
    SweepConfig,
    attention_pairs,
    cache_config_from_metrics,
    engine_decode_window,
    fit_decode,
    fit_prefill,
    held_out_mask,
    main,
    nonnegative_lstsq,
    plan_sweep,
    profile_endpoint,
    r_squared,
    read_server_limits,
    run_probe,
    steady_decode,
    widest_engine_window,
)
from slomesh.vllm_metrics import ScrapedMetrics

PREFILL_TRUE = (5.0, 0.05, 2e-5)  # intercept_ms, per_batch_token_ms, per_attention_pair_ms
DECODE_TRUE = (7.0, 0.08, 3e-4)  # intercept_ms, per_sequence_ms, per_context_token_ms


def prefill_points(coef=PREFILL_TRUE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    points = []
    for n, k in product((64, 256, 512, 1024), (1, 2, 4, 8)):
        p = PrefillPoint(uncached_tokens=n, batch_size=k, ttft_ms=0.0)
        ms = coef[0] + coef[1] * p.batch_tokens + coef[2] * p.attention_pairs
        ms *= 1.0 + noise * rng.standard_normal()
        points.append(p.model_copy(update={"ttft_ms": ms}))
    return points


def decode_points(coef=DECODE_TRUE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    points = []
    for n, k in product((64, 256, 1024), (1, 2, 4, 8, 16)):
        p = DecodePoint(batch_size=k, prompt_tokens=n, output_tokens=32, tpot_ms=0.0)
        ms = coef[0] + coef[1] * k + coef[2] * p.context_tokens
        ms *= 1.0 + noise * rng.standard_normal()
        points.append(p.model_copy(update={"tpot_ms": ms}))
    return points


def make_profile(**overrides):
    fields = {
        "model": "tiny-llama",
        "gpu_type": "cpu",
        "endpoint": "http://127.0.0.1:18000",
        "created_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        "block_size": 128,
        "max_model_len": 2048,
        "sweep": SweepConfig(),
    }
    fields.update(overrides)
    return LatencyProfile.from_points(prefill_points(), decode_points(), **fields)


# ------------------------------------------------------------------------------ features


def test_attention_pairs_counts_causal_pairs_by_hand():
    # 4 fresh tokens: token j attends to tokens 1..j -> 1 + 2 + 3 + 4.
    assert attention_pairs(4) == 10
    # 3 new tokens after 5 cached: (5 + 1) + (5 + 2) + (5 + 3).
    assert attention_pairs(3, 5) == 21
    assert attention_pairs(0, 100) == 0
    with pytest.raises(ValueError):
        attention_pairs(-1)


def test_prefill_point_features_sum_over_the_batch():
    p = PrefillPoint(uncached_tokens=3, cached_tokens=5, batch_size=4, ttft_ms=1.0)
    assert p.batch_tokens == 12
    assert p.attention_pairs == 4 * 21


def test_decode_context_is_the_mean_kv_length_of_the_decode_steps():
    p = DecodePoint(batch_size=4, prompt_tokens=100, output_tokens=10, tpot_ms=1.0)
    # Decode step j (j = 1..T-1) of a sequence attends to L + j tokens (engine model).
    mean_per_seq = sum(100 + j for j in range(1, 10)) / 9
    assert p.context_tokens == pytest.approx(4 * mean_per_seq)
    assert p.context_tokens == 4 * 105


# ------------------------------------------------------------------------------ fit


def test_nonnegative_lstsq_recovers_exact_coefficients():
    rng = np.random.default_rng(1)
    a = np.column_stack([np.ones(20), rng.uniform(0, 1e3, 20), rng.uniform(0, 1e6, 20)])
    x_true = np.array([3.0, 0.02, 4e-6])
    assert nonnegative_lstsq(a, a @ x_true) == pytest.approx(x_true, rel=1e-9)


def test_nonnegative_lstsq_drops_a_negative_term_and_refits_the_rest():
    rng = np.random.default_rng(2)
    a = np.column_stack([np.ones(30), rng.uniform(0, 10, 30), rng.uniform(0, 10, 30)])
    y = a @ np.array([10.0, 2.0, -0.5]) + 0.01 * rng.standard_normal(30)
    assert np.linalg.lstsq(a, y, rcond=None)[0][2] < 0  # unconstrained fit goes negative
    x = nonnegative_lstsq(a, y)
    assert (x >= 0).all() and x[2] == 0
    refit = np.linalg.lstsq(a[:, :2], y, rcond=None)[0]
    assert x[:2] == pytest.approx(refit)
    # KKT: the gradient of the squared residual is >= 0 on every zero coefficient.
    gradient = a.T @ (a @ x - y)
    assert gradient[2] >= 0


def test_nonnegative_lstsq_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nonnegative_lstsq(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError):
        nonnegative_lstsq(np.array([[1.0, np.nan]]), np.ones(1))


def test_r_squared_small_example():
    # SS_res = 1, SS_tot = 1.5² + 0.5² + 0.5² + 1.5² = 5.
    assert r_squared([1, 2, 3, 4], [1, 2, 3, 5]) == pytest.approx(0.8)
    assert r_squared([1, 2], [2, 1]) == pytest.approx(-3.0)  # worse than the mean
    assert r_squared([1.0], [1.0]) is None
    assert r_squared([2.0, 2.0], [2.0, 2.0]) is None
    with pytest.raises(ValueError):
        r_squared([1, 2], [1])


def test_every_fourth_point_is_held_out():
    assert np.flatnonzero(held_out_mask(10, 4)).tolist() == [3, 7]
    assert np.flatnonzero(held_out_mask(6, 3)).tolist() == [2, 5]
    with pytest.raises(ValueError):
        held_out_mask(10, 1)


def test_prefill_fit_recovers_known_coefficients():
    fit = fit_prefill(prefill_points())
    c = fit.coefficients
    assert (c.intercept_ms, c.per_batch_token_ms, c.per_attention_pair_ms) == pytest.approx(
        PREFILL_TRUE, rel=1e-6
    )
    assert fit.quality.train_points == 12 and fit.quality.held_out_points == 4
    assert fit.quality.r2_train == pytest.approx(1.0) and fit.quality.r2_held_out == pytest.approx(
        1.0
    )


def test_decode_fit_recovers_known_coefficients():
    fit = fit_decode(decode_points())
    c = fit.coefficients
    assert (c.intercept_ms, c.per_sequence_ms, c.per_context_token_ms) == pytest.approx(
        DECODE_TRUE, rel=1e-6
    )
    assert fit.quality.train_points == 12 and fit.quality.held_out_points == 3


def test_fits_with_noise_stay_close():
    prefill = fit_prefill(prefill_points(noise=0.01)).coefficients
    decode = fit_decode(decode_points(noise=0.01)).coefficients
    assert prefill.per_batch_token_ms == pytest.approx(PREFILL_TRUE[1], rel=0.05)
    assert prefill.per_attention_pair_ms == pytest.approx(PREFILL_TRUE[2], rel=0.1)
    assert decode.intercept_ms == pytest.approx(DECODE_TRUE[0], rel=0.05)
    assert decode.per_context_token_ms == pytest.approx(DECODE_TRUE[2], rel=0.1)
    assert 0.99 < fit_prefill(prefill_points(noise=0.01)).quality.r2_held_out < 1.0
    assert 0.9 < fit_decode(decode_points(noise=0.01)).quality.r2_train < 1.0


def test_held_out_r2_is_computed_on_the_held_out_points_only():
    points = prefill_points()
    # Corrupt one held-out point (index 3): the fit must not see it, its R² must.
    bad = points[3].model_copy(update={"ttft_ms": points[3].ttft_ms * 10})
    points = [*points[:3], bad, *points[4:]]
    fit = fit_prefill(points)
    assert fit.coefficients.per_batch_token_ms == pytest.approx(PREFILL_TRUE[1], rel=1e-6)
    assert fit.quality.r2_train == pytest.approx(1.0)
    held = [p for i, p in enumerate(points) if i % 4 == 3]
    profile = make_profile().model_copy(update={"prefill": fit})
    predicted = [profile.prefill_ms(p.uncached_tokens, 0, p.batch_tokens) for p in held]
    expected = r_squared([p.ttft_ms for p in held], predicted)
    assert fit.quality.r2_held_out == pytest.approx(expected)
    assert expected < 0.9


def test_fit_needs_enough_training_points():
    with pytest.raises(ValueError, match="at least"):
        fit_prefill(prefill_points()[:3])


# ------------------------------------------------------------------------------ profile


def test_profile_predictions_use_the_coefficients():
    profile = make_profile()
    c0, c1, c2 = PREFILL_TRUE
    assert profile.prefill_ms(100) == pytest.approx(c0 + c1 * 100 + c2 * attention_pairs(100))
    # 300 new tokens after a 200-token prefix, in a step of 1200 tokens (4 such sequences).
    assert profile.prefill_ms(300, 200, batch_tokens=1200) == pytest.approx(
        c0 + c1 * 1200 + c2 * 4 * attention_pairs(300, 200)
    )
    assert profile.prefill_step_ms(1200, 4 * attention_pairs(300, 200)) == pytest.approx(
        profile.prefill_ms(300, 200, batch_tokens=1200)
    )
    assert profile.prefill_ms(0, 500) == 0.0
    d0, d1, d2 = DECODE_TRUE
    assert profile.decode_step_ms(8, 4000) == pytest.approx(d0 + d1 * 8 + d2 * 4000)
    with pytest.raises(ValueError):
        profile.prefill_ms(300, 0, batch_tokens=200)
    with pytest.raises(ValueError):
        profile.decode_step_ms(0, 10)
    with pytest.raises(ValueError):
        profile.decode_step_ms(1, -1)


def test_yaml_round_trip(tmp_path):
    profile = make_profile()
    path = profile.save(tmp_path / "sub" / "profile.yaml")
    loaded = LatencyProfile.load(path)
    assert loaded == profile
    assert loaded.prefill_ms(512, 0, 2048) == profile.prefill_ms(512, 0, 2048)
    assert loaded.refit().prefill.coefficients == pytest.approx(profile.prefill.coefficients)


def test_refit_with_another_holdout():
    profile = make_profile()
    refit = profile.refit(holdout_every=2)
    assert refit.holdout_every == 2
    assert refit.prefill.quality.held_out_points == 8
    assert refit.decode.coefficients.intercept_ms == pytest.approx(DECODE_TRUE[0])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["prefill"]["coefficients"].update(intercept_ms=-1.0),
         "prefill.coefficients.intercept_ms: Input should be greater than or equal to 0"),
        (lambda d: d.pop("model"), "model: Field required"),
        (lambda d: d.update(version=2), "version: Input should be 1"),
        (lambda d: d["decode"]["points"][0].update(output_tokens=1),
         "decode.points.0.output_tokens"),
        (lambda d: d.update(colour="blue"), "colour: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_loader_names_the_bad_field(tmp_path, edit, message):
    data = make_profile().model_dump(mode="json")
    edit(data)
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(LatencyProfileError, match=message.replace(".", r"\.")):
        LatencyProfile.load(path)


def test_loader_errors_for_unreadable_files(tmp_path):
    with pytest.raises(LatencyProfileError, match="cannot read"):
        LatencyProfile.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(LatencyProfileError, match="not valid YAML"):
        LatencyProfile.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(LatencyProfileError, match="top level must be a mapping"):
        LatencyProfile.load(bad)


# ------------------------------------------------------------------------------ sweep


def test_sweep_config_validates():
    assert SweepConfig(prompt_tokens=(256, 64)).prompt_tokens == (64, 256)
    for bad in (
        {"prompt_tokens": ()},
        {"batch_sizes": (0, 1)},
        {"batch_sizes": (2, 2)},
        {"output_tokens": 1},
        {"repeats": 0},
    ):
        with pytest.raises(ValueError):
            SweepConfig(**bad)


def test_plan_skips_points_beyond_the_server_limits():
    sweep = SweepConfig(
        prompt_tokens=(64, 512, 1024, 2040), batch_sizes=(1, 2, 4), output_tokens=16
    )
    limits = ServerLimits(
        model="m", max_model_len=2048, block_size=128, kv_cache_tokens=4096,
        max_num_batched_tokens=128,
    )  # fmt: skip
    plan = plan_sweep(sweep, limits)
    # 2040 + 1 fits max_model_len, 2040 + 16 does not; 4 x 1024 tokens need 4 x 1152 KV slots.
    assert (2040, 1) in plan.prefill and (2040, 1) not in plan.decode
    assert (1024, 4) not in plan.prefill
    # At a 128-token step budget, 2 x 512 prompt tokens take 8 steps: the first sequence
    # decodes in 7 of them, under half its 15 decode steps; 4 x 512 take 16 steps: over half.
    assert (512, 2) in plan.decode and (512, 4) not in plan.decode and (512, 4) in plan.prefill
    assert plan.decode == [(64, 1), (64, 2), (64, 4), (512, 1), (512, 2), (1024, 1)]
    assert any("max_model_len" in s for s in plan.skipped)
    assert any("KV cache" in s for s in plan.skipped)
    assert any("step budget" in s for s in plan.skipped)


def test_plan_assumes_vllms_default_budget_and_refuses_a_tiny_sweep():
    limits = ServerLimits(model="m", max_model_len=4096)
    sweep = SweepConfig(prompt_tokens=(512, 1024), batch_sizes=(1, 2, 4, 8), output_tokens=4)
    plan = plan_sweep(sweep, limits)
    # A 2048-token step budget is assumed: 8 x 1024 tokens take 4 steps, 3 of which the first
    # sequences decode in, more than half of the 3 decode steps; 2 steps (1 not steady) fit.
    assert plan.decode == [(512, 1), (512, 2), (512, 4), (512, 8), (1024, 1), (1024, 2), (1024, 4)]
    assert plan.skipped == [
        (
            "decode 1024 tokens x 8: 8192 prompt tokens take 4 steps at the step budget 2048: "
            "3 of the 3 decode steps would not be steady"
        )
    ]
    with pytest.raises(ProfilingError, match="decode points"):
        plan_sweep(sweep.model_copy(update={"prompt_tokens": (1024,)}), limits)


# ------------------------------------------------------------------------------ steady window


def staggered_batch(prompt_tokens, output_tokens, *, ramp_step_s=0.03, steady_step_s=0.01,
                    jitter_s=0.0):  # fmt: skip
    """Three sequences whose prefills land in engine steps 0, 1 and 2 (the server hands them
    over one by one), each step with a prefill taking ``ramp_step_s``; every later step, with
    one token for each running sequence, ``steady_step_s`` while all three run and faster
    after (5 then 3 ms: fewer sequences). Sequence ``i`` makes tokens in steps ``i`` to
    ``i + T - 1``; its chunks reach the client ``i * jitter_s`` after the step ends."""
    ends, t = [], 0.0
    for step in range(output_tokens + 2):
        if step <= 2:
            t += ramp_step_s
        elif step <= output_tokens - 1:
            t += steady_step_s
        else:
            t += 0.005 if step == output_tokens else 0.003
        ends.append(t)
    timings = []
    for i in range(3):
        chunks = tuple((ends[step] + i * jitter_s, 1) for step in range(i, i + output_tokens))
        timings.append(SequenceTiming(ttft_s=chunks[0][0], e2e_s=chunks[-1][0], chunks=chunks))
    return timings


def test_steady_decode_leaves_out_the_ramps():
    timings = staggered_batch(100, 20)
    steady = steady_decode(timings, 100)
    # Steady steps 3..19 (all three decode, none finished): 17 steps, a gap per sequence each.
    assert steady.step_s == pytest.approx(0.01)
    assert steady.tokens == 17 * 3
    # They end tokens 4..20 of sequence 0, 3..19 of sequence 1, 2..18 of sequence 2, attending
    # to L + m - 1 tokens: mean m over the window is 11 = T / 2 + 1, the KV mean L + T / 2.
    assert steady.context_tokens == pytest.approx(3 * (100 + 20 / 2))
    # The whole-call TPOT mixes the ramps in: (e2e - ttft) / (T - 1) is off for every sequence.
    for t in timings:
        assert abs((t.e2e_s - t.ttft_s) / 19 - 0.01) > 0.0005


def test_steady_decode_tolerates_client_jitter_below_a_step():
    # Sequence i's chunks arrive 2i ms late: the window opens at sequence 2's first token,
    # after the chunks of step 2 of sequences 0 and 1, whose next gaps (step 3) are left out,
    # and closes at sequence 0's last token, before the chunks of step 19 of sequences 1 and 2.
    steady = steady_decode(staggered_batch(100, 20, jitter_s=0.002), 100)
    assert steady.step_s == pytest.approx(0.01)
    assert steady.tokens == 16 + 15 + 16  # steps 4-19, 4-18 and 3-18


def test_steady_decode_splits_chunks_and_ignores_stalls():
    # One sequence of T = 32 tokens, stream_interval 4: the first token alone, then 4 tokens
    # every 40 ms, the 4th such chunk 400 ms late (a stall of the host, which delays the rest),
    # the last chunk with the 3 tokens left.
    arrivals = [(0.1, 1)] + [(0.1 + 0.04 * c + (0.4 if c >= 4 else 0.0), 4) for c in range(1, 8)]
    arrivals.append((arrivals[-1][0] + 0.03, 3))
    seq = SequenceTiming(ttft_s=0.1, e2e_s=arrivals[-1][0], chunks=tuple(arrivals))
    steady = steady_decode([seq], 50)
    assert steady.tokens == 31  # T - 1 gaps: a 4-token chunk counts 4
    # The median: the stall's 4 gaps of 110 ms are outvoted (the mean would be 23 ms).
    assert steady.step_s == pytest.approx(0.01)
    assert steady.context_tokens == pytest.approx(50 + 32 / 2)


def test_steady_decode_refuses_a_batch_that_never_decodes_together():
    early = SequenceTiming(ttft_s=0.0, e2e_s=0.05, chunks=((0.0, 1), (0.05, 1)))
    late = SequenceTiming(ttft_s=0.06, e2e_s=0.1, chunks=((0.06, 1), (0.1, 1)))
    with pytest.raises(ProfilingError, match="no steady decode window"):
        steady_decode([early, late], 10)
    with pytest.raises(ValueError, match="at least one sequence"):
        steady_decode([], 10)
    empty_chunk = SequenceTiming(ttft_s=0.0, e2e_s=0.05, chunks=((0.0, 1), (0.05, 0)))
    with pytest.raises(ValueError, match="at least 1 token"):
        steady_decode([empty_chunk], 10)


def scraped(ttft=10, finished=10, itl_sum_s=5.0, itl_count=1000, generated=1100):
    return ScrapedMetrics(
        time_to_first_token_count=ttft,
        request_prompt_tokens_count=finished,
        inter_token_latency_sum_s=itl_sum_s,
        inter_token_latency_count=itl_count,
        generation_tokens_total=generated,
    )


def test_engine_window_is_the_mean_itl_between_the_scrapes():
    # 4 sequences of 100 tokens. By the start scrape: 4 first tokens and 2 decode steps of the
    # ramp (20 ms each, mixed with prefills); by the end scrape 40 steady steps of 10 ms.
    baseline = scraped()
    start = scraped(ttft=14, itl_sum_s=5.0 + 8 * 0.02, itl_count=1008, generated=1112)
    end = scraped(ttft=14, itl_sum_s=start.inter_token_latency_sum_s + 160 * 0.01,
                  itl_count=1168, generated=1272)  # fmt: skip
    window = engine_decode_window(baseline, start, end, batch_size=4, prompt_tokens=100)
    assert window is not None and window.source == "engine"
    assert window.step_s == pytest.approx(0.01)
    assert window.tokens == 160
    # The 40 steps run after 12, 16, ..., 168 output tokens of the call: mean 90 on top of the
    # 4 x 100 prompt tokens.
    assert window.context_tokens == pytest.approx(4 * 100 + (12 + 168) / 2)


@pytest.mark.parametrize(
    "change",
    [
        {"start": {"ttft": 13}},  # a prefill not done at the start scrape
        {"end": {"finished": 11}},  # a sequence finished before the end scrape
        {"end": {"itl_count": 1008, "itl_sum_s": 5.16, "generated": 1112}},  # no step between
        {"end": {"generated": 1280}},  # tokens without an ITL: another request's prefill
    ],
)
def test_engine_window_refuses_scrapes_that_miss_the_steady_window(change):
    start = {"ttft": 14, "itl_sum_s": 5.16, "itl_count": 1008, "generated": 1112}
    end = {"ttft": 14, "itl_sum_s": 6.76, "itl_count": 1168, "generated": 1272}
    start.update(change.get("start", {}))
    end.update(change.get("end", {}))
    window = engine_decode_window(scraped(), scraped(**start), scraped(**end), 4, 100)
    assert window is None
    with pytest.raises(ValueError, match="batch_size"):
        engine_decode_window(scraped(), scraped(**start), scraped(**end), 0, 100)


def test_widest_engine_window_spans_the_first_full_to_the_last_unfinished_scrape():
    # 4 sequences; the poller's scrapes: ramp (3 first tokens), steady x3, one finished.
    baseline = scraped()
    series = [
        scraped(ttft=13, itl_sum_s=5.04, itl_count=1002, generated=1105),
        scraped(ttft=14, itl_sum_s=5.16, itl_count=1008, generated=1112),  # start
        scraped(ttft=14, itl_sum_s=5.56, itl_count=1048, generated=1152),
        scraped(ttft=14, itl_sum_s=6.76, itl_count=1168, generated=1272),  # end
        scraped(ttft=14, finished=11, itl_sum_s=7.0, itl_count=1190, generated=1294),
    ]
    window = widest_engine_window(baseline, series, batch_size=4, prompt_tokens=100)
    assert window == engine_decode_window(baseline, series[1], series[3], 4, 100)
    assert window is not None and window.step_s == pytest.approx(0.01)
    # No scrape after every first token, or none before the first finished request.
    assert widest_engine_window(baseline, series[:1], 4, 100) is None
    assert widest_engine_window(baseline, series[4:], 4, 100) is None


# ------------------------------------------------------------------------------ HTTP


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",\
engine="0",gpu_memory_utilization="0.9",kv_cache_size_tokens="65536",num_cpu_blocks="None",\
num_gpu_blocks="512",prefix_caching_hash_algo="sha256"} 1.0
"""


def test_cache_config_from_vllm_metrics():
    assert cache_config_from_metrics(VLLM_METRICS) == {"block_size": 128, "kv_cache_tokens": 65536}
    without_size = VLLM_METRICS.replace('kv_cache_size_tokens="65536",', "")
    assert cache_config_from_metrics(without_size)["kv_cache_tokens"] == 512 * 128
    assert cache_config_from_metrics("garbage{") == {"block_size": None, "kv_cache_tokens": None}


TOKEN_DELAY_S = 0.03
REQUESTS = web.AppKey("requests", list)


PREFILL_DELAY_S = 0.1


def fake_vllm(*, cached_tokens=None, short_by=0, stagger=False):
    """An aiohttp app with vLLM 0.32's shapes for a server started with
    ``--skip-tokenizer-init`` (empty text, token ids only with ``return_token_ids``), no
    ``/slomesh/info``, and ``usage.prompt_tokens_details`` null unless ``cached_tokens``.

    Every step makes a token for each running prompt after ``TOKEN_DELAY_S``; with
    ``stagger``, prompt ``i`` is prefilled in step ``i`` (as a busy vLLM hands the prompts of
    a call to its engine one by one), and a step with a prefill takes ``PREFILL_DELAY_S``."""
    requests = []

    async def models(request):
        return web.json_response({"object": "list", "data": [
            {"id": "tiny-llama", "object": "model", "owned_by": "vllm", "root": "/m",
             "parent": None, "max_model_len": 2048}]})  # fmt: skip

    async def metrics(request):
        return web.Response(text=VLLM_METRICS)

    async def completions(request):
        body = await request.json()
        requests.append(body)
        if body.get("model") != "tiny-llama":
            return web.json_response(
                {"error": {"message": "The model does not exist.", "type": "NotFoundError",
                           "param": "model", "code": 404}}, status=404)  # fmt: skip
        prompts, max_tokens = body["prompt"], body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        n_out = max_tokens - short_by
        starts = [i if stagger else 0 for i in range(len(prompts))]
        for step in range(max(starts) + n_out):
            await asyncio.sleep(PREFILL_DELAY_S if stagger and step in starts else TOKEN_DELAY_S)
            for i, prompt in enumerate(prompts):
                token = step - starts[i]
                if not 0 <= token < n_out:
                    continue
                choice = {"index": i, "text": "", "logprobs": None,
                          "finish_reason": "length" if token == n_out - 1 else None,
                          "stop_reason": None}  # fmt: skip
                if body.get("return_token_ids"):
                    choice["token_ids"] = [1000 + token]
                    if token == 0:
                        choice["prompt_token_ids"] = prompt
                await send({"id": "cmpl-1", "object": "text_completion", "created": 0,
                            "model": "tiny-llama", "choices": [choice], "usage": None})  # fmt: skip
        details = None if cached_tokens is None else {"cached_tokens": cached_tokens}
        prompt_total = sum(len(p) for p in prompts)
        await send({"id": "cmpl-1", "object": "text_completion", "created": 0,
                    "model": "tiny-llama", "choices": [],
                    "usage": {"prompt_tokens": prompt_total, "completion_tokens": n_out * len(prompts),
                              "total_tokens": prompt_total + n_out * len(prompts),
                              "prompt_tokens_details": details}})  # fmt: skip
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app[REQUESTS] = requests
    return app


async def serve(app):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_limits_of_a_vllm_server_come_from_models_and_metrics():
    runner, url = await serve(fake_vllm())
    try:
        async with aiohttp.ClientSession() as session:
            limits = await read_server_limits(session, url)
            flagged = await read_server_limits(session, url, max_num_batched_tokens=4096)
    finally:
        await runner.cleanup()
    assert limits == ServerLimits(
        model="tiny-llama", max_model_len=2048, block_size=128, kv_cache_tokens=65536
    )
    assert limits.gpu_type is None and limits.time_scale == 1.0
    assert flagged.max_num_batched_tokens == 4096


async def test_probe_times_each_sequence_of_a_vllm_stream():
    app = fake_vllm()
    runner, url = await serve(app)
    prompts = [[101, 102, 103], [201, 202, 203]]
    try:
        async with aiohttp.ClientSession() as session:
            timings = await run_probe(session, url, "tiny-llama", prompts, max_tokens=5)
            await run_probe(session, url, "tiny-llama", prompts, max_tokens=2, stream_interval=3)
    finally:
        await runner.cleanup()
    (body, chunked) = app[REQUESTS]
    assert body["prompt"] == prompts and body["stream"] and body["ignore_eos"]
    assert body["return_token_ids"] and body["stream_options"] == {"include_usage": True}
    assert "stream_interval" not in body and chunked["stream_interval"] == 3
    assert len(timings) == 2
    for t in timings:
        assert TOKEN_DELAY_S * 0.9 <= t.ttft_s < t.e2e_s
        # 4 token gaps after the first token.
        assert t.e2e_s - t.ttft_s >= 4 * TOKEN_DELAY_S * 0.9
        # One chunk per token, in order, from the first token to the last.
        assert [n for _, n in t.chunks] == [1] * 5
        assert t.chunks[0][0] == t.ttft_s and t.chunks[-1][0] == t.e2e_s
        assert all(a[0] < b[0] for a, b in itertools.pairwise(t.chunks))


async def test_profile_of_a_staggered_server_measures_its_steady_steps():
    # Each call's prompts are prefilled one step after another in 100-ms steps: the steady
    # window leaves those out, where the whole-call TPOT of the first sequence would not.
    app = fake_vllm(stagger=True)
    runner, url = await serve(app)
    sweep = SweepConfig(prompt_tokens=(16, 32), batch_sizes=(1, 3), repeats=1, output_tokens=8)
    try:
        profile = await profile_endpoint(url, sweep, rng=np.random.default_rng(0))
    finally:
        await runner.cleanup()
    # Warm-up: a decode call per batch size at the shortest prompt, then the sweep's points.
    assert [(len(b["prompt"]), len(b["prompt"][0]), b["max_tokens"]) for b in app[REQUESTS]] == [
        (1, 16, 8), (3, 16, 8),
        (1, 16, 1), (3, 16, 1), (1, 32, 1), (3, 32, 1),
        (1, 16, 8), (3, 16, 8), (1, 32, 8), (3, 32, 8),
    ]  # fmt: skip
    assert [(p.prompt_tokens, p.batch_size) for p in profile.decode.points] == [
        (16, 1),
        (16, 3),
        (32, 1),
        (32, 3),
    ]
    for p in profile.decode.points:
        # asyncio.sleep is never early; a late wake-up of the test's host shows in single gaps,
        # not in their median. Whole-call TPOT of the first of 3: (2 * 100 + 5 * 30) / 7 = 50.
        assert 1000 * TOKEN_DELAY_S <= p.tpot_ms < 1000 * TOKEN_DELAY_S + 15, p
        # The window is symmetric (the first to start is the first to finish): mean KV L + T/2.
        assert p.context_tokens == pytest.approx(p.batch_size * (p.prompt_tokens + 8 / 2)), p
        assert p.engine_timed_probes == 0  # its /metrics has no inter-token latencies
    assert profile.sweep_wall_s is not None and profile.sweep_wall_s > 0


@pytest.mark.parametrize(
    ("app", "model", "message"),
    [
        (fake_vllm(cached_tokens=128), "tiny-llama", "reused 128 cached tokens"),
        (fake_vllm(short_by=2), "tiny-llama", "generated 6 tokens"),
        (fake_vllm(), "other-model", "answered 404: The model does not exist."),
    ],
)
async def test_probe_refuses_unusable_answers(app, model, message):
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ProfilingError, match=message):
                await run_probe(session, url, model, [[1, 2, 3], [4, 5, 6]], max_tokens=5)
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------ CLI


def test_cli_registers_profile(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["profile", "--help"])
    assert exc.value.code == 0
    assert "--endpoint" in capsys.readouterr().out
    assert "profile" in cli.build_parser().format_help()


def test_cli_exits_2_on_an_unreachable_endpoint(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    rc = main(["--endpoint", "http://127.0.0.1:9", "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--endpoint", "localhost:8000"],
        ["--endpoint", "http://x", "--batch-sizes", "1,two"],
        ["--endpoint", "http://x", "--output-tokens", "1"],
        ["--endpoint", "http://x", "--holdout-every", "1"],
    ],
)
def test_cli_exits_2_on_bad_arguments(tmp_path, args):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "p.yaml")])
    assert exc.value.code == 2
