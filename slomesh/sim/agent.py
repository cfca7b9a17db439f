"""Region agents in virtual time: per-instance accounting, the KV index, and `RegionState`s.

Each simulated region has what a live region agent (`services/region_agent/`) has, computed the
same way but driven by the simulator's clock instead of HTTP streams and ZMQ sockets:

- per instance, the agent's own accounting of the requests it forwarded (as
  ``services/region_agent/state.py``): queued prefill tokens (uncached prompt tokens of
  requests without a first token, the cached part being what the agent's index reported at
  forwarding), queued decode tokens (``max_tokens`` minus tokens received, for requests past
  their first token), outstanding requests, and two EWMAs (alpha 0.2): prefill throughput
  (uncached prompt tokens / time from forwarding to the first token, one sample per request)
  and decode throughput (decode tokens received per second between two state publications,
  sampled only while requests were running at both);
- per instance, an `InstanceKvTracker` fed with the engine's KV events (converted to the
  decoded form the agent's ZMQ subscriber produces, medium "GPU" as the emulator publishes),
  and a region `PrefixIndex` plus a `DeltaAccumulator` of the net key changes, published as
  `KvIndexDelta` (seq +1 per message) -- the same `slomesh.kv.index` code the agent runs;
- `region_state`: the `RegionState` the agent would publish: engine gauges (running, waiting,
  KV usage, as scraped from ``/metrics``), the accounting above, block size, KV blocks, context
  limit, model, GPU type and prices from the topology; the instance's model-switch settings
  (``swappable``, ``model_load_overhead_s``) and, during a switch, the time left
  (``model_load_remaining_s``); the region's weight cache and load bandwidths.
- model switches (`SimInstance.begin_model_load`): the instance's engine is replaced by one
  serving the new model (empty KV cache), its index entries are cleared (an ``AllBlocksCleared``
  for the old engine, as vLLM's restart publishes), its throughput EWMAs start over (they
  measured the old model), and requests that reach it during the load are held and forwarded
  when it ends (`engine_ready`). A model loaded from the remote store is in the region's
  weight cache afterwards (`SimRegion.cache_model`).
- per instance, the online latency fit (`slomesh.online_fit.InstanceStepTimeFit`, from the
  roofline prior of its GPU type, as the live agent without a ``profile=``), fed at every state
  publication with what a ``/metrics`` scrape would show then: the engine's cumulative vLLM
  counters, accumulated from its steps (`slomesh.sim.engine_metrics.EngineMetricCounters`), and
  its gauges, and the number of requests finished since the last one that the agent saw
  prefilled alone (no other forwarded request waiting for its first token meanwhile); published
  as ``decode_fit``/``prefill_fit`` with the same extraction and estimator code as the live
  agent. It starts over on a model switch.

Differences from the live agent, on purpose: the engine gauges are read at publication time
(the live agent scrapes every 100 ms, so its gauges are up to one scrape older), and the
engine's prefix-cache counters (``prefix_cache_queries_total``/``hits_total``), which no
placement policy reads, are not reported (0).

The simulator module must not import ``services`` (services import the core, never the other
way), hence this mirror of the agent's accounting rules rather than a reuse of its classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from slomesh.engine import kv_cache as engine_kv
from slomesh.engine.model import Engine
from slomesh.engine.profiles import DEFAULT_MODEL, MODELS, PROFILES
from slomesh.kv import events as kv_events
from slomesh.kv.index import DeltaAccumulator, InstanceKvTracker, PrefixIndex
from slomesh.online_fit import InstanceStepTimeFit, OnlineFitConfig, StepTimePrior
from slomesh.sim.engine_metrics import EngineMetricCounters
from slomesh.topology import InstanceSpec, RegionSpec, Topology
from slomesh.v1 import state_pb2

__all__ = ["EWMA_ALPHA", "MEDIUM_GPU", "SimInstance", "SimRegion", "to_agent_events"]

EWMA_ALPHA = 0.2
"""Weight of a new sample in the agent's throughput EWMAs (as the live agent)."""

MEDIUM_GPU = "GPU"
"""KV-event medium the emulator publishes."""

def to_agent_events(events: Sequence[engine_kv.KVEvent]) -> list[kv_events.KvEvent]:
    """Engine KV events as the agent's subscriber decodes them from the emulator's wire format.

    Args:
        events: Events from `Engine.step` / `Engine.run_decode_steps`, in order.

    Returns:
        The same events as `slomesh.kv.events` objects (medium "GPU"), in order.
    """
    out: list[kv_events.KvEvent] = []
    for ev in events:
        if isinstance(ev, engine_kv.BlockStored):
            out.append(
                kv_events.BlockStored(
                    block_hashes=tuple(ev.block_hashes),
                    parent_block_hash=ev.parent_block_hash,
                    token_ids=tuple(ev.token_ids),
                    block_size=ev.block_size,
                    medium=MEDIUM_GPU,
                )
            )
        elif isinstance(ev, engine_kv.BlockRemoved):
            out.append(kv_events.BlockRemoved(block_hashes=tuple(ev.block_hashes), medium=MEDIUM_GPU))
        elif isinstance(ev, engine_kv.AllBlocksCleared):
            out.append(kv_events.AllBlocksCleared())
        else:
            raise TypeError(f"not an engine KV event: {ev!r}")
    return out


@dataclass(slots=True)
class _Forwarded:
    """One request the agent forwarded to its instance and has not seen finish."""

    uncached_prompt_tokens: int
    max_tokens: int
    sent_s: float
    generated: int = 0  # tokens the engine produced
    seen: int = 0  # of those, the ones the agent has received (see `SimInstance`)
    first_token_s: float | None = None
    start_index: int = 0  # requests forwarded to the instance before this one
    # Another forwarded request waited for its first token while this one did: their prompts
    # may have shared engine steps (`slomesh.online_fit.step_time_observations`).
    prefill_shared: bool = False


class SimInstance:
    """One engine instance and the agent's view of it.

    Args:
        region: Region name.
        spec: The instance in the topology.
        engine: Its engine model (owned by the simulator, which steps it).
        model_name: Model the instance serves.
        price_usd_per_hour: On-demand price of its GPU in its region, USD per hour.
        spot_price_usd_per_hour: Spot price of its GPU in its region, USD per hour.
        stream_interval: Tokens per streamed chunk after the first (the engines'
            ``--stream-interval``, `ModelSpecRef.stream_interval`): the agent accounts for a
            request's tokens as its chunks arrive -- the first token, then every
            ``stream_interval`` -- as the live agent does; the end of the stream ends the
            request either way.
        model_load_overhead_s: Engine start-up time of a model switch besides reading
            weights, seconds (`Topology.model_load_overhead_s`).

    Attributes:
        next_start_s: When the engine's next step starts (virtual seconds); ``None`` while idle.
        pending: The last computed step (`StepResult`) or run (`DecodeRun`) whose outputs are
            not all delivered yet; ``pending_step`` is the next undelivered step of a run.
        swappable: The instance may be switched to another model while idle (topology).
        loading_until_s: When the model switch under way ends (virtual seconds); ``None``
            when the instance serves its model.
    """

    def __init__(
        self,
        region: str,
        spec: InstanceSpec,
        engine: Engine,
        model_name: str,
        price_usd_per_hour: float,
        spot_price_usd_per_hour: float,
        stream_interval: int = 1,
        model_load_overhead_s: float = 0.0,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1, got {stream_interval}")
        self.stream_interval = stream_interval
        self.region = region
        self.instance_id = spec.id
        self.gpu_type = spec.gpu_type
        self.engine = engine
        self.model_name = model_name
        self.swappable = spec.swappable
        self.model_load_overhead_s = model_load_overhead_s
        self.loading_until_s: float | None = None
        self.price_usd_per_hour = price_usd_per_hour
        self.spot_price_usd_per_hour = spot_price_usd_per_hour
        self.block_size = engine.config.block_size
        self.tracker = InstanceKvTracker(
            spec.id, block_size=self.block_size, capacity_blocks=engine.num_gpu_blocks
        )
        self.next_start_s: float | None = None
        self.pending = None
        self.pending_step = 0
        # Engine KV events delivered to the agent and not yet indexed (see SimRegion).
        self.kv_backlog: list[engine_kv.KVEvent] = []
        # Agent accounting (services/region_agent/state.py).
        self.outstanding: dict[str, _Forwarded] = {}
        self.queued_prefill_tokens = 0
        self.queued_decode_tokens = 0
        self.num_running_forwarded = 0
        self.prefill_tokens_per_s: float | None = None
        self.decode_tokens_per_s: float | None = None
        self._decode_tokens_since_tick = 0
        self._last_tick_s: float | None = None
        self._running_at_last_tick = 0
        self._num_forwarded = 0
        self._reset_latency_fit()

    # -- online latency fit ------------------------------------------------------------------

    def _reset_latency_fit(self) -> None:
        """A new online fit for the current engine, from its GPU type's roofline (as the live
        agent's `InstanceRuntime.observe_step_times`)."""
        engine = self.engine
        capacity = engine.num_gpu_blocks * self.block_size
        prior = (
            StepTimePrior.roofline(
                self.gpu_type,
                MODELS.get(self.model_name, DEFAULT_MODEL),
                max_context_tokens=capacity or None,
            )
            if self.gpu_type in PROFILES
            else None
        )
        self.engine_metrics = EngineMetricCounters()
        self.latency_fit = InstanceStepTimeFit(
            prior, OnlineFitConfig(), engine.config.max_num_batched_tokens
        )
        self._prefill_in_flight_at_last_scrape = False
        self._solo_prefills = 0

    def observe_step_times(self, gauges: tuple[int, int, float]) -> None:
        """Feeds the online fit one "scrape": the engine's counters now and ``gauges``
        (running, waiting, KV usage), with whether a forwarded request waits for its first
        token now or did at the previous one, and how many requests finished since the
        previous scrape were prefilled alone (as the live agent's
        `InstanceRuntime.observe_step_times`)."""
        running, waiting, usage = gauges
        in_flight = len(self.outstanding) > self.num_running_forwarded
        self.latency_fit.observe(
            self.engine_metrics.scrape(running, waiting, usage),
            kv_capacity_tokens=self.engine.num_gpu_blocks * self.block_size,
            prefill_in_flight=in_flight or self._prefill_in_flight_at_last_scrape,
            solo_prefills=self._solo_prefills,
        )
        self._prefill_in_flight_at_last_scrape = in_flight
        self._solo_prefills = 0

    # -- model switches ----------------------------------------------------------------------

    def can_switch(self) -> bool:
        """Whether the instance may start a model switch now: swappable, no request forwarded
        and unfinished, the engine without work, no switch under way."""
        return (
            self.swappable
            and not self.outstanding
            and not self.engine.has_work()
            and self.next_start_s is None
            and self.loading_until_s is None
        )

    def begin_model_load(
        self, engine: Engine, model_name: str, stream_interval: int, until_s: float
    ) -> None:
        """Switches to ``model_name``: ``engine`` (new, empty) replaces the old one, which
        must be idle (`can_switch`); the instance loads until ``until_s``. The caller clears
        the instance's index entries first (`SimRegion.clear_instance`).

        Raises:
            ValueError: the instance cannot switch now, or ``stream_interval`` < 1.
        """
        if not self.can_switch():
            raise ValueError(f"instance {self.instance_id} cannot switch models now")
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1, got {stream_interval}")
        self.engine = engine
        self.model_name = model_name
        self.stream_interval = stream_interval
        self.loading_until_s = until_s
        self.pending = None
        self.pending_step = 0
        self.kv_backlog = []
        self.tracker.set_capacity_blocks(engine.num_gpu_blocks)
        # The EWMAs measured the old model on this GPU.
        self.prefill_tokens_per_s = None
        self.decode_tokens_per_s = None
        self._decode_tokens_since_tick = 0
        self._reset_latency_fit()  # it measured the old model

    def engine_ready(self, now_s: float) -> None:
        """The switch ended at ``now_s``: the held requests go to the engine now, so their
        prefill-throughput samples are timed from here (as the live agent forwards them
        once the engine is up)."""
        self.loading_until_s = None
        for req in self.outstanding.values():
            if req.first_token_s is None:
                req.sent_s = now_s

    def model_load_remaining_s(self, now_s: float) -> float:
        """Seconds until the switch under way ends (0 when none)."""
        return 0.0 if self.loading_until_s is None else max(0.0, self.loading_until_s - now_s)

    # -- accounting ------------------------------------------------------------------------

    def start_request(
        self,
        request_id: str,
        prompt_tokens: int,
        cached_prefix_tokens: int,
        max_tokens: int,
        now_s: float,
    ) -> None:
        """Records a request forwarded to the instance at ``now_s``."""
        uncached = max(0, prompt_tokens - cached_prefix_tokens)
        waiting = len(self.outstanding) > self.num_running_forwarded
        self.outstanding[request_id] = _Forwarded(
            uncached, max_tokens, now_s, start_index=self._num_forwarded, prefill_shared=waiting
        )
        self._num_forwarded += 1
        self.queued_prefill_tokens += uncached

    def tokens_received(self, request_id: str, num_tokens: int, now_s: float) -> None:
        """Records ``num_tokens`` output tokens of a request arriving at the agent at ``now_s``.

        The first call marks the request's first token and takes its prefill throughput sample.
        """
        req = self.outstanding.get(request_id)
        if req is None or num_tokens <= 0:
            return
        if req.first_token_s is None:
            req.first_token_s = now_s
            if self._num_forwarded != req.start_index + 1:
                req.prefill_shared = True  # another request was forwarded while it waited
            elapsed = now_s - req.sent_s
            if req.uncached_prompt_tokens > 0 and elapsed > 0:
                sample = req.uncached_prompt_tokens / elapsed
                old = self.prefill_tokens_per_s
                self.prefill_tokens_per_s = (
                    sample if old is None else old + EWMA_ALPHA * (sample - old)
                )
            self.queued_prefill_tokens -= req.uncached_prompt_tokens
            self.num_running_forwarded += 1
            req.generated = req.seen = num_tokens
            self._decode_tokens_since_tick += num_tokens - 1
            self.queued_decode_tokens += max(0, req.max_tokens - num_tokens)
        else:
            self._advance(req, num_tokens)

    def _advance(self, req: _Forwarded, num_tokens: int) -> None:
        """``num_tokens`` more engine tokens of a request past its first; the agent sees them
        in whole chunks of `stream_interval` (a function of the count alone, so delivering
        steps one by one or a decode run at once gives the same accounting)."""
        req.generated += num_tokens
        interval = self.stream_interval
        seen = req.generated - (req.generated - 1) % interval if interval > 1 else req.generated
        if seen == req.seen:
            return
        self._decode_tokens_since_tick += seen - req.seen
        before = max(0, req.max_tokens - req.seen)
        req.seen = seen
        self.queued_decode_tokens -= before - max(0, req.max_tokens - seen)

    def decode_tokens_received(self, request_ids: Sequence[str], num_tokens: int) -> None:
        """Records ``num_tokens`` decode tokens for each of ``request_ids`` (all past their first
        token), as one call of `tokens_received` each would."""
        outstanding = self.outstanding
        for rid in request_ids:
            req = outstanding.get(rid)
            if req is not None:
                self._advance(req, num_tokens)

    def finish_request(self, request_id: str) -> None:
        """Forgets a request (finished or failed)."""
        req = self.outstanding.pop(request_id, None)
        if req is None:
            return
        if req.first_token_s is None:
            self.queued_prefill_tokens -= req.uncached_prompt_tokens
        else:
            self.num_running_forwarded -= 1
            self.queued_decode_tokens -= max(0, req.max_tokens - req.seen)
            if not req.prefill_shared:
                self._solo_prefills += 1

    def tick(self, now_s: float) -> None:
        """Takes a decode-throughput sample over the interval since the previous tick."""
        running = self.num_running_forwarded
        last = self._last_tick_s
        busy = running > 0 and self._running_at_last_tick > 0
        if last is not None and now_s > last and busy and self._decode_tokens_since_tick > 0:
            sample = self._decode_tokens_since_tick / (now_s - last)
            old = self.decode_tokens_per_s
            self.decode_tokens_per_s = sample if old is None else old + EWMA_ALPHA * (sample - old)
        self._decode_tokens_since_tick = 0
        self._last_tick_s = now_s
        self._running_at_last_tick = running

    # -- state -----------------------------------------------------------------------------

    def to_proto(
        self, num_indexed_blocks: int, gauges: tuple[int, int, float], now_s: float = 0.0
    ) -> state_pb2.InstanceState:
        """The instance's `InstanceState`, as the agent publishes it.

        Args:
            num_indexed_blocks: Keys the agent's index holds for the instance.
            gauges: The engine's (running requests, waiting requests, KV cache usage in
                [0, 1]), as its ``/metrics`` report them.
            now_s: Virtual time of the publication (for ``model_load_remaining_s``).
        """
        engine = self.engine
        running, waiting, usage = gauges
        return state_pb2.InstanceState(
            instance_id=self.instance_id,
            gpu_type=self.gpu_type,
            model=self.model_name,
            healthy=True,
            num_requests_running=running,
            num_requests_waiting=waiting,
            kv_cache_usage=usage,
            queued_prefill_tokens=self.queued_prefill_tokens,
            queued_decode_tokens=self.queued_decode_tokens,
            prefill_tokens_per_s=self.prefill_tokens_per_s or 0.0,
            decode_tokens_per_s=self.decode_tokens_per_s or 0.0,
            block_size=self.block_size,
            num_gpu_blocks=engine.num_gpu_blocks,
            max_model_len=engine.max_model_len,
            price_usd_per_hour=self.price_usd_per_hour,
            spot_price_usd_per_hour=self.spot_price_usd_per_hour,
            num_requests_outstanding=len(self.outstanding),
            num_indexed_blocks=num_indexed_blocks,
            swappable=self.swappable,
            model_load_overhead_s=self.model_load_overhead_s,
            model_load_remaining_s=self.model_load_remaining_s(now_s),
            decode_fit=self.latency_fit.decode_fit_pb(),
            prefill_fit=self.latency_fit.prefill_fit_pb(),
        )


class SimRegion:
    """One region's agent: its instances, KV index and publication sequence numbers.

    Args:
        spec: The region in the topology.
        instances: Its instances.
        incarnation: The agent's incarnation id (fixed per simulation for determinism).
        topology: The topology, for the region's weight cache at start
            (`Topology.weight_cache_models`); None = the ``weight_cache:`` list alone.

    Attributes:
        weight_cache_models: Models whose weights the region's local cache holds.
    """

    def __init__(
        self,
        spec: RegionSpec,
        instances: list[SimInstance],
        incarnation: str,
        topology: Topology | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.instances = instances
        self.incarnation = incarnation
        self.weight_cache_models: list[str] = (
            topology.weight_cache_models(spec.name)
            if topology is not None
            else list(spec.weight_cache)
        )
        self.index = PrefixIndex()
        self.pending = DeltaAccumulator()
        self.state_seq = 0
        self.kv_seq = 0
        self.published_states = 0
        self.published_deltas = 0

    def on_kv_events(self, inst: SimInstance, events: Sequence[engine_kv.KVEvent]) -> None:
        """An instance's engine KV events reached the agent (at the end of their step).

        They are indexed when the index is next read (`flush_kv`): applying several batches
        to the tracker at once gives the same keys and the same net delta as applying them one
        by one (the tracker's capacity bound never binds, since the engine never caches more
        blocks than it has), at a fraction of the cost.
        """
        if events:
            inst.kv_backlog.extend(events)

    def flush_kv(self, inst: SimInstance | None = None) -> None:
        """Indexes the KV events delivered so far (of one instance, or of all)."""
        for target in self.instances if inst is None else (inst,):
            backlog = target.kv_backlog
            if not backlog:
                continue
            target.kv_backlog = []
            delta = target.tracker.apply_batch(None, to_agent_events(backlog))
            self.index.apply_delta(delta)
            self.pending.add(delta)

    def clear_instance(self, inst: SimInstance) -> None:
        """Drops every index entry of an instance (its engine restarts on another model):
        the pending events are indexed first, then a ``cleared`` delta is published."""
        self.flush_kv(inst)
        delta = inst.tracker.clear()
        self.index.apply_delta(delta)
        self.pending.add(delta)

    def cache_model(self, model: str) -> None:
        """Records that the region's local weight cache now holds ``model``."""
        if model not in self.weight_cache_models:
            self.weight_cache_models.append(model)

    def cached_prefix_tokens(self, inst: SimInstance, token_ids: Sequence[int]) -> int:
        """The prompt's cached prefix on an instance by the agent's own index (at forwarding)."""
        if not token_ids:
            return 0
        self.flush_kv(inst)
        return self.index.match(token_ids, (inst.instance_id,))[inst.instance_id]

    def region_state(
        self, now_unix_ns: int, gauges: Sequence[tuple[int, int, float]], now_s: float = 0.0
    ) -> state_pb2.RegionState:
        """The next `RegionState` (seq +1), stamped ``now_unix_ns``.

        Args:
            now_unix_ns: Publication time.
            gauges: Per instance (in order), the engine gauges (see `SimInstance.to_proto`).
            now_s: The same time in virtual seconds (for the switches under way).
        """
        self.flush_kv()
        self.state_seq += 1
        self.published_states += 1
        return state_pb2.RegionState(
            region=self.name,
            seq=self.state_seq,
            timestamp_unix_ns=now_unix_ns,
            instances=[
                inst.to_proto(self.index.num_blocks(inst.instance_id), g, now_s)
                for inst, g in zip(self.instances, gauges, strict=True)
            ],
            agent_incarnation=self.incarnation,
            egress_usd_per_gb=self.spec.egress_usd_per_gb,
            weight_cache_models=self.weight_cache_models,
            weight_cache_gb_per_s=self.spec.weight_cache_gb_per_s,
            remote_weights_gb_per_s=self.spec.remote_weights_gb_per_s,
        )

    def take_kv_delta(self, now_unix_ns: int) -> state_pb2.KvIndexDelta | None:
        """The pending index changes as the next `KvIndexDelta` (seq +1); None when there are
        none."""
        self.flush_kv()
        if not self.pending:
            return None
        self.kv_seq += 1
        self.published_deltas += 1
        return state_pb2.KvIndexDelta(
            region=self.name,
            seq=self.kv_seq,
            timestamp_unix_ns=now_unix_ns,
            instances=self.pending.take(),
            agent_incarnation=self.incarnation,
        )
