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
  limit, model, GPU type and prices from the topology.

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
from slomesh.kv import events as kv_events
from slomesh.kv.index import DeltaAccumulator, InstanceKvTracker, PrefixIndex
from slomesh.topology import InstanceSpec, RegionSpec
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

    Attributes:
        next_start_s: When the engine's next step starts (virtual seconds); ``None`` while idle.
        pending: The last computed step (`StepResult`) or run (`DecodeRun`) whose outputs are
            not all delivered yet; ``pending_step`` is the next undelivered step of a run.
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
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1, got {stream_interval}")
        self.stream_interval = stream_interval
        self.region = region
        self.instance_id = spec.id
        self.gpu_type = spec.gpu_type
        self.engine = engine
        self.model_name = model_name
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
        self.outstanding[request_id] = _Forwarded(uncached, max_tokens, now_s)
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
        self, num_indexed_blocks: int, gauges: tuple[int, int, float]
    ) -> state_pb2.InstanceState:
        """The instance's `InstanceState`, as the agent publishes it.

        Args:
            num_indexed_blocks: Keys the agent's index holds for the instance.
            gauges: The engine's (running requests, waiting requests, KV cache usage in
                [0, 1]), as its ``/metrics`` report them.
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
        )


class SimRegion:
    """One region's agent: its instances, KV index and publication sequence numbers.

    Args:
        spec: The region in the topology.
        instances: Its instances.
        incarnation: The agent's incarnation id (fixed per simulation for determinism).
    """

    def __init__(self, spec: RegionSpec, instances: list[SimInstance], incarnation: str) -> None:
        self.name = spec.name
        self.spec = spec
        self.instances = instances
        self.incarnation = incarnation
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

    def cached_prefix_tokens(self, inst: SimInstance, token_ids: Sequence[int]) -> int:
        """The prompt's cached prefix on an instance by the agent's own index (at forwarding)."""
        if not token_ids:
            return 0
        self.flush_kv(inst)
        return self.index.match(token_ids, (inst.instance_id,))[inst.instance_id]

    def region_state(
        self, now_unix_ns: int, gauges: Sequence[tuple[int, int, float]]
    ) -> state_pb2.RegionState:
        """The next `RegionState` (seq +1), stamped ``now_unix_ns``.

        Args:
            now_unix_ns: Publication time.
            gauges: Per instance (in order), the engine gauges (see `SimInstance.to_proto`).
        """
        self.flush_kv()
        self.state_seq += 1
        self.published_states += 1
        return state_pb2.RegionState(
            region=self.name,
            seq=self.state_seq,
            timestamp_unix_ns=now_unix_ns,
            instances=[
                inst.to_proto(self.index.num_blocks(inst.instance_id), g)
                for inst, g in zip(self.instances, gauges, strict=True)
            ],
            agent_incarnation=self.incarnation,
            egress_usd_per_gb=self.spec.egress_usd_per_gb,
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
