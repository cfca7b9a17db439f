"""The agent's online latency fit: its prior, scrape-by-scrape feeding, publication, and its
configuration."""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.region_agent.config import AgentConfig, InstanceConfig, parse_instance
from services.region_agent.scraper import EngineInfo, ScrapedMetrics
from services.region_agent.state import InstanceRuntime
from slomesh.engine.profiles import DEFAULT_MODEL, PROFILES, decode_step_time_s
from slomesh.kv.index import InstanceKvTracker
from slomesh.online_fit import OnlineFitConfig, PublishedStepTimeFit
from slomesh.v1 import state_pb2
from tests.unit.scheduler.test_predictor import fitted_profile


def runtime(gpu_type: str = "L4", profile: str | None = None) -> InstanceRuntime:
    rt = InstanceRuntime(
        config=InstanceConfig("a", "http://a:1", latency_profile=profile),
        gpu_type=gpu_type,
        tracker=InstanceKvTracker("a"),
    )
    rt.info = EngineInfo(
        model=DEFAULT_MODEL.name, block_size=16, num_gpu_blocks=1000, time_scale=2.0
    )
    return rt


def decode_scrape(steps: int, batch: int, step_ms: float, kv_usage: float) -> ScrapedMetrics:
    """Cumulative counters after ``steps`` decode steps of ``batch`` at ``step_ms`` (wall)."""
    return ScrapedMetrics(
        num_requests_running=batch,
        kv_cache_usage=kv_usage,
        inter_token_latency_sum_s=steps * batch * step_ms / 1e3,
        inter_token_latency_count=steps * batch,
        iteration_count=steps,
        block_size=16,
        num_gpu_blocks=1000,
    )


def test_nothing_is_fitted_before_the_engine_info_is_known():
    rt = runtime()
    rt.info = None
    rt.observe_step_times(ScrapedMetrics(), OnlineFitConfig())
    assert rt.latency_fit is None
    assert not rt.to_proto(0, 0, 0).HasField("decode_fit")


def test_scrapes_feed_the_fit_from_the_roofline_prior_and_it_is_published():
    rt = runtime("L4")
    config = OnlineFitConfig()
    rt.observe_step_times(decode_scrape(0, 4, 0.0, 0.25), config)
    fit = rt.latency_fit
    assert fit is not None and fit.prior is not None and fit.prior.source == "roofline:L4"
    # KV capacity 16000 tokens caps the prior's anchors.
    assert fit.prior.decode_features[:, 2].max() == 16_000
    # Before any observation: the roofline's decode step (memory-bound, linear).
    gpu = PROFILES["L4"]
    roofline_ms = decode_step_time_s(gpu, DEFAULT_MODEL, 4, 1000) * 1e3
    assert fit.step_model().decode_step_ms(4, 4000) == pytest.approx(roofline_ms, rel=0.02)
    # 40 scrapes of a 30 % slower instance at batch 4 over 4000 KV tokens; the emulator runs
    # at time_scale 2, so its wall times are twice the modelled ones.
    for k in range(1, 41):
        rt.observe_step_times(decode_scrape(10 * k, 4, 2 * 1.3 * roofline_ms, 0.25), config)
    assert fit.decode.num_observations == 40
    assert fit.step_model().decode_step_ms(4, 4000) == pytest.approx(1.3 * roofline_ms, rel=0.03)
    state = rt.to_proto(0.0, 0.0, 0)
    published = PublishedStepTimeFit.from_pb(state)
    assert published is not None and published.decode_observations == 40
    assert published.model == fit.step_model()
    assert state.prefill_fit.observations == 0 and math.isnan(state.prefill_fit.r2)


def test_a_prefill_in_flight_at_either_scrape_blocks_decode_observations():
    rt = runtime()
    config = OnlineFitConfig()
    rt.observe_step_times(decode_scrape(0, 4, 60.0, 0.25), config)
    h = rt.start_request("r", prompt_tokens=100, cached_prefix_tokens=0, max_tokens=5)
    rt.observe_step_times(decode_scrape(10, 4, 60.0, 0.25), config)
    rt.tokens_received(h, 1)
    rt.observe_step_times(decode_scrape(20, 4, 60.0, 0.25), config)  # in flight at the last
    assert rt.latency_fit.decode.num_observations == 0
    rt.observe_step_times(decode_scrape(30, 4, 60.0, 0.25), config)
    assert rt.latency_fit.decode.num_observations == 1


def test_the_prior_is_the_instance_profile_else_none_for_a_cpu(tmp_path):
    path = str(fitted_profile().save(tmp_path / "p.yaml"))
    rt = runtime("H100", profile=path)
    rt.observe_step_times(ScrapedMetrics(), OnlineFitConfig())
    assert rt.latency_fit.prior.source == f"profile:{path}"
    assert rt.latency_fit.step_model().decode == pytest.approx((7.0, 0.08, 3e-4))
    # A profile of another model: the roofline instead.
    other = str(fitted_profile(model="another/model").save(tmp_path / "o.yaml"))
    rt = runtime("H100", profile=other)
    rt.observe_step_times(ScrapedMetrics(), OnlineFitConfig())
    assert rt.latency_fit.prior.source == "roofline:H100"
    rt = runtime("CPU")
    rt.observe_step_times(ScrapedMetrics(), OnlineFitConfig())
    assert rt.latency_fit is not None and rt.latency_fit.prior is None


def test_the_fit_starts_over_when_the_engine_changes():
    rt = runtime("L4")
    config = OnlineFitConfig()
    for k in range(5):
        rt.observe_step_times(decode_scrape(10 * k, 4, 100.0, 0.25), config)
    first = rt.latency_fit
    assert first.decode.num_observations == 4
    rt.info = EngineInfo(model=DEFAULT_MODEL.name, block_size=16, num_gpu_blocks=2000)
    rt.observe_step_times(decode_scrape(50, 4, 100.0, 0.25), config)
    assert rt.latency_fit is not first and rt.latency_fit.decode.num_observations == 0


def test_profile_key_is_parsed_and_validated(tmp_path):
    path = str(fitted_profile().save(tmp_path / "p.yaml"))
    inst = parse_instance(f"id=a,url=http://127.0.0.1:1,profile={path}")
    assert inst.latency_profile == path
    AgentConfig(region="r", instances=[inst], nats_url="nats://x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match=r"instances\.a\.profile: .*not valid YAML"):
        AgentConfig(
            region="r",
            instances=[InstanceConfig("a", "http://a:1", latency_profile=str(bad))],
            nats_url="nats://x",
        )
    with pytest.raises(ValueError, match=r"instances\.a\.profile: cannot read"):
        AgentConfig(
            region="r",
            instances=[InstanceConfig("a", "http://a:1", latency_profile=str(tmp_path / "no"))],
            nats_url="nats://x",
        )


def test_state_proto_field_numbers_are_26_and_27():
    fields = state_pb2.InstanceState.DESCRIPTOR.fields_by_name
    assert fields["decode_fit"].number == 26 and fields["prefill_fit"].number == 27


def test_only_intervals_whose_requests_were_prefilled_alone_give_prefill_observations():
    rt = runtime("L4")
    config = OnlineFitConfig()
    m = ScrapedMetrics(block_size=16, num_gpu_blocks=1000)
    rt.observe_step_times(m, config)

    def engine_finished(n: int) -> ScrapedMetrics:
        # n requests of 3000 computed prompt tokens, 1.6 s of prefill each (wall; 0.8 s
        # modelled at time_scale 2, the L4 roofline's compute-bound time).
        return dataclasses.replace(
            m,
            request_prefill_time_sum_s=m.request_prefill_time_sum_s + 1.6 * n,
            request_prefill_time_count=m.request_prefill_time_count + n,
            request_prompt_tokens_sum=m.request_prompt_tokens_sum + 3000 * n,
            request_prompt_tokens_count=m.request_prompt_tokens_count + n,
            request_prefill_kv_computed_tokens_sum=m.request_prefill_kv_computed_tokens_sum
            + 3000 * n,
            request_prefill_kv_computed_tokens_count=m.request_prefill_kv_computed_tokens_count + n,
        )

    # Alone: forwarded, first token, finished before the scrape.
    h = rt.start_request("a", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2)
    rt.tokens_received(h, 1)
    rt.finish_request(h)
    m = engine_finished(1)
    rt.observe_step_times(m, config)
    fit = rt.latency_fit
    assert fit.prefill.num_observations == 1
    # Two requests waiting for their first tokens at once: their prompts may share steps.
    hb = rt.start_request("b", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2)
    hc = rt.start_request("c", prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2)
    for handle in (hb, hc):
        rt.tokens_received(handle, 1)
        rt.finish_request(handle)
    m = engine_finished(2)
    rt.observe_step_times(m, config)
    assert fit.prefill.num_observations == 1 and fit.prefill_errors.count == 1
    # One after the other: both alone.
    for rid in ("d", "e"):
        handle = rt.start_request(rid, prompt_tokens=3000, cached_prefix_tokens=0, max_tokens=2)
        rt.tokens_received(handle, 1)
        rt.finish_request(handle)
    m = engine_finished(2)
    rt.observe_step_times(m, config)
    assert fit.prefill.num_observations == 2
    # Published with the comparison against the roofline (the prior's static model).
    state = rt.to_proto(0.0, 0.0, 0)
    assert state.prefill_fit.static_rmse_ms >= 0 and state.prefill_fit.prediction_rmse_ms >= 0
