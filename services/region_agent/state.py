"""Per-instance runtime state of the agent: scraped load, health, KV tracker, and the agent's
own accounting of the requests it forwarded (queued prefill/decode tokens, throughputs).

The accounting works the same for real vLLM and the emulator, since it only uses what the agent
itself sees: prompt sizes, `max_tokens`, token arrivals.

- `queued_prefill_tokens`: prompt tokens of forwarded requests without a first token yet, minus
  the cached prefix the agent's index reported for them when forwarded.
- `queued_decode_tokens`: output tokens still to come from forwarded requests that have
  produced their first token (`max_tokens` minus tokens received).
- `prefill_tokens_per_s`: EWMA over requests of uncached prompt tokens / TTFT seen by the
  agent (from sending the HTTP request to the first token; includes engine queueing, so it is
  the *effective* prefill throughput under the current load).
- `decode_tokens_per_s`: EWMA over state ticks of decode tokens received per second, sampled
  only over intervals during which the instance had running requests throughout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.region_agent.config import InstanceConfig
from services.region_agent.scraper import EngineInfo, ScrapedMetrics
from slomesh.kv.index import InstanceKvTracker
from slomesh.v1 import state_pb2


class Ewma:
    """Exponentially weighted moving average; the first sample sets the value.

    Args:
        alpha: weight of a new sample, in (0, 1].
    """

    def __init__(self, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float) -> float:
        """Folds in one sample and returns the new average."""
        if self.value is None:
            self.value = sample
        else:
            self.value += self.alpha * (sample - self.value)
        return self.value


@dataclass
class ForwardedRequest:
    """One request the agent forwarded and has not seen finish.

    Attributes:
        request_id: client request id (may be empty).
        prompt_tokens: prompt length in tokens (0 when the prompt is text and not yet counted).
        uncached_prompt_tokens: prompt tokens minus the indexed cached prefix at forwarding.
        max_tokens: requested output tokens.
        sent_monotonic: `time.monotonic()` when the HTTP request was sent.
        generated_tokens: output tokens received so far.
        first_token_monotonic: `time.monotonic()` of the first token, None before it.
    """

    request_id: str
    prompt_tokens: int
    uncached_prompt_tokens: int
    max_tokens: int
    sent_monotonic: float
    generated_tokens: int = 0
    first_token_monotonic: float | None = None


@dataclass
class InstanceRuntime:
    """Everything the agent knows about one engine instance.

    Attributes:
        config: the instance's CLI configuration.
        gpu_type: GPU type used for prices and reported in `InstanceState` ("" if unknown).
        tracker: its KV event tracker.
        info: static facts from the engine, None until fetched.
        scraped: last scraped metrics.
        healthy: True after a successful probe and until `unhealthy_after_failures`
            consecutive failures.
        consecutive_failures: failed probes in a row.
        outstanding: forwarded requests not yet finished, by an agent-internal id.
    """

    config: InstanceConfig
    gpu_type: str
    tracker: InstanceKvTracker
    info: EngineInfo | None = None
    scraped: ScrapedMetrics = field(default_factory=ScrapedMetrics)
    healthy: bool = False
    consecutive_failures: int = 0
    outstanding: dict[int, ForwardedRequest] = field(default_factory=dict)
    prefill_tps: Ewma = field(default_factory=lambda: Ewma(0.2))
    decode_tps: Ewma = field(default_factory=lambda: Ewma(0.2))
    _decode_tokens_since_tick: int = 0
    _last_tick_monotonic: float | None = None
    _running_at_last_tick: int = 0
    _next_id: int = 0

    @property
    def instance_id(self) -> str:
        return self.config.instance_id

    @property
    def block_size(self) -> int:
        """Tokens per KV block: from KV events, else scraped cache config, else info; 0."""
        return (
            self.tracker.block_size
            or self.scraped.block_size
            or (self.info.block_size if self.info else None)
            or 0
        )

    @property
    def num_gpu_blocks(self) -> int:
        return self.scraped.num_gpu_blocks or (self.info.num_gpu_blocks if self.info else None) or 0

    @property
    def model(self) -> str:
        return self.info.model if self.info else ""

    # -- accounting ------------------------------------------------------------------------

    def start_request(
        self, request_id: str, prompt_tokens: int, cached_prefix_tokens: int, max_tokens: int
    ) -> int:
        """Records a forwarded request; returns its handle for the other `*_request` calls."""
        handle = self._next_id
        self._next_id += 1
        self.outstanding[handle] = ForwardedRequest(
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            uncached_prompt_tokens=max(0, prompt_tokens - cached_prefix_tokens),
            max_tokens=max_tokens,
            sent_monotonic=time.monotonic(),
        )
        return handle

    def tokens_received(
        self, handle: int, num_tokens: int, now_monotonic: float | None = None
    ) -> None:
        """Records `num_tokens` output tokens of a request (the first call marks its first token).

        On the first token the request's prefill throughput sample is taken
        (uncached prompt tokens / time since the HTTP request was sent).
        """
        req = self.outstanding.get(handle)
        if req is None or num_tokens <= 0:
            return
        now = time.monotonic() if now_monotonic is None else now_monotonic
        if req.first_token_monotonic is None:
            req.first_token_monotonic = now
            elapsed = now - req.sent_monotonic
            if req.uncached_prompt_tokens > 0 and elapsed > 0:
                self.prefill_tps.update(req.uncached_prompt_tokens / elapsed)
            self._decode_tokens_since_tick += num_tokens - 1
        else:
            self._decode_tokens_since_tick += num_tokens
        req.generated_tokens += num_tokens

    def finish_request(self, handle: int) -> None:
        """Forgets a request (finished, failed or cancelled)."""
        self.outstanding.pop(handle, None)

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(
            r.uncached_prompt_tokens
            for r in self.outstanding.values()
            if r.first_token_monotonic is None
        )

    @property
    def queued_decode_tokens(self) -> int:
        return sum(
            max(0, r.max_tokens - r.generated_tokens)
            for r in self.outstanding.values()
            if r.first_token_monotonic is not None
        )

    @property
    def num_running_forwarded(self) -> int:
        """Forwarded requests that have produced their first token."""
        return sum(1 for r in self.outstanding.values() if r.first_token_monotonic is not None)

    def tick(self, now_monotonic: float | None = None) -> None:
        """Takes a decode-throughput sample over the interval since the previous tick."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        running = self.num_running_forwarded
        last = self._last_tick_monotonic
        busy = running > 0 and self._running_at_last_tick > 0
        if last is not None and now > last and busy and self._decode_tokens_since_tick > 0:
            self.decode_tps.update(self._decode_tokens_since_tick / (now - last))
        self._decode_tokens_since_tick = 0
        self._last_tick_monotonic = now
        self._running_at_last_tick = running

    # -- health ----------------------------------------------------------------------------

    def probe_result(self, ok: bool, unhealthy_after_failures: int) -> bool:
        """Records a probe outcome; returns True when `healthy` changed."""
        before = self.healthy
        if ok:
            self.consecutive_failures = 0
            self.healthy = True
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= unhealthy_after_failures:
                self.healthy = False
        return before != self.healthy

    # -- state -----------------------------------------------------------------------------

    def to_proto(
        self, price_usd_per_hour: float, spot_price_usd_per_hour: float, num_indexed_blocks: int
    ) -> state_pb2.InstanceState:
        """The instance's `InstanceState` (state.proto)."""
        info = self.info
        scraped = self.scraped
        return state_pb2.InstanceState(
            instance_id=self.instance_id,
            url=self.config.url,
            gpu_type=self.gpu_type,
            model=self.model,
            healthy=self.healthy,
            num_requests_running=scraped.num_requests_running,
            num_requests_waiting=scraped.num_requests_waiting,
            kv_cache_usage=scraped.kv_cache_usage,
            queued_prefill_tokens=self.queued_prefill_tokens,
            queued_decode_tokens=self.queued_decode_tokens,
            prefill_tokens_per_s=self.prefill_tps.value or 0.0,
            decode_tokens_per_s=self.decode_tps.value or 0.0,
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            max_model_len=info.max_model_len if info else 0,
            price_usd_per_hour=price_usd_per_hour,
            spot_price_usd_per_hour=spot_price_usd_per_hour,
            prefix_cache_queries_total=scraped.prefix_cache_queries_total,
            prefix_cache_hits_total=scraped.prefix_cache_hits_total,
            num_requests_outstanding=len(self.outstanding),
            num_indexed_blocks=num_indexed_blocks,
        )
