"""Tests of the region agent's vLLM /metrics parsing."""

from __future__ import annotations

import pytest

from services.region_agent.scraper import MetricsParseError, parse_vllm_metrics

VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",cache_dtype="auto",num_gpu_blocks="2048",prefix_caching_hash_algo="sha256"} 1.0
"""


def test_parses_vllm_v1_names():
    m = parse_vllm_metrics(VLLM_V1)
    assert (m.num_requests_running, m.num_requests_waiting) == (3, 7)
    assert m.kv_cache_usage == pytest.approx(0.25)
    assert (m.prefix_cache_queries_total, m.prefix_cache_hits_total) == (1200, 300)
    assert (m.block_size, m.num_gpu_blocks) == (128, 2048)


def test_counters_without_total_suffix_and_v0_names_and_multiple_engines():
    text = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0"} 2
vllm:num_requests_running{engine="1"} 5
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0"} 0.5
vllm:gpu_cache_usage_perc{engine="1"} 0.75
# TYPE vllm:gpu_prefix_cache_queries untyped
vllm:gpu_prefix_cache_queries 10
# TYPE vllm:gpu_prefix_cache_hits untyped
vllm:gpu_prefix_cache_hits 4
"""
    m = parse_vllm_metrics(text)
    assert m.num_requests_running == 7
    assert m.kv_cache_usage == pytest.approx(0.75)
    assert (m.prefix_cache_queries_total, m.prefix_cache_hits_total) == (10, 4)
    assert m.block_size is None and m.num_gpu_blocks is None


def test_missing_metrics_default_to_zero():
    m = parse_vllm_metrics("# nothing here\n")
    assert (m.num_requests_running, m.num_requests_waiting, m.kv_cache_usage) == (0, 0, 0.0)


def test_garbage_raises():
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics("vllm:num_requests_running{engine=0 not metrics\n")


def test_other_families_are_ignored_even_with_similar_names():
    noise = """\
# HELP vllm:time_to_first_token_seconds Histogram of TTFT.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{model_name="m"} 4.0
# HELP vllm:num_requests_waiting_by_reason Waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{reason="capacity",model_name="m"} 99.0
"""
    m = parse_vllm_metrics(noise + VLLM_V1)
    assert (m.num_requests_running, m.num_requests_waiting) == (3, 7)
    assert (m.prefix_cache_queries_total, m.block_size) == (1200, 128)
