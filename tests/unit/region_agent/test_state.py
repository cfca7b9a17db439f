"""Tests of the agent's per-instance accounting and health tracking."""

from __future__ import annotations

import pytest

from services.region_agent.config import InstanceConfig
from services.region_agent.scraper import EngineInfo, ScrapedMetrics
from services.region_agent.state import Ewma, InstanceRuntime
from slomesh.kv.index import InstanceKvTracker


def runtime():
    return InstanceRuntime(
        config=InstanceConfig("a", "http://a:1"), gpu_type="L4", tracker=InstanceKvTracker("a")
    )


def test_queued_tokens_follow_forwarded_requests():
    rt = runtime()
    h1 = rt.start_request("r1", prompt_tokens=1000, cached_prefix_tokens=256, max_tokens=50)
    h2 = rt.start_request("r2", prompt_tokens=100, cached_prefix_tokens=0, max_tokens=10)
    assert rt.queued_prefill_tokens == 744 + 100
    assert rt.queued_decode_tokens == 0
    rt.tokens_received(h1, 1)
    assert rt.queued_prefill_tokens == 100
    assert rt.queued_decode_tokens == 49
    rt.tokens_received(h1, 9)
    assert rt.queued_decode_tokens == 40
    rt.finish_request(h1)
    rt.finish_request(h2)
    assert (rt.queued_prefill_tokens, rt.queued_decode_tokens, len(rt.outstanding)) == (0, 0, 0)
    rt.finish_request(h2)  # idempotent


def test_prefill_throughput_from_first_token_time():
    rt = runtime()
    h = rt.start_request("r", prompt_tokens=2000, cached_prefix_tokens=1000, max_tokens=5)
    sent = rt.outstanding[h].sent_monotonic
    rt.tokens_received(h, 1, now_monotonic=sent + 0.5)
    assert rt.prefill_tps.value == pytest.approx(2000.0)


def test_decode_throughput_sampled_only_while_busy():
    rt = runtime()
    rt.tick(now_monotonic=100.0)
    h = rt.start_request("r", prompt_tokens=10, cached_prefix_tokens=0, max_tokens=100)
    rt.tokens_received(h, 1, now_monotonic=100.05)
    rt.tick(now_monotonic=100.1)  # running now, but not at the previous tick: no sample
    assert rt.decode_tps.value is None
    rt.tokens_received(h, 20, now_monotonic=100.15)
    rt.tick(now_monotonic=100.2)
    assert rt.decode_tps.value == pytest.approx(200.0)
    rt.finish_request(h)
    rt.tick(now_monotonic=100.3)
    rt.tick(now_monotonic=100.4)
    assert rt.decode_tps.value == pytest.approx(200.0)  # idle keeps the last estimate


def test_health_needs_consecutive_failures():
    rt = runtime()
    assert not rt.healthy
    assert rt.probe_result(True, 3) and rt.healthy
    assert not rt.probe_result(False, 3)
    assert not rt.probe_result(False, 3) and rt.healthy
    assert rt.probe_result(False, 3) and not rt.healthy
    assert rt.probe_result(True, 3) and rt.healthy


def test_ewma():
    e = Ewma(0.5)
    assert e.update(10) == 10
    assert e.update(20) == 15
    with pytest.raises(ValueError, match="alpha"):
        Ewma(0)


def test_to_proto_carries_scraped_and_accounted_values():
    rt = runtime()
    rt.healthy = True
    rt.info = EngineInfo(model="m", max_model_len=4096)
    rt.scraped = ScrapedMetrics(
        num_requests_running=2,
        num_requests_waiting=1,
        kv_cache_usage=0.4,
        prefix_cache_queries_total=100,
        prefix_cache_hits_total=40,
        block_size=16,
        num_gpu_blocks=999,
    )
    rt.start_request("r", prompt_tokens=64, cached_prefix_tokens=16, max_tokens=8)
    s = rt.to_proto(1.5, 0.5, num_indexed_blocks=12)
    assert (s.instance_id, s.gpu_type, s.model, s.healthy) == ("a", "L4", "m", True)
    assert (s.num_requests_running, s.num_requests_waiting) == (2, 1)
    assert s.kv_cache_usage == pytest.approx(0.4)
    assert (s.queued_prefill_tokens, s.num_requests_outstanding) == (48, 1)
    assert (s.block_size, s.num_gpu_blocks, s.max_model_len) == (16, 999, 4096)
    assert (s.price_usd_per_hour, s.spot_price_usd_per_hour) == (1.5, 0.5)
    assert (s.prefix_cache_queries_total, s.prefix_cache_hits_total) == (100, 40)
    assert s.num_indexed_blocks == 12
