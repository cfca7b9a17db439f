"""The predictor times an instance by its agent's online fit once it rests on enough
observations, and the view carries the fit from the published state."""

from __future__ import annotations

import dataclasses

import pytest

from slomesh.online_fit import LinearStepModel, PublishedStepTimeFit
from slomesh.scheduler.predictor import PredictorConfig, predict, prefill_ms, tpot_ms
from slomesh.scheduler.view import ClusterView
from slomesh.v1 import state_pb2
from tests.unit.scheduler.factories import make_instance, make_state
from tests.unit.scheduler.test_predictor import fitted_profile, inst

# prefill_step_ms = 2 + 0.1 * batch_tokens + 1e-5 * pairs; decode_step_ms = 20 + 0.5 * B + 1e-3 * C
ONLINE = LinearStepModel(prefill=(2.0, 0.1, 1e-5), decode=(20.0, 0.5, 1e-3))


def online(decode_obs: int = 50, prefill_obs: int = 50) -> PublishedStepTimeFit:
    return PublishedStepTimeFit(
        model=ONLINE, decode_observations=decode_obs, prefill_observations=prefill_obs
    )


def test_an_online_fit_with_enough_observations_times_the_steps():
    i = inst("H100", online_fit=online())
    config = PredictorConfig(online_fit_min_observations=30)
    # TPOT: batch 0 + 0 + 1 over a 100-token prompt and half of 64 output tokens.
    tpot, batch, _ = tpot_ms(i, 100, 64, config)
    assert batch == 1
    assert tpot == pytest.approx(20 + 0.5 + 1e-3 * 132)
    # One 100-token step alone: compute side 2 + 0.1 * 100 + 1e-5 * 5050 (memory side smaller).
    assert prefill_ms(i, 100, 0, config) == pytest.approx(max(2 + 10 + 0.0505, 20 + 0.5 + 0.1))


def test_too_few_observations_or_the_knob_at_0_keep_the_roofline():
    roofline = inst("H100")
    baseline = predict(roofline, rtt_ms=0, prompt_tokens=500, cached_prefix_tokens=0,
                       output_tokens=50)  # fmt: skip
    for fit, config in (
        (online(decode_obs=29), PredictorConfig(online_fit_min_observations=30)),
        (online(prefill_obs=29), PredictorConfig(online_fit_min_observations=30)),
        (online(), PredictorConfig(online_fit_min_observations=0)),
    ):
        got = predict(inst("H100", online_fit=fit), rtt_ms=0, prompt_tokens=500,
                      cached_prefix_tokens=0, output_tokens=50, config=config)  # fmt: skip
        assert got.tpot_ms == pytest.approx(baseline.tpot_ms)
        assert got.ttft_ms == pytest.approx(baseline.ttft_ms)


def test_a_ready_side_overrides_the_static_profile_and_the_other_side_keeps_it(tmp_path):
    path = str(fitted_profile().save(tmp_path / "h100.yaml"))
    config = PredictorConfig(latency_profiles={"H100": path}, online_fit_min_observations=30)
    i = inst("H100", online_fit=online(decode_obs=40, prefill_obs=3))
    tpot, _, _ = tpot_ms(i, 100, 64, config)
    assert tpot == pytest.approx(20 + 0.5 + 1e-3 * 132)  # online decode
    # Prefill from the profile's compute side (5 + 0.05 * 100 + 2e-5 * 5050) against the
    # online decode side as the memory side (20 + 0.5 * 1 + 1e-3 * 100): the max.
    assert prefill_ms(i, 100, 0, config) == pytest.approx(max(5 + 5 + 0.101, 20.5 + 0.1))
    static = inst("H100")
    assert tpot_ms(static, 100, 64, config)[0] == pytest.approx(7 + 0.08 + 3e-4 * 132)


def test_a_fit_is_used_only_where_it_predicts_better_than_the_static_model(tmp_path):
    config = PredictorConfig(online_fit_min_observations=30)
    better = dataclasses.replace(
        online(),
        decode_prediction_rmse_ms=0.5,
        decode_static_rmse_ms=2.0,
        prefill_prediction_rmse_ms=1.0,
        prefill_static_rmse_ms=3.0,
    )
    assert tpot_ms(inst("H100", online_fit=better), 100, 64, config)[0] == pytest.approx(
        20 + 0.5 + 1e-3 * 132
    )
    roofline = tpot_ms(inst("H100"), 100, 64, config)[0]
    for worse in (
        dataclasses.replace(better, prefill_prediction_rmse_ms=3.5),
        dataclasses.replace(better, decode_prediction_rmse_ms=2.0),  # a tie is not better
    ):
        assert tpot_ms(inst("H100", online_fit=worse), 100, 64, config)[0] == roofline
    # A worse side with enough observations discards the whole fit, even beside a static
    # profile: the profile times both sides.
    path = str(fitted_profile().save(tmp_path / "h100.yaml"))
    profiled = PredictorConfig(latency_profiles={"H100": path}, online_fit_min_observations=30)
    worse = dataclasses.replace(better, prefill_prediction_rmse_ms=3.5)
    assert tpot_ms(inst("H100", online_fit=worse), 100, 64, profiled)[0] == pytest.approx(
        7 + 0.08 + 3e-4 * 132
    )


def test_a_cpu_instance_with_an_online_fit_uses_it_over_its_throughputs():
    config = PredictorConfig()
    measured = inst("CPU", prefill_tokens_per_s=1000.0, decode_tokens_per_s=10.0)
    assert prefill_ms(measured, 100, 0, config) == pytest.approx(100.0)
    fitted = inst("CPU", prefill_tokens_per_s=1000.0, decode_tokens_per_s=10.0,
                  online_fit=online())  # fmt: skip
    assert prefill_ms(fitted, 100, 0, config) == pytest.approx(20.6)
    assert tpot_ms(fitted, 100, 64, config)[0] == pytest.approx(20.5 + 0.132)


def test_the_view_carries_the_published_fit():
    view = ClusterView(clock_ns=lambda: 0)
    with_fit = make_instance("a")
    with_fit.decode_fit.CopyFrom(
        state_pb2.OnlineLatencyFit(coefficients=ONLINE.decode, observations=45, r2=0.9)
    )
    with_fit.prefill_fit.CopyFrom(
        state_pb2.OnlineLatencyFit(coefficients=ONLINE.prefill, observations=12, r2=float("nan"))
    )
    view.apply_state(make_state("tokyo", [with_fit, make_instance("b")]))
    by_id = {v.instance_id: v for v in view.instances()}
    fit = by_id["a"].online_fit
    assert fit is not None and fit.model == ONLINE
    assert (fit.decode_observations, fit.prefill_observations) == (45, 12)
    assert fit.decode_r2 == pytest.approx(0.9) and fit.prefill_r2 is None
    assert by_id["b"].online_fit is None
    # The next state replaces it.
    view.apply_state(make_state("tokyo", [make_instance("a")], seq=2))
    assert view.instances()[0].online_fit is None


def test_the_knob_is_validated():
    with pytest.raises(ValueError, match="online_fit_min_observations"):
        PredictorConfig(online_fit_min_observations=-1)
    with pytest.raises(TypeError, match="online_fit_min_observations"):
        PredictorConfig(online_fit_min_observations=2.5)
