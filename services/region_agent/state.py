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
- `latency_fit`: the online fit of the instance's decode and prefill step-time models
  (`slomesh.online_fit.InstanceStepTimeFit`), fed every scrape with the deltas of the engine's
  counters, from a prior: the instance's latency profile (`--instance ...,profile=PATH`), else
  the roofline of its GPU type, else none. Published as `InstanceState.decode_fit` and
  `prefill_fit`. It starts over when the engine's model or GPU type changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.region_agent.config import InstanceConfig
from services.region_agent.scraper import EngineInfo, ScrapedMetrics
from slomesh.engine.profiles import DEFAULT_MODEL, MODELS, PROFILES
from slomesh.kv.index import InstanceKvTracker
from slomesh.online_fit import InstanceStepTimeFit, OnlineFitConfig, StepTimePrior
from slomesh.scheduler.predictor import load_latency_profile
from slomesh.v1 import state_pb2

if TYPE_CHECKING:
    from services.region_agent.model_switch import ModelSwitch

logger = logging.getLogger(__name__)


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
        prefill_shared: another request forwarded to the instance waited for its first token
            while this one did, so their prompts may have shared engine steps; a request
            without it was prefilled alone (`slomesh.online_fit.step_time_observations`).
    """

    request_id: str
    prompt_tokens: int
    uncached_prompt_tokens: int
    max_tokens: int
    sent_monotonic: float
    generated_tokens: int = 0
    first_token_monotonic: float | None = None
    prefill_shared: bool = False


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
        latency_fit: the online latency fit, None before the engine's info is known.
        swappable: the topology lets the instance switch models while idle
            (`services.region_agent.model_switch`); published only when its engine can.
        model_load_overhead_s: its engine's start-up time on a switch besides the weights,
            seconds (topology).
        switch: the model switch under way, None when none is.
    """

    config: InstanceConfig
    gpu_type: str
    tracker: InstanceKvTracker
    swappable: bool = False
    model_load_overhead_s: float = 0.0
    switch: ModelSwitch | None = None
    info: EngineInfo | None = None
    scraped: ScrapedMetrics = field(default_factory=ScrapedMetrics)
    healthy: bool = False
    consecutive_failures: int = 0
    outstanding: dict[int, ForwardedRequest] = field(default_factory=dict)
    prefill_tps: Ewma = field(default_factory=lambda: Ewma(0.2))
    decode_tps: Ewma = field(default_factory=lambda: Ewma(0.2))
    latency_fit: InstanceStepTimeFit | None = None
    _latency_fit_key: tuple[str, str, int] | None = None
    _prefill_in_flight_at_last_scrape: bool = False
    _solo_prefills: int = 0  # finished since the last scrape, prefilled alone
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
        """The model the engine reports serving ("" before its info is known)."""
        return self.info.model if self.info else ""

    @property
    def serving_model(self) -> str:
        """The model requests for this instance must name: the one a switch under way loads,
        else the engine's."""
        return self.switch.model if self.switch is not None else self.model

    @property
    def switch_capable(self) -> bool:
        """Swappable in the topology and its engine can switch models (published as
        `InstanceState.swappable`)."""
        return self.swappable and self.info is not None and self.info.model_switch

    @property
    def can_switch(self) -> bool:
        """Whether a switch may start now: switch-capable, healthy and idle (nothing
        forwarded and unfinished, nothing running or waiting at the last scrape, no switch
        under way)."""
        return (
            self.switch_capable
            and self.healthy
            and self.switch is None
            and not self.outstanding
            and self.scraped.num_requests_running == 0
            and self.scraped.num_requests_waiting == 0
        )

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
            prefill_shared=self.prefill_in_flight,  # another request waits for its first token
        )
        return handle

    def adopt_info(self, info: EngineInfo) -> None:
        """Takes the engine's static info (fetched at start, after a restart, or after a model
        switch): its GPU type, and its KV block count as the tracker's bound until a scrape
        reports one."""
        self.info = info
        if info.gpu_type:
            self.gpu_type = info.gpu_type
        if info.num_gpu_blocks and not self.scraped.num_gpu_blocks:
            self.tracker.set_capacity_blocks(info.num_gpu_blocks)

    def restart_clock(self, handle: int) -> None:
        """Marks a held request (it waited for a model load) as sent now: its prefill
        throughput sample counts from here."""
        req = self.outstanding.get(handle)
        if req is not None:
            req.sent_monotonic = time.monotonic()

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
            if self._next_id != handle + 1:
                req.prefill_shared = True  # another request was forwarded while it waited
            elapsed = now - req.sent_monotonic
            if req.uncached_prompt_tokens > 0 and elapsed > 0:
                self.prefill_tps.update(req.uncached_prompt_tokens / elapsed)
            self._decode_tokens_since_tick += num_tokens - 1
        else:
            self._decode_tokens_since_tick += num_tokens
        req.generated_tokens += num_tokens

    def finish_request(self, handle: int) -> None:
        """Forgets a request (finished, failed or cancelled); one past its first token that
        was prefilled alone counts for the next scrape's prefill observation."""
        req = self.outstanding.pop(handle, None)
        if req is not None and req.first_token_monotonic is not None and not req.prefill_shared:
            self._solo_prefills += 1

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

    @property
    def prefill_in_flight(self) -> bool:
        """Whether a forwarded request is waiting for its first token."""
        return any(r.first_token_monotonic is None for r in self.outstanding.values())

    # -- online latency fit ------------------------------------------------------------------

    def observe_step_times(self, scraped: ScrapedMetrics, config: OnlineFitConfig) -> None:
        """Feeds one scrape to the online latency fit (`slomesh.online_fit`).

        Nothing happens before the engine's info is known; the fit is created then (and again
        when the engine's model, GPU type or KV capacity changes), the scrape setting the
        baseline of the next interval. A bad value from the engine (e.g. a non-positive
        ``time_scale``) is logged and the scrape skipped. The requests finished since the
        previous scrape that were prefilled alone (``ForwardedRequest.prefill_shared`` unset)
        are passed as ``solo_prefills``: an interval whose finished requests are not all such
        gives no prefill observation. The agent sees a stream end a little after the engine
        counts the request, so an interval with a request finishing just before its scrape is
        usually skipped (counts differ), rarely misattributed.
        """
        info = self.info
        solo, self._solo_prefills = self._solo_prefills, 0
        if info is None:
            return
        capacity = self.num_gpu_blocks * self.block_size
        key = (self.model, self.gpu_type, capacity)
        if self.latency_fit is None or key != self._latency_fit_key:
            self.latency_fit = InstanceStepTimeFit(
                self._latency_prior(capacity), config, info.max_num_batched_tokens
            )
            self._latency_fit_key = key
        in_flight = self.prefill_in_flight
        try:
            self.latency_fit.observe(
                scraped,
                kv_capacity_tokens=capacity,
                time_scale=info.time_scale,
                prefill_in_flight=in_flight or self._prefill_in_flight_at_last_scrape,
                solo_prefills=solo,
            )
        except ValueError as exc:
            logger.warning(
                "latency fit skipped a scrape",
                extra={"instance_id": self.instance_id, "error": str(exc)},
            )
        self._prefill_in_flight_at_last_scrape = in_flight

    def _latency_prior(self, capacity_tokens: int) -> StepTimePrior | None:
        """The instance's latency profile, else its GPU type's roofline, else None."""
        max_context = capacity_tokens or None
        path = self.config.latency_profile
        if path is not None:
            profile = load_latency_profile(path)  # validated by AgentConfig
            if not self.model or profile.model == self.model:
                return StepTimePrior.from_model(
                    f"profile:{path}", profile, max_context_tokens=max_context
                )
            logger.warning(
                "latency profile is of another model; the fit's prior is the roofline",
                extra={
                    "instance_id": self.instance_id,
                    "profile_model": profile.model,
                    "model": self.model,
                },
            )
        if self.gpu_type in PROFILES:
            model = MODELS.get(self.model, DEFAULT_MODEL)
            return StepTimePrior.roofline(self.gpu_type, model, max_context_tokens=max_context)
        return None

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
        switch = self.switch
        max_model_len = info.max_model_len if info else 0
        remaining_s = 0.0
        if switch is not None:
            max_model_len = switch.max_model_len
            remaining_s = switch.remaining_s(info.time_scale if info else 1.0)
        state = state_pb2.InstanceState(
            instance_id=self.instance_id,
            url=self.config.url,
            gpu_type=self.gpu_type,
            model=self.serving_model,
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
            max_model_len=max_model_len,
            price_usd_per_hour=price_usd_per_hour,
            spot_price_usd_per_hour=spot_price_usd_per_hour,
            prefix_cache_queries_total=scraped.prefix_cache_queries_total,
            prefix_cache_hits_total=scraped.prefix_cache_hits_total,
            num_requests_outstanding=len(self.outstanding),
            num_indexed_blocks=num_indexed_blocks,
            swappable=self.switch_capable,
            model_load_overhead_s=self.model_load_overhead_s if self.switch_capable else 0.0,
            model_load_remaining_s=remaining_s,
        )
        if self.latency_fit is not None:
            state.decode_fit.CopyFrom(self.latency_fit.decode_fit_pb())
            state.prefill_fit.CopyFrom(self.latency_fit.prefill_fit_pb())
        return state
