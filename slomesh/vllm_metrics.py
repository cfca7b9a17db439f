"""Parsing vLLM's Prometheus ``/metrics``: the load and KV-cache facts slomesh reads.

Metric names follow vLLM V1 (`vllm/v1/metrics/loggers.py`). Counters are matched with or without
their `_total` suffix, and the V0 names (`vllm:gpu_cache_usage_perc`,
`vllm:gpu_prefix_cache_queries`, ...) are accepted too. Samples of one metric with several label
sets (model names, DP engines) are summed; the KV cache usage takes the maximum. Used by the
region agent's 10 Hz scrape and by ``slomesh profile``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MetricsParseError", "ScrapedMetrics", "parse_vllm_metrics"]

_RUNNING = ("vllm:num_requests_running",)
_WAITING = ("vllm:num_requests_waiting",)
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
_PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
_CACHE_CONFIG = ("vllm:cache_config_info", "vllm:cache_config")
# Counters and histogram sums/counts of the online latency fit (`slomesh.online_fit`), by sample
# name (vLLM 0.32 names; counters also without `_total`) -> ScrapedMetrics field.
_STEP_TIME_SAMPLES = {
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:generation_tokens": "generation_tokens_total",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:prompt_tokens": "prompt_tokens_total",
    "vllm:time_to_first_token_seconds_count": "time_to_first_token_count",
    "vllm:inter_token_latency_seconds_sum": "inter_token_latency_sum_s",
    "vllm:inter_token_latency_seconds_count": "inter_token_latency_count",
    "vllm:iteration_tokens_total_sum": "iteration_tokens_sum",
    "vllm:iteration_tokens_total_count": "iteration_count",
    "vllm:request_prefill_time_seconds_sum": "request_prefill_time_sum_s",
    "vllm:request_prefill_time_seconds_count": "request_prefill_time_count",
    "vllm:request_prompt_tokens_sum": "request_prompt_tokens_sum",
    "vllm:request_prompt_tokens_count": "request_prompt_tokens_count",
    "vllm:request_prefill_kv_computed_tokens_sum": "request_prefill_kv_computed_tokens_sum",
    "vllm:request_prefill_kv_computed_tokens_count": "request_prefill_kv_computed_tokens_count",
}
_STEP_TIME_FAMILIES = (
    "vllm:generation_tokens",
    "vllm:prompt_tokens",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:iteration_tokens_total",
    "vllm:request_prefill_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_prefill_kv_computed_tokens",
)


# Every metric name the agent reads; lines of other families (histogram buckets make up most of
# a vLLM /metrics body) are dropped before parsing, which keeps a 10 Hz scrape cheap.
_WANTED_PREFIXES = tuple(
    sorted(
        {
            *_RUNNING,
            *_WAITING,
            *_KV_USAGE,
            *_PREFIX_QUERIES,
            *_PREFIX_HITS,
            *_CACHE_CONFIG,
            *_STEP_TIME_FAMILIES,
        }
    )
)


def _wanted_lines(text: str) -> str:
    """The lines of `text` (samples and their # HELP/# TYPE) that belong to wanted families;
    histogram buckets are dropped (only their sums and counts are read)."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[2].startswith(_WANTED_PREFIXES):
                keep.append(line)
        elif line.startswith(_WANTED_PREFIXES):
            name_end = min(i for i in (line.find("{"), line.find(" "), len(line)) if i >= 0)
            if not line.endswith("_bucket", 0, name_end):
                keep.append(line)
    return "\n".join(keep) + "\n"


class MetricsParseError(ValueError):
    """The `/metrics` body is not Prometheus text exposition format."""


@dataclass
class ScrapedMetrics:
    """vLLM metrics of one instance at one scrape.

    Attributes:
        num_requests_running: requests in the engine's running batch.
        num_requests_waiting: requests queued in the engine.
        kv_cache_usage: fraction of KV blocks in use, [0, 1].
        prefix_cache_queries_total: prompt tokens looked up in the prefix cache (counter).
        prefix_cache_hits_total: of those, tokens found (counter).
        block_size: tokens per KV block from `vllm:cache_config_info`, None if absent.
        num_gpu_blocks: KV blocks of the engine from `vllm:cache_config_info`, None if absent.
        generation_tokens_total: output tokens generated (`vllm:generation_tokens`, counter).
        prompt_tokens_total: prompt tokens of prefills completed (`vllm:prompt_tokens`).
        time_to_first_token_count: first tokens emitted (`vllm:time_to_first_token_seconds`
            count).
        inter_token_latency_sum_s: sum of inter-token latencies, seconds
            (`vllm:inter_token_latency_seconds`).
        inter_token_latency_count: their number.
        iteration_tokens_sum: tokens of the engine steps recorded
            (`vllm:iteration_tokens_total` sum).
        iteration_count: engine steps recorded (its count).
        request_prefill_time_sum_s: prefill time (first scheduled to first token) of the
            finished requests, seconds (`vllm:request_prefill_time_seconds`).
        request_prefill_time_count: their number.
        request_prompt_tokens_sum: prompt tokens of the finished requests
            (`vllm:request_prompt_tokens`).
        request_prompt_tokens_count: their number.
        request_prefill_kv_computed_tokens_sum: prompt tokens the finished requests computed
            (not found in a cache; `vllm:request_prefill_kv_computed_tokens`).
        request_prefill_kv_computed_tokens_count: their number (0 when the engine does not
            export it).

    The counters and histogram sums/counts are cumulative since the engine started
    (`slomesh.online_fit.step_time_observations` takes their deltas).
    """

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    generation_tokens_total: float = 0.0
    prompt_tokens_total: float = 0.0
    time_to_first_token_count: float = 0.0
    inter_token_latency_sum_s: float = 0.0
    inter_token_latency_count: float = 0.0
    iteration_tokens_sum: float = 0.0
    iteration_count: float = 0.0
    request_prefill_time_sum_s: float = 0.0
    request_prefill_time_count: float = 0.0
    request_prompt_tokens_sum: float = 0.0
    request_prompt_tokens_count: float = 0.0
    request_prefill_kv_computed_tokens_sum: float = 0.0
    request_prefill_kv_computed_tokens_count: float = 0.0


def _base_name(sample_name: str) -> str:
    for suffix in ("_total", "_created"):
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


def _int_label(labels: dict[str, str], name: str) -> int | None:
    value = labels.get(name)
    if value is None or value in ("", "None"):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def parse_vllm_metrics(text: str) -> ScrapedMetrics:
    """Parses a vLLM `/metrics` body.

    Args:
        text: Prometheus text exposition format.

    Returns:
        The metrics the agent uses; absent metrics keep their defaults (0 / None).

    Raises:
        MetricsParseError: the text cannot be parsed.
    """
    out = ScrapedMetrics()
    running = waiting = queries = hits = 0.0
    usage: float | None = None
    step_times: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(_wanted_lines(text)))
    except (ValueError, TypeError) as exc:
        raise MetricsParseError(f"invalid Prometheus exposition text: {exc}") from None
    for family in families:
        for sample in family.samples:
            name = sample.name
            if name.endswith("_created"):
                continue
            base = _base_name(name)
            if name in _CACHE_CONFIG or base in _CACHE_CONFIG:
                block_size = _int_label(sample.labels, "block_size")
                num_blocks = _int_label(sample.labels, "num_gpu_blocks")
                if block_size:
                    out.block_size = block_size
                if num_blocks:
                    out.num_gpu_blocks = num_blocks
            elif name in _RUNNING:
                running += sample.value
            elif name in _WAITING:
                waiting += sample.value
            elif name in _KV_USAGE:
                usage = sample.value if usage is None else max(usage, sample.value)
            elif base in _PREFIX_QUERIES:
                queries += sample.value
            elif base in _PREFIX_HITS:
                hits += sample.value
            elif (field := _STEP_TIME_SAMPLES.get(name)) is not None:
                step_times[field] = step_times.get(field, 0.0) + sample.value
    out.num_requests_running = int(running)
    out.num_requests_waiting = int(waiting)
    out.kv_cache_usage = min(max(usage or 0.0, 0.0), 1.0)
    out.prefix_cache_queries_total = int(queries)
    out.prefix_cache_hits_total = int(hits)
    for field, value in step_times.items():
        setattr(out, field, value)
    return out
