"""The online latency fit: the estimator on synthetic data with known coefficients, the
observations taken from two /metrics texts, and what the agent publishes and the scheduler
reads back."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from slomesh.engine.profiles import (
    DEFAULT_MODEL,
    PROFILES,
    decode_step_time_s,
    prefill_time_s,
    step_time_s,
)
from slomesh.online_fit import (
    DECODE_TERMS,
    PREFILL_TERMS,
    DecodeObservation,
    InstanceStepTimeFit,
    LinearStepModel,
    OnlineFitConfig,
    OnlineLinearFit,
    PredictionErrors,
    PrefillObservation,
    PublishedStepTimeFit,
    StepTimePrior,
    composed_step_ms,
    step_time_observations,
)
from slomesh.profiling import nonnegative_lstsq
from slomesh.scheduler.predictor import fitted_step_ms, tpot_ms
from slomesh.v1 import state_pb2
from slomesh.vllm_metrics import ScrapedMetrics, parse_vllm_metrics
from tests.unit.scheduler.test_predictor import fitted_profile, inst

TRUE_DECODE = np.array([7.0, 0.05, 5e-5])  # ms, ms per sequence, ms per KV token


def decode_design(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 3)`` decode features: batches 1..64, 100..4000 KV tokens per sequence."""
    batch = rng.integers(1, 65, size=n).astype(float)
    context = batch * rng.uniform(100, 4000, size=n)
    return np.column_stack([np.ones(n), batch, context])


def noisy(rng: np.random.Generator, x: np.ndarray, theta: np.ndarray, rel: float) -> np.ndarray:
    y = x @ theta
    return y * (1 + rel * rng.standard_normal(len(y)))


def feed(fit: OnlineLinearFit, x: np.ndarray, y: np.ndarray) -> None:
    for xi, yi in zip(x, y, strict=True):
        fit.observe(xi, float(yi))


class TestEstimator:
    def test_recovers_known_coefficients_from_noisy_observations(self):
        rng = np.random.default_rng(1)
        fit = OnlineLinearFit(DECODE_TERMS, prior_weight=0.0)
        x = decode_design(rng, 400)
        feed(fit, x, noisy(rng, x, TRUE_DECODE, rel=0.03))
        assert fit.coefficients == pytest.approx(TRUE_DECODE, rel=0.05)
        assert fit.num_observations == 400
        # Memory 1 / (1 - 0.995) = 200 observations; 400 seen: 200 (1 - 0.995^400) = 173.
        assert fit.effective_observations == pytest.approx(200 * (1 - 0.995**400))
        assert fit.r2 > 0.95
        # 3 % noise on steps of ~10-20 ms: an RMS residual well under 1 ms.
        assert 0.1 < fit.rmse_ms < 1.0

    def test_tracks_a_change_of_coefficients_with_forgetting(self):
        rng = np.random.default_rng(2)
        changed = np.array([10.0, 0.2, 2e-5])  # e.g. the GPU is now shared
        forgetting = OnlineLinearFit(DECODE_TERMS, forgetting_factor=0.98, prior_weight=0.0)
        remembering = OnlineLinearFit(DECODE_TERMS, forgetting_factor=1.0, prior_weight=0.0)
        before, after = decode_design(rng, 300), decode_design(rng, 300)
        y_before = noisy(rng, before, TRUE_DECODE, rel=0.02)
        y_after = noisy(rng, after, changed, rel=0.02)
        for fit in (forgetting, remembering):
            feed(fit, before, y_before)
            assert fit.coefficients == pytest.approx(TRUE_DECODE, rel=0.1)
            feed(fit, after, y_after)
        assert forgetting.coefficients == pytest.approx(changed, rel=0.05)
        # Without forgetting the old regime keeps half the weight.
        assert remembering.coefficients != pytest.approx(changed, rel=0.2)

    def test_coefficients_stay_nonnegative_and_are_the_exact_nnls(self):
        rng = np.random.default_rng(3)
        for _ in range(50):
            x = decode_design(rng, 30)
            theta = rng.normal(size=3) * [5.0, 0.1, 1e-4]  # some negative
            y = x @ theta + rng.normal(size=30)
            fit = OnlineLinearFit(DECODE_TERMS, forgetting_factor=1.0, prior_weight=0.0)
            feed(fit, x, y)
            got = fit.coefficients
            assert (got >= 0).all()
            assert got == pytest.approx(nonnegative_lstsq(x, y), rel=1e-6, abs=1e-9)

    def test_a_negative_true_term_is_dropped_and_the_others_refitted(self):
        rng = np.random.default_rng(4)
        x = decode_design(rng, 200)
        y = x @ np.array([8.0, -0.05, 1e-4])  # a "negative cost per sequence"
        fit = OnlineLinearFit(DECODE_TERMS, prior_weight=0.0)
        feed(fit, x, y)
        assert fit.coefficients[1] == 0.0
        assert fit.coefficients.min() >= 0.0

    def test_the_prior_alone_is_the_fit_of_its_anchors(self):
        gpu = PROFILES["H100"]
        prior = StepTimePrior.roofline("H100", max_context_tokens=60_000)
        fit = OnlineLinearFit(
            DECODE_TERMS,
            prior_features=prior.decode_features,
            prior_targets=prior.decode_targets_ms,
        )
        assert fit.num_observations == 0 and fit.r2 is None and fit.rmse_ms is None
        assert fit.coefficients == pytest.approx(
            nonnegative_lstsq(prior.decode_features, prior.decode_targets_ms), rel=1e-6
        )
        # The roofline's decode side is linear (memory-bound): the prior reproduces it.
        roofline_ms = decode_step_time_s(gpu, DEFAULT_MODEL, 8, 1000) * 1e3
        assert fit.predict([1, 8, 8000]) == pytest.approx(roofline_ms, rel=0.02)

    def test_observations_win_where_they_are_and_the_prior_holds_elsewhere(self):
        # The prior says 7 ms + 0.05/sequence; the instance is 30 % slower, and only batch 4
        # is ever observed.
        prior = StepTimePrior.from_model("profile", LinearStepModel((1, 0.01, 0), (7, 0.05, 0)))
        fit = OnlineLinearFit(
            DECODE_TERMS,
            prior_features=prior.decode_features,
            prior_targets=prior.decode_targets_ms,
        )
        for context in np.linspace(1000, 8000, 100):
            fit.observe([1, 4, context], 1.3 * (7 + 0.05 * 4))
        assert fit.predict([1, 4, 4000]) == pytest.approx(1.3 * 7.2, rel=0.03)
        # Far from the data the prior still bounds the fit (no wind-up): finite, positive and
        # between the prior and a 30 % slower instance, give or take.
        far = fit.predict([1, 256, 256 * 2048])
        assert 0.9 * (7 + 0.05 * 256) < far < 1.5 * 1.3 * (7 + 0.05 * 256)

    def test_bad_input_is_refused_and_leaves_the_fit_unchanged(self):
        fit = OnlineLinearFit(PREFILL_TERMS, prior_weight=0.0)
        fit.observe([1, 100, 5050], 10.0)
        before = fit.coefficients
        for features, target, weight in (
            ([1, 100], 10.0, 1.0),
            ([1, 100, math.nan], 10.0, 1.0),
            ([1, 100, 5050], math.inf, 1.0),
            ([1, 100, 5050], 10.0, 0.0),
        ):
            with pytest.raises(ValueError):
                fit.observe(features, target, weight)
        assert fit.num_observations == 1
        assert fit.coefficients == pytest.approx(before)
        with pytest.raises(ValueError, match="forgetting_factor"):
            OnlineLinearFit(DECODE_TERMS, forgetting_factor=0.0)
        with pytest.raises(ValueError, match="prior_weight"):
            OnlineLinearFit(DECODE_TERMS, prior_weight=-1.0)
        with pytest.raises(ValueError, match="prior_features"):
            OnlineLinearFit(DECODE_TERMS, prior_features=np.ones((2, 2)), prior_targets=[1, 2])
        with pytest.raises(ValueError, match="forgetting_factor"):
            OnlineFitConfig(forgetting_factor=1.5)
        with pytest.raises(ValueError, match="min_decode_steps"):
            OnlineFitConfig(min_decode_steps=0)

    def test_r2_is_undefined_without_variation(self):
        fit = OnlineLinearFit(DECODE_TERMS, prior_weight=0.0)
        fit.observe([1, 4, 1000], 7.0)
        assert fit.r2 is None
        fit.observe([1, 4, 1000], 7.0)
        assert fit.r2 is None  # all observations equal
        assert fit.rmse_ms == pytest.approx(0.0, abs=1e-6)


class TestPrior:
    def test_roofline_anchors_time_the_grid_and_respect_the_kv_capacity(self):
        gpu = PROFILES["L4"]
        prior = StepTimePrior.roofline("L4", max_batch_size=32, max_context_tokens=40_000)
        assert prior.source == "roofline:L4"
        batches = prior.decode_features[:, 1]
        assert batches.max() == 32 and batches.min() == 1
        assert prior.decode_features[:, 2].max() == 40_000
        _one, b, context = prior.decode_features[0]
        want = decode_step_time_s(gpu, DEFAULT_MODEL, int(b), context / b) * 1e3
        assert prior.decode_targets_ms[0] == pytest.approx(want)
        # Prefill anchors: [1, n, n (cached + (n + 1) / 2)], timed alone.
        row = prior.prefill_features[-1]
        assert tuple(row) == (1.0, 8192.0, 8192 * (4096 + 8193 / 2))
        assert prior.prefill_targets_ms[-1] == pytest.approx(
            prefill_time_s(gpu, DEFAULT_MODEL, 8192, 4096) * 1e3
        )

    def test_profile_anchors_are_the_profile_and_unknown_gpus_have_none(self):
        profile = fitted_profile()
        prior = StepTimePrior.from_model("profile:x", profile)
        fit = InstanceStepTimeFit(prior, OnlineFitConfig(prior_weight=5.0))
        model = fit.step_model()
        assert model.decode == pytest.approx((7.0, 0.08, 3e-4))
        assert model.prefill == pytest.approx((5.0, 0.05, 2e-5))
        with pytest.raises(ValueError, match="CPU"):
            StepTimePrior.roofline("CPU")


# -- observations from /metrics ------------------------------------------------------------------


def vllm_metrics_text(
    *,
    running: int,
    waiting: int = 0,
    kv_usage: float,
    itl_sum_s: float,
    itl_count: int,
    steps: int,
    ttft_count: int,
    prompt_tokens: int,
    generation_tokens: int,
    prefill_sum_s: float = 0.0,
    finished: int = 0,
    request_prompt_sum: int = 0,
    kv_computed_sum: int | None = 0,
    queries: int = 0,
    hits: int = 0,
) -> str:
    """A vLLM 0.32-style /metrics body (histograms with buckets) with these values."""
    labels = 'engine="0",model_name="m"'

    def histogram(name: str, total: float, count: int) -> str:
        return (
            f"# HELP {name} h\n# TYPE {name} histogram\n"
            f'{name}_bucket{{{labels},le="0.1"}} {count}\n'
            f'{name}_bucket{{{labels},le="+Inf"}} {count}\n'
            f"{name}_sum{{{labels}}} {total}\n{name}_count{{{labels}}} {count}\n"
            f"{name}_created{{{labels}}} 1.7e9\n"
        )

    def counter(name: str, value: float) -> str:
        return f"# HELP {name} c\n# TYPE {name} counter\n{name}_total{{{labels}}} {value}\n"

    def gauge(name: str, value: float) -> str:
        return f"# HELP {name} g\n# TYPE {name} gauge\n{name}{{{labels}}} {value}\n"

    text = (
        gauge("vllm:num_requests_running", running)
        + gauge("vllm:num_requests_waiting", waiting)
        + gauge("vllm:kv_cache_usage_perc", kv_usage)
        + counter("vllm:prefix_cache_queries", queries)
        + counter("vllm:prefix_cache_hits", hits)
        + counter("vllm:prompt_tokens", prompt_tokens)
        + counter("vllm:generation_tokens", generation_tokens)
        + histogram("vllm:inter_token_latency_seconds", itl_sum_s, itl_count)
        + histogram("vllm:time_to_first_token_seconds", 0.05 * ttft_count, ttft_count)
        + histogram("vllm:iteration_tokens_total", generation_tokens, steps)
        + histogram("vllm:request_prefill_time_seconds", prefill_sum_s, finished)
        + histogram("vllm:request_prompt_tokens", request_prompt_sum, finished)
    )
    if kv_computed_sum is not None:
        text += histogram("vllm:request_prefill_kv_computed_tokens", kv_computed_sum, finished)
    return text


BASE = {
    "running": 4,
    "kv_usage": 0.10,
    "itl_sum_s": 2.0,
    "itl_count": 200,
    "steps": 60,
    "ttft_count": 10,
    "prompt_tokens": 9000,
    "generation_tokens": 210,
    "prefill_sum_s": 0.4,
    "finished": 6,
    "request_prompt_sum": 6000,
    "kv_computed_sum": 5000,
    "queries": 9000,
    "hits": 3000,
}


class TestObservationsFromMetrics:
    def test_parses_the_counters_and_histogram_sums(self):
        m = parse_vllm_metrics(vllm_metrics_text(**BASE))
        assert m.inter_token_latency_sum_s == 2.0 and m.inter_token_latency_count == 200
        assert m.iteration_count == 60 and m.iteration_tokens_sum == 210
        assert m.time_to_first_token_count == 10
        assert (m.prompt_tokens_total, m.generation_tokens_total) == (9000, 210)
        assert (m.request_prefill_time_sum_s, m.request_prefill_time_count) == (0.4, 6)
        assert (m.request_prompt_tokens_sum, m.request_prompt_tokens_count) == (6000, 6)
        assert m.request_prefill_kv_computed_tokens_sum == 5000
        assert m.request_prefill_kv_computed_tokens_count == 6

    def test_a_decode_only_interval_gives_the_mean_step_at_the_mean_batch(self):
        # 10 steps of 5 sequences, 50 ITLs summing to 0.5 s; KV 10 % -> 30 % of 16000 tokens.
        prev = parse_vllm_metrics(vllm_metrics_text(**BASE))
        cur = parse_vllm_metrics(
            vllm_metrics_text(
                **{
                    **BASE,
                    "running": 6,
                    "kv_usage": 0.30,
                    "itl_sum_s": 2.5,
                    "itl_count": 250,
                    "steps": 70,
                    "generation_tokens": 260,
                }
            )
        )
        decode, prefill = step_time_observations(prev, cur, kv_capacity_tokens=16_000)
        assert prefill is None  # no request finished
        assert decode is not None
        assert decode.step_ms == pytest.approx(10.0)
        assert decode.batch_size == pytest.approx(5.0)
        assert decode.context_tokens == pytest.approx(0.2 * 16_000)
        assert decode.steps == 10
        assert decode.features == pytest.approx((1.0, 5.0, 3200.0))
        # The emulator at time_scale 2 runs twice as slow as the device it models.
        scaled, _ = step_time_observations(prev, cur, kv_capacity_tokens=16_000, time_scale=2.0)
        assert scaled is not None and scaled.step_ms == pytest.approx(5.0)

    def test_intervals_with_prefill_work_give_no_decode_observation(self):
        prev = parse_vllm_metrics(vllm_metrics_text(**BASE))
        more = {**BASE, "itl_sum_s": 2.5, "itl_count": 250, "steps": 70}
        cases = {
            "a first token": {**more, "ttft_count": 11},
            "prompt tokens": {**more, "prompt_tokens": 9500},
            "a waiting request": {**more, "waiting": 1},
        }
        for case, values in cases.items():
            cur = parse_vllm_metrics(vllm_metrics_text(**values))
            decode, _ = step_time_observations(prev, cur, kv_capacity_tokens=16_000)
            assert decode is None, case
        cur = parse_vllm_metrics(vllm_metrics_text(**more))
        assert step_time_observations(prev, cur, kv_capacity_tokens=16_000)[0] is not None
        decode, _ = step_time_observations(
            prev, cur, kv_capacity_tokens=16_000, prefill_in_flight=True
        )
        assert decode is None
        # Too few steps for the configured minimum.
        decode, _ = step_time_observations(
            prev, cur, kv_capacity_tokens=16_000, min_decode_steps=11
        )
        assert decode is None

    def test_finished_requests_give_a_prefill_observation(self):
        prev = parse_vllm_metrics(vllm_metrics_text(**BASE))
        # 2 requests finished: 0.3 s of prefill, 3000 prompt tokens of which 2000 computed.
        cur = parse_vllm_metrics(
            vllm_metrics_text(
                **{
                    **BASE,
                    "running": 6,
                    "kv_usage": 0.30,
                    "prefill_sum_s": 0.7,
                    "finished": 8,
                    "request_prompt_sum": 9000,
                    "kv_computed_sum": 7000,
                }
            )
        )
        _, prefill = step_time_observations(prev, cur, kv_capacity_tokens=16_000)
        assert prefill == PrefillObservation(
            uncached_tokens=1000.0,
            cached_tokens=500.0,
            decode_seqs=5.0,
            decode_context_tokens=3200.0,
            prefill_ms=pytest.approx(150.0),
            requests=2,
        )
        pairs = 1000 * (500 + 1001 / 2)
        assert prefill.features() == pytest.approx((1.0, 1005.0, pairs + 3200.0))
        # In chunks of 512 tokens: 2 steps, each carrying the 5 decodes over their context.
        assert prefill.features(512) == pytest.approx((2.0, 1010.0, pairs + 6400.0))

    def test_a_prefill_observation_needs_every_finished_request_prefilled_alone(self):
        prev = parse_vllm_metrics(vllm_metrics_text(**BASE))
        # 2 requests finished in the interval.
        cur = parse_vllm_metrics(
            vllm_metrics_text(
                **{
                    **BASE,
                    "prefill_sum_s": 0.7,
                    "finished": 8,
                    "request_prompt_sum": 9000,
                    "kv_computed_sum": 7000,
                }
            )
        )
        for solo, expected in ((None, True), (2, True), (1, False), (0, False)):
            _, prefill = step_time_observations(
                prev, cur, kv_capacity_tokens=16_000, solo_prefills=solo
            )
            assert (prefill is not None) is expected, solo

    def test_without_kv_computed_histogram_the_miss_ratio_estimates_the_uncached_part(self):
        values = {**BASE, "kv_computed_sum": None}
        prev = parse_vllm_metrics(vllm_metrics_text(**values))
        cur = parse_vllm_metrics(
            vllm_metrics_text(
                **{
                    **values,
                    "prefill_sum_s": 0.7,
                    "finished": 8,
                    "request_prompt_sum": 9000,
                    "queries": 13000,
                    "hits": 4000,  # a quarter of the 4000 tokens looked up hit
                }
            )
        )
        _, prefill = step_time_observations(prev, cur, kv_capacity_tokens=16_000)
        assert prefill is not None
        assert prefill.uncached_tokens == pytest.approx(1500 * 0.75)
        assert prefill.cached_tokens == pytest.approx(1500 * 0.25)

    def test_a_restarted_engine_gives_nothing(self):
        prev = parse_vllm_metrics(vllm_metrics_text(**BASE))
        fresh = {k: (0 if isinstance(v, int | float) else v) for k, v in BASE.items()}
        cur = parse_vllm_metrics(vllm_metrics_text(**{**fresh, "running": 1, "kv_usage": 0.1}))
        assert step_time_observations(prev, cur, kv_capacity_tokens=16_000) == (None, None)

    def test_bad_arguments(self):
        m = ScrapedMetrics()
        with pytest.raises(ValueError, match="time_scale"):
            step_time_observations(m, m, kv_capacity_tokens=1, time_scale=0.0)
        with pytest.raises(ValueError, match="kv_capacity_tokens"):
            step_time_observations(m, m, kv_capacity_tokens=-1)
        with pytest.raises(ValueError, match="chunk_tokens"):
            PrefillObservation(1, 0, 0, 0, 1, 1).features(0)


# -- per instance, publication, consumption ------------------------------------------------------


def scrape(itl_sum_s: float, itl_count: int, steps: int, running: int, kv_usage: float):
    return ScrapedMetrics(
        num_requests_running=running,
        kv_cache_usage=kv_usage,
        inter_token_latency_sum_s=itl_sum_s,
        inter_token_latency_count=itl_count,
        iteration_count=steps,
    )


class TestInstanceFit:
    def test_scrapes_feed_the_decode_fit_and_it_is_published(self):
        fit = InstanceStepTimeFit(None, OnlineFitConfig(prior_weight=0.0))
        rng = np.random.default_rng(5)
        itl_sum, itl_count, steps = 0.0, 0, 0
        assert fit.observe(scrape(0, 0, 0, 1, 0.0), kv_capacity_tokens=10_000) == (None, None)
        for _ in range(60):
            batch = int(rng.integers(1, 33))
            usage = float(rng.uniform(0.05, 0.9))
            n_steps = int(rng.integers(3, 12))
            step_s = (TRUE_DECODE @ [1, batch, usage * 10_000]) / 1e3
            itl_sum += n_steps * batch * step_s
            itl_count += n_steps * batch
            steps += n_steps
            fit.observe(scrape(itl_sum, itl_count, steps, batch, usage), kv_capacity_tokens=10_000)
        # The KV usage moves between scrapes, so the interval's mean context is not the one
        # each step saw: the coefficients are close, not exact.
        assert fit.decode.num_observations == 60 and fit.prefill.num_observations == 0
        assert fit.step_model().decode[0] == pytest.approx(7.0, rel=0.1)
        pb = fit.decode_fit_pb()
        assert pb.observations == 60 and len(pb.coefficients) == 3
        assert math.isfinite(pb.r2) and pb.rmse_ms >= 0
        empty = fit.prefill_fit_pb()
        assert empty.observations == 0 and math.isnan(empty.r2) and math.isnan(empty.rmse_ms)

    def test_published_fit_round_trips_and_gates_on_observations(self):
        fit = InstanceStepTimeFit(StepTimePrior.from_model("p", fitted_profile()))
        for i in range(40):
            fit.decode.observe([1, 4, 4000 + 10 * i], 9.0)
        state = state_pb2.InstanceState(instance_id="i")
        state.decode_fit.CopyFrom(fit.decode_fit_pb())
        state.prefill_fit.CopyFrom(fit.prefill_fit_pb())
        published = PublishedStepTimeFit.from_pb(state)
        assert published is not None
        assert published.decode_observations == 40 and published.prefill_observations == 0
        assert published.model == fit.step_model()
        assert published.prefill_r2 is None
        # Decode ready, prefill not: with a static profile, decode online + prefill static.
        static = fitted_profile()
        mixed = published.step_model(30, static)
        assert mixed.decode == fit.step_model().decode
        assert mixed.prefill == LinearStepModel.from_profile(static).prefill
        # Without a static profile, or below the threshold, nothing.
        assert published.step_model(30) is None
        assert published.step_model(41, static) is None
        with pytest.raises(ValueError, match="min_observations"):
            published.step_model(0)

    def test_states_without_or_with_malformed_fits_carry_none(self):
        state = state_pb2.InstanceState(instance_id="i")
        assert PublishedStepTimeFit.from_pb(state) is None
        state.decode_fit.coefficients.extend([1.0, 2.0])  # two coefficients
        state.prefill_fit.coefficients.extend([1.0, 2.0, 3.0])
        assert PublishedStepTimeFit.from_pb(state) is None
        del state.decode_fit.coefficients[:]
        state.decode_fit.coefficients.extend([1.0, -2.0, 3.0])  # negative
        assert PublishedStepTimeFit.from_pb(state) is None

    def test_linear_model_times_like_a_profile(self):
        profile = fitted_profile()
        model = LinearStepModel.from_profile(profile)
        for tokens, pairs in ((0, 0.0), (100, 5050.0), (4096, 8e6)):
            assert model.prefill_step_ms(tokens, pairs) == pytest.approx(
                profile.prefill_step_ms(tokens, pairs)
            )
        for batch, context in ((1, 0.0), (16, 20_000.0)):
            assert model.decode_step_ms(batch, context) == pytest.approx(
                profile.decode_step_ms(batch, context)
            )
        with pytest.raises(ValueError):
            model.decode_step_ms(0, 10.0)
        with pytest.raises(ValueError):
            model.prefill_step_ms(-1, 0.0)
        with pytest.raises(ValueError, match="decode"):
            LinearStepModel((1.0, 1.0, 1.0), (1.0, math.nan, 1.0))


# -- composition, roofline, the guard ----------------------------------------------------------

CAPACITY_TOKENS = 200_000
H100_ROOFLINE = LinearStepModel.from_roofline("H100")


def scaled(model: LinearStepModel, factor: float) -> LinearStepModel:
    return LinearStepModel(
        prefill=tuple(factor * v for v in model.prefill),  # type: ignore[arg-type]
        decode=tuple(factor * v for v in model.decode),  # type: ignore[arg-type]
    )


def feed_engine(
    fit: InstanceStepTimeFit,
    engine: LinearStepModel,
    *,
    intervals: int = 120,
    cobatched_tokens: int = 0,
    solo: bool | None = True,
    seed: int = 0,
) -> None:
    """Feeds ``fit`` scrapes of a synthetic engine whose steps ``engine`` times (composed as
    the predictor composes them, at the batch and context each observation reports): every
    interval holds decode-only steps and one finished request prefilled beside the decodes,
    with ``cobatched_tokens`` of other prompts in its step. ``solo``: the agent's count of
    solo prefills is 1 when the request was alone, 0 when not; ``None``: not tracked."""
    rng = np.random.default_rng(seed)
    m = ScrapedMetrics(num_requests_running=16, kv_cache_usage=0.2)
    fit.observe(m, kv_capacity_tokens=CAPACITY_TOKENS)
    for _ in range(intervals):
        batch = int(rng.integers(4, 49))
        usage = float(rng.uniform(0.05, 0.6))
        context = 0.5 * (m.kv_cache_usage + usage) * CAPACITY_TOKENS
        seqs = 0.5 * (m.num_requests_running + batch)
        steps = int(rng.integers(3, 10))
        step_s = composed_step_ms(engine, 0, 0.0, 0, batch, context) / 1e3
        prompt = int(rng.integers(300, 4000))
        shared = PrefillObservation(prompt + cobatched_tokens, 0, seqs, context, 0.0, 1)
        prefill_s = shared.predicted_ms(engine, 8192) / 1e3
        m = ScrapedMetrics(
            num_requests_running=batch,
            kv_cache_usage=usage,
            inter_token_latency_sum_s=m.inter_token_latency_sum_s + steps * batch * step_s,
            inter_token_latency_count=m.inter_token_latency_count + steps * batch,
            iteration_count=m.iteration_count + steps,
            request_prefill_time_sum_s=m.request_prefill_time_sum_s + prefill_s,
            request_prefill_time_count=m.request_prefill_time_count + 1,
            request_prompt_tokens_sum=m.request_prompt_tokens_sum + prompt,
            request_prompt_tokens_count=m.request_prompt_tokens_count + 1,
            request_prefill_kv_computed_tokens_sum=m.request_prefill_kv_computed_tokens_sum
            + prompt,
            request_prefill_kv_computed_tokens_count=m.request_prefill_kv_computed_tokens_count + 1,
        )
        alone = None if solo is None else int(solo and cobatched_tokens == 0)
        fit.observe(m, kv_capacity_tokens=CAPACITY_TOKENS, solo_prefills=alone)


def published(fit: InstanceStepTimeFit) -> PublishedStepTimeFit:
    state = state_pb2.InstanceState(instance_id="i")
    state.decode_fit.CopyFrom(fit.decode_fit_pb())
    state.prefill_fit.CopyFrom(fit.prefill_fit_pb())
    pub = PublishedStepTimeFit.from_pb(state)
    assert pub is not None
    return pub


class TestCompositionAndRoofline:
    def test_composed_step_ms_is_the_predictors_fitted_step_ms(self):
        rng = np.random.default_rng(3)
        for model in (H100_ROOFLINE, fitted_profile(), LinearStepModel((2, 0.1, 1e-5), (9, 1, 0))):
            for _ in range(50):
                n = int(rng.choice([0, int(rng.integers(1, 9000))]))
                prior = int(rng.integers(0, 5000))
                pairs = n * prior + n * (n + 1) / 2.0
                seqs = int(rng.integers(0 if n else 1, 200))
                context = float(rng.uniform(0, 1e5))
                args = (n, pairs, prior + n, seqs, context)
                assert composed_step_ms(model, *args) == fitted_step_ms(model, *args)
        assert composed_step_ms(H100_ROOFLINE, 0, 0.0, 0, 0, 0.0) == 0.0

    def test_the_roofline_as_a_linear_model_is_the_roofline(self):
        for gpu_type, gpu in PROFILES.items():
            model = LinearStepModel.from_roofline(gpu_type)
            for batch, context in ((1, 100), (32, 64_000), (256, 500_000)):
                roof_ms = step_time_s(
                    gpu, DEFAULT_MODEL, 0, batch, context, attention_pairs=context
                )
                assert composed_step_ms(model, 0, 0, 0, batch, context) == pytest.approx(
                    roof_ms * 1e3, rel=1e-9
                )
            # A chunk beside decodes: exact up to the chunk's own KV writes (< 0.5 % here).
            for n, seqs, context in ((2048, 0, 0), (512, 64, 100_000), (8192, 200, 300_000)):
                pairs = n * (n + 1) / 2.0
                roof_ms = 1e3 * step_time_s(
                    gpu, DEFAULT_MODEL, n, seqs, context + n, attention_pairs=context + pairs
                )
                got = composed_step_ms(model, n, pairs, n, seqs, context)
                assert got == pytest.approx(roof_ms, rel=5e-3)
        assert StepTimePrior.roofline("L4").static_model == LinearStepModel.from_roofline("L4")
        assert StepTimePrior.from_model("p", fitted_profile()).static_model == fitted_profile()
        with pytest.raises(ValueError, match="gpu_type"):
            LinearStepModel.from_roofline("TPU")

    def test_prediction_errors_are_forgetting_weighted_and_checked(self):
        errors = PredictionErrors(0.5)
        assert errors.online_rmse_ms is None and errors.static_rmse_ms is None
        errors.add(10.0, 12.0, 10.0)  # online off by 2, static exact
        errors.add(10.0, 10.0, 13.0)  # then the reverse, weighing twice as much
        assert errors.online_rmse_ms == pytest.approx(math.sqrt(0.5 * 4 / 1.5))
        assert errors.static_rmse_ms == pytest.approx(math.sqrt(9 / 1.5))
        with pytest.raises(ValueError, match="static_ms"):
            errors.add(10.0, 10.0, None)
        with pytest.raises(ValueError, match="finite"):
            errors.add(math.nan, 10.0, 10.0)
        assert errors.count == 2
        without = PredictionErrors()
        without.add(5.0, 6.0, None)
        assert without.online_rmse_ms == pytest.approx(1.0) and without.static_rmse_ms is None
        with pytest.raises(ValueError, match="forgetting_factor"):
            PredictionErrors(0.0)


class TestPrefillObservationsFitted:
    def test_a_memory_bound_prefill_is_compared_but_not_fitted(self):
        fit = InstanceStepTimeFit(StepTimePrior.roofline("H100"), chunk_tokens=8192)
        prev = ScrapedMetrics(num_requests_running=200, kv_cache_usage=0.5)
        fit.observe(prev, kv_capacity_tokens=CAPACITY_TOKENS)
        # A 20-token prompt beside 200 decodes over 100k KV tokens: the step reads the weights
        # and the KV (about 12 ms on an H100), its 220 tokens' FLOPs take 9 ms.
        obs = PrefillObservation(20, 0, 200, 100_000, 0.0, 1)
        step_ms = obs.predicted_ms(H100_ROOFLINE, 8192)
        assert step_ms == pytest.approx(obs.memory_ms(H100_ROOFLINE, 8192))
        cur = dataclasses.replace(
            prev,
            request_prefill_time_sum_s=step_ms / 1e3,
            request_prefill_time_count=1,
            request_prompt_tokens_sum=20,
            request_prompt_tokens_count=1,
        )
        _, folded = fit.observe(cur, kv_capacity_tokens=CAPACITY_TOKENS, solo_prefills=1)
        assert folded is None and fit.prefill.num_observations == 0
        assert fit.prefill_errors.count == 1
        assert fit.prefill_errors.static_rmse_ms == pytest.approx(0.0, abs=1e-9)
        # A 3000-token prompt is compute-bound: fitted.
        nxt = dataclasses.replace(
            cur,
            request_prefill_time_sum_s=cur.request_prefill_time_sum_s + 0.12,
            request_prefill_time_count=2,
            request_prompt_tokens_sum=3020,
            request_prompt_tokens_count=2,
        )
        _, folded = fit.observe(nxt, kv_capacity_tokens=CAPACITY_TOKENS, solo_prefills=1)
        assert folded is not None and fit.prefill.num_observations == 1

    def test_solo_prefills_of_the_roofline_fit_the_roofline(self):
        fit = InstanceStepTimeFit(StepTimePrior.roofline("H100"), chunk_tokens=8192)
        feed_engine(fit, H100_ROOFLINE)
        got, want = fit.step_model().prefill, H100_ROOFLINE.prefill
        assert got[1] == pytest.approx(want[1], rel=0.03)  # per token
        assert got[0] < 3.0  # the step's fixed cost, not the memory side's 7 ms
        # Decode steps timed with both sides composed stay the roofline's.
        for batch, context in ((8, 20_000), (48, 100_000)):
            assert composed_step_ms(fit.step_model(), 0, 0, 0, batch, context) == pytest.approx(
                composed_step_ms(H100_ROOFLINE, 0, 0, 0, batch, context), rel=0.01
            )

    def test_cobatched_prefills_are_left_out_when_the_agent_tracks_them(self):
        fit = InstanceStepTimeFit(StepTimePrior.roofline("H100"), chunk_tokens=8192)
        feed_engine(fit, H100_ROOFLINE, cobatched_tokens=3000, solo=True)
        assert fit.decode.num_observations == 120 and fit.prefill.num_observations == 0


class TestGuard:
    def test_a_fit_better_than_the_static_model_is_used(self):
        # The instance runs 30 % slower than its GPU's roofline says.
        engine = scaled(H100_ROOFLINE, 1.3)
        fit = InstanceStepTimeFit(StepTimePrior.roofline("H100"), chunk_tokens=8192)
        feed_engine(fit, engine)
        pub = published(fit)
        # One-step-ahead errors: the first observations, before the fit moved, still count.
        assert pub.decode_prediction_rmse_ms < 0.25 * pub.decode_static_rmse_ms
        assert pub.prefill_prediction_rmse_ms < 0.25 * pub.prefill_static_rmse_ms
        assert pub.beats_static("decode") and pub.beats_static("prefill")
        assert pub.step_model(30) == fit.step_model()
        # The predictor times the instance by it: TPOT 30 % over the roofline's.
        roofline = tpot_ms(inst("H100", num_requests_running=20, kv_cache_usage=0.1), 500, 100)
        online = tpot_ms(
            inst("H100", num_requests_running=20, kv_cache_usage=0.1, online_fit=pub), 500, 100
        )
        assert online[0] == pytest.approx(1.3 * roofline[0], rel=0.02)

    def test_a_fit_worse_than_the_static_model_is_not_used(self):
        # The engine is the roofline (the simulator's case) and the agent does not track solo
        # prefills: every prompt shared its step with 3000 tokens of others, which the prefill
        # intercept absorbs; as the compute side of a decode step it then times decode steps
        # several times too slow, though the decode model alone fits them.
        fit = InstanceStepTimeFit(StepTimePrior.roofline("H100"), chunk_tokens=8192)
        feed_engine(fit, H100_ROOFLINE, cobatched_tokens=3000, solo=None)
        model = fit.step_model()
        assert model.prefill[0] > 30.0
        obs = DecodeObservation(batch_size=16, context_tokens=40_000, step_ms=0.0, steps=1)
        assert obs.predicted_ms(model) > 3 * obs.predicted_ms(H100_ROOFLINE)
        assert fit.decode.rmse_ms < 0.05  # ms: the decode model alone is right
        pub = published(fit)
        assert pub.decode_prediction_rmse_ms > 10 * pub.decode_static_rmse_ms
        assert not pub.beats_static("decode")
        # Not used, even beside a static profile for the other side.
        assert pub.step_model(30) is None and pub.step_model(30, fitted_profile()) is None
        state = inst("H100", num_requests_running=20, kv_cache_usage=0.1)
        with_fit = inst("H100", num_requests_running=20, kv_cache_usage=0.1, online_fit=pub)
        assert tpot_ms(with_fit, 500, 100) == tpot_ms(state, 500, 100)

    def test_a_fit_without_a_static_model_to_compare_is_used_and_one_without_the_comparison_not(
        self,
    ):
        fit = InstanceStepTimeFit(None, chunk_tokens=8192)  # e.g. a CPU instance
        feed_engine(fit, H100_ROOFLINE, intervals=40)
        pub = published(fit)
        assert pub.decode_static_rmse_ms is None and pub.prefill_static_rmse_ms is None
        assert pub.step_model(30) == fit.step_model()
        # Published by an agent that predates the comparison: both RMSEs unset (0).
        state = state_pb2.InstanceState(instance_id="i")
        for field, coefficients in (("decode_fit", (7, 0, 1e-4)), ("prefill_fit", (1, 0.03, 0))):
            getattr(state, field).CopyFrom(
                state_pb2.OnlineLatencyFit(coefficients=coefficients, observations=100)
            )
        old = PublishedStepTimeFit.from_pb(state)
        assert old is not None and old.step_model(30) is None
        with pytest.raises(ValueError, match="side"):
            old.beats_static("both")
