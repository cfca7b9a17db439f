"""Prometheus metrics of one emulator, with vLLM V1's names, labels and buckets.

Every metric carries ``model_name`` and ``engine="0"`` like vLLM's; ``vllm:cache_config_info`` is
a gauge set to 1 whose labels describe the cache (vLLM emulates an Info metric that way). The
emulator's own metrics are prefixed ``slomesh_emulator_``. Each emulator owns a
``CollectorRegistry`` so several can live in one process.

Source: vLLM ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slomesh.engine.model import EngineStats, RequestMetrics

TTFT_BUCKETS_S = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
ITL_BUCKETS_S = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
REQUEST_LATENCY_BUCKETS_S = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
LAG_BUCKETS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            value = m * scale
            if value > max_value:
                return buckets
            buckets.append(value)
        scale *= 10


class EmulatorMetrics:
    """The emulator's metric set, fed from engine stats and finished-request metrics.

    Args:
        model_name: ``model_name`` label (the served model name).
        max_model_len: Top of the token-count buckets.
        cache_info: Labels of ``vllm:cache_config_info`` (``engine`` is added).
        emulator_info: Labels of ``slomesh_emulator_info`` (gpu type, instance id, ...).
    """

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        cache_info: dict[str, str],
        emulator_info: dict[str, str],
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        labels = ["model_name", "engine"]
        values = (model_name, "0")

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(*values)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(*values)

        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage_perc = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            labels + ["source"],
            registry=reg,
        )
        self.prompt_tokens_local_compute = by_source.labels(*values, "local_compute")
        self.prompt_tokens_local_cache_hit = by_source.labels(*values, "local_cache_hit")
        self.prompt_tokens_external = by_source.labels(*values, "external_kv_transfer")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=reg,
        )
        self._success = {
            reason: success.labels(*values, reason) for reason in ("stop", "length", "abort")
        }
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            token_buckets,
        )
        self.request_max_tokens = histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            token_buckets,
        )
        self.request_prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            token_buckets,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S,
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS_S,
        )
        self.time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS_S,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        cache_labels = dict(cache_info)
        cache_labels["engine"] = "0"
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(cache_labels),
            registry=reg,
        ).labels(**cache_labels).set(1)

        # Emulator-only metrics.
        self._info = Gauge(
            "slomesh_emulator_info",
            "Static facts about this emulator (value 1).",
            list(emulator_info),
            registry=reg,
        )
        self._info_labels: dict[str, str] = {}
        self.set_info(emulator_info)
        self.lag_seconds = Histogram(
            "slomesh_emulator_lag_seconds",
            "Wall-clock lateness of engine-step deliveries behind their deadlines.",
            buckets=LAG_BUCKETS_S,
            registry=reg,
        )
        self.lag_resyncs = Counter(
            "slomesh_emulator_lag_resyncs",
            "Times the step clock was re-based because delivery fell far behind.",
            registry=reg,
        )
        self.steps = Counter("slomesh_emulator_steps", "Engine steps executed.", registry=reg)
        self.busy_seconds = Counter(
            "slomesh_emulator_busy_seconds", "Modelled GPU busy time in seconds.", registry=reg
        )
        self.kv_events_published = Counter(
            "slomesh_emulator_kv_event_messages",
            "KV-event ZMQ messages published.",
            registry=reg,
        )
        self.queued_prefill_tokens = Gauge(
            "slomesh_emulator_queued_prefill_tokens",
            "Prompt tokens not yet prefilled (waiting and running requests).",
            registry=reg,
        )
        self.remaining_decode_tokens = Gauge(
            "slomesh_emulator_remaining_decode_tokens",
            "Output tokens live requests still have to generate.",
            registry=reg,
        )
        self._last: EngineStats | None = None

    def set_info(self, labels: dict[str, str]) -> None:
        """Replace the labels of ``slomesh_emulator_info`` (same label names as at creation)."""
        if self._info_labels:
            self._info.remove(*self._info_labels.values())
        self._info_labels = dict(labels)
        self._info.labels(**labels).set(1)

    def update_engine(self, stats: EngineStats) -> None:
        """Set gauges and advance counters to the engine's cumulative values."""
        self.num_requests_running.set(stats.num_requests_running)
        self.num_requests_waiting.set(stats.num_requests_waiting)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        self.queued_prefill_tokens.set(stats.waiting_prefill_tokens + stats.running_prefill_tokens)
        self.remaining_decode_tokens.set(stats.remaining_decode_tokens)
        last = self._last
        pairs = (
            (self.prefix_cache_queries, "prefix_cache_queries_tokens"),
            (self.prefix_cache_hits, "prefix_cache_hits_tokens"),
            (self.num_preemptions, "num_preemptions_total"),
            (self.prompt_tokens, "prompt_tokens_total"),
            (self.prompt_tokens_local_compute, "prompt_tokens_local_compute"),
            (self.prompt_tokens_local_cache_hit, "prompt_tokens_local_cache_hit"),
            (self.prompt_tokens_external, "prompt_tokens_external_kv_transfer"),
            (self.generation_tokens, "generation_tokens_total"),
            (self.steps, "num_steps"),
            (self.busy_seconds, "busy_time_s"),
        )
        for metric, name in pairs:
            delta = getattr(stats, name) - (getattr(last, name) if last is not None else 0)
            if delta > 0:
                metric.inc(delta)
        self._last = stats

    def observe_finished(self, m: RequestMetrics, time_scale: float, max_tokens: int) -> None:
        """Record a finished or aborted request (times scaled to wall seconds)."""
        self._success.get(m.finish_reason, self._success["abort"]).inc()
        self.e2e_request_latency.observe(m.e2e_time_s * time_scale)
        self.request_prompt_tokens.observe(m.num_prompt_tokens)
        self.request_generation_tokens.observe(m.num_output_tokens)
        self.request_max_tokens.observe(max_tokens)
        self.request_prefill_kv_computed.observe(m.num_prompt_tokens - max(m.num_cached_tokens, 0))
        for metric, value in (
            (self.request_queue_time, m.queue_time_s),
            (self.request_inference_time, m.inference_time_s),
            (self.request_prefill_time, m.prefill_time_s),
            (self.request_decode_time, m.decode_time_s),
            (self.time_per_output_token, m.tpot_s),
        ):
            if value is not None:
                metric.observe(value * time_scale)

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
