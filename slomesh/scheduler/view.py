"""The scheduler's view of the mesh, built from what region agents publish on NATS.

`ClusterView` keeps, per region:

- the latest `RegionState` and when it was received (a region whose state is older than
  `staleness_ms` is not routable: DESIGN.md section 3);
- the prefix-block index of its instances (`slomesh.kv.index.PrefixIndex`), fed by
  `KvIndexDelta`s. Deltas carry a sequence number per agent incarnation; a gap, a new
  incarnation, or the first sight of a region asks for a full `KvIndexSnapshot` through the
  `request_snapshot` callback, which then replaces the region's keys;
- the RTT matrix: seeded from the topology (`Topology.rtt_ms`, by region location) and
  overwritten by the agents' `RttReport`s;
- optimistic load accounting: a request the scheduler has just placed on an instance is added
  to that instance's queued tokens until a `RegionState` that reflects it arrives, so that a
  burst of placements does not all land on one instance; and the arrival time at the instance
  and prompt tokens of each recent placement (`InstanceView.prefill_arrivals_ms`), from which
  the predictor times the instance's prefill steps (the queue-wait timeline);
- the TPOT targets of the requests this scheduler has running on each instance
  (`track_inflight`), so that a policy can refuse to slow their shared decode step past them;
- the output lengths of completed requests per (model, SLO class) (`output_lengths`, an
  `OutputLengthPredictor`), from which policies predict the output length of the next one.
  Whoever sees a request end feeds it: the live scheduler when a forwarded stream completes
  or a client reports an outcome, the simulator at the same point in virtual time.

The view does no I/O and takes its clock as an argument, so the simulator can drive it on a
virtual clock. It is not thread-safe; the scheduler uses it from one asyncio loop.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from slomesh.engine.profiles import MODELS
from slomesh.kv.index import PrefixIndex
from slomesh.online_fit import PublishedStepTimeFit
from slomesh.scheduler.output_length import OutputLengthPredictor
from slomesh.topology import Topology
from slomesh.v1 import state_pb2

logger = logging.getLogger(__name__)

__all__ = ["ClusterView", "InstanceView", "PendingPlacement"]

#: RTT assumed between regions that neither the topology nor any agent report knows, in ms
#: (a conservative intercontinental round trip; see ../shared/data/regions/rtt_ms.csv).
DEFAULT_UNKNOWN_RTT_MS = 300.0

#: Time constant of the placed-prefill rate per instance, seconds: about one request's decode
#: lifetime (an Azure conversation request decodes for ~5-10 s); on the Azure trace at 7x load
#: 3 s and 30 s both placed worse (lower SLO attainment) than 10 s.
DEFAULT_PREFILL_RATE_WINDOW_S = 10.0

#: How long the scheduler keeps the arrival of a placement on an instance for the queue-wait
#: timeline (`InstanceView.prefill_arrivals_ms`) after its predicted prefill end (queue wait
#: plus prefill from its arrival), seconds: longer than the chains of back-to-back prefill
#: steps that placements arriving 0-0.2 s apart build (a step of up to 8192 prompt tokens takes
#: 0.05-0.5 s on the GPUs we model). Counting from the arrival alone dropped the long prompts
#: of the Mooncake trace (50-90k tokens, seconds of chunked prefill) while they still ran: the
#: state then showed each whole prompt as queued work of unknown phase, and the waits behind
#: them were predicted at 10-30x.
PREFILL_TIMELINE_HORIZON_S = 1.0

#: Most arrivals kept per instance for that timeline (the oldest are dropped first).
PREFILL_TIMELINE_MAX_ARRIVALS = 64

#: Age after which a link's published spare bandwidth is no longer used, ms (five periods of
#: `slomesh.transfer.link_stats.DEFAULT_PERIOD_S`); the topology's capacity stands in then.
DEFAULT_LINK_STATS_STALENESS_MS = 5000.0


@dataclass(slots=True)
class PendingPlacement:
    """A request the scheduler placed on an instance, not yet visible in the agent's state.

    Attributes:
        request_id: The request.
        prefill_tokens: Uncached prompt tokens it adds to the instance's prefill queue.
        decode_tokens: Output tokens it adds to the instance's decode queue.
        arrives_unix_ns: When the request reaches the agent (placement time plus the one-way
            delay from its origin); a state stamped at or after this reflects it.
        switch_model: The model the instance loads for this request before serving it (a
            model switch, `slomesh.scheduler.model_load`); "" when none. Until the state
            shows the switch, the view shows the instance loading this model.
        switch_max_model_len: Context limit of the instance once switched, tokens.
        loaded_unix_ns: When the switch is expected to end (arrival plus ``M_q``).
    """

    request_id: str
    prefill_tokens: int
    decode_tokens: int
    arrives_unix_ns: int
    switch_model: str = ""
    switch_max_model_len: int = 0
    loaded_unix_ns: int = 0


@dataclass(slots=True)
class InstanceView:
    """One instance as a placement candidate: its last reported state plus pending placements.

    Token counts include the scheduler's own pending placements (see `PendingPlacement`).

    Attributes:
        region: Region name.
        instance_id: Instance id (unique in the mesh).
        agent_endpoint: gRPC address of the region's agent, as reachable inside its region.
        gpu_type: GPU type of the instance ("H100", ..., "CPU").
        model: Model the instance serves.
        healthy: The agent's health verdict.
        num_requests_running: Sequences in the running batch.
        num_requests_waiting: Requests in the engine queue plus pending placements.
        num_requests_outstanding: Requests forwarded and not finished, plus pending placements.
        kv_cache_usage: Fraction of KV blocks in use, in [0, 1].
        queued_prefill_tokens: Prompt tokens waiting for prefill, including pending placements.
        queued_decode_tokens: Output tokens still to decode, including pending placements.
        prefill_tokens_per_s: Measured prefill throughput, 0 = unknown.
        decode_tokens_per_s: Measured decode throughput (all sequences), 0 = unknown.
        block_size: Tokens per KV block (0 = unknown).
        num_gpu_blocks: KV blocks of the instance (0 = unknown).
        max_model_len: Context limit in tokens (0 = unknown).
        price_usd_per_hour: Price the instance is billed at, USD per hour.
        egress_usd_per_gb: Egress price of its region, USD per GB.
        state_age_ms: Age of the region's state at the time of the query, in ms.
        pending_placements: How many of the scheduler's placements are not yet in the state.
        tightest_inflight_tpot_ms: The smallest TPOT target among requests this scheduler
            has running on the instance (inf when none): adding a request must not push the
            shared decode step past it.
        swappable: The instance may be switched to another model while idle.
        model_load_overhead_s: Its engine start-up time of a model switch besides reading
            weights, seconds.
        model_load_remaining_s: Seconds until it has loaded `model` (0: it serves it now).
        weight_cache_models: Models the region's local weight cache holds.
        weight_cache_gb_per_s: Bandwidth of loading weights from that cache, GB/s (0 = unknown).
        remote_weights_gb_per_s: Bandwidth of loading weights the cache lacks, GB/s (0 =
            unknown).
        prefill_arrival_tokens_per_s: Recent rate of uncached prompt tokens this scheduler
            placed on the instance (`ClusterView.prefill_arrival_tokens_per_s`), tokens/s.
        prefill_rate_window_s: Time constant of that rate, seconds: a placement of ``n``
            uncached prompt tokens raises it by ``n / prefill_rate_window_s``.
        online_fit: The agent's online fit of the instance's step times (`InstanceState`
            ``decode_fit``/``prefill_fit``), ``None`` when the state carries none; the
            predictor uses it once it rests on enough observations
            (`PredictorConfig.online_fit_min_observations`).
        prefill_arrivals_ms: This scheduler's placements on the instance whose predicted
            prefill ended at most `PREFILL_TIMELINE_HORIZON_S` before the query or is still to
            come (with every one after the first such), as (arrival at the instance in ms
            relative to the query time -- negative: already there --, uncached prompt tokens,
            cached prefix tokens), in arrival order; the predictor times them step by step
            (`slomesh.scheduler.predictor.queue_wait_ms`).
        state_prefill_tokens: Prompt tokens waiting for prefill as the state reports them
            (``queued_prefill_tokens`` without the pending placements).
        state_stamp_age_ms: Time since the agent took the state (its timestamp) at the
            query, ms.
    """

    region: str
    instance_id: str
    agent_endpoint: str
    gpu_type: str
    model: str
    healthy: bool
    num_requests_running: int
    num_requests_waiting: int
    num_requests_outstanding: int
    kv_cache_usage: float
    queued_prefill_tokens: int
    queued_decode_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    price_usd_per_hour: float
    egress_usd_per_gb: float
    state_age_ms: float
    pending_placements: int = 0
    tightest_inflight_tpot_ms: float = math.inf
    swappable: bool = False
    model_load_overhead_s: float = 0.0
    model_load_remaining_s: float = 0.0
    weight_cache_models: frozenset[str] = frozenset()
    weight_cache_gb_per_s: float = 0.0
    remote_weights_gb_per_s: float = 0.0
    prefill_arrival_tokens_per_s: float = 0.0
    prefill_rate_window_s: float = DEFAULT_PREFILL_RATE_WINDOW_S
    online_fit: PublishedStepTimeFit | None = None
    prefill_arrivals_ms: tuple[tuple[float, int, int], ...] = ()
    state_prefill_tokens: int = 0
    state_stamp_age_ms: float = 0.0


@dataclass(slots=True)
class _KvTrack:
    """Sequence tracking of one region's KV index deltas."""

    incarnation: str | None = None
    seq: int | None = None
    awaiting_snapshot: bool = False
    requested_unix_ns: int = 0
    buffered: list[state_pb2.KvIndexDelta] = field(default_factory=list)


class _InstanceRow(NamedTuple):
    """The fields of one `InstanceState` that `ClusterView.instances` reads, read out of the
    protobuf message once per state (a field read there costs ~50 ns; a decision lists every
    instance)."""

    instance_id: str
    gpu_type: str
    model: str
    healthy: bool
    num_requests_running: int
    num_requests_waiting: int
    num_requests_outstanding: int
    kv_cache_usage: float
    queued_prefill_tokens: int
    queued_decode_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    price_usd_per_hour: float
    swappable: bool
    model_load_overhead_s: float
    model_load_remaining_s: float

    @classmethod
    def of(cls, inst: state_pb2.InstanceState) -> _InstanceRow:
        return cls(
            inst.instance_id, inst.gpu_type, inst.model, inst.healthy,
            inst.num_requests_running, inst.num_requests_waiting,
            inst.num_requests_outstanding, inst.kv_cache_usage, inst.queued_prefill_tokens,
            inst.queued_decode_tokens, inst.prefill_tokens_per_s, inst.decode_tokens_per_s,
            inst.block_size, inst.num_gpu_blocks, inst.max_model_len,
            inst.price_usd_per_hour, inst.swappable, inst.model_load_overhead_s,
            inst.model_load_remaining_s,
        )


@dataclass(slots=True)
class _Region:
    state: state_pb2.RegionState
    received_unix_ns: int
    pending: dict[str, deque[PendingPlacement]] = field(default_factory=dict)
    # instance id -> online step-time fit of the current state (parsed once per state).
    online_fits: dict[str, PublishedStepTimeFit] = field(default_factory=dict)
    # The state's instances and region-wide fields as plain values (`_InstanceRow`).
    rows: tuple[_InstanceRow, ...] = ()
    weight_cache_models: frozenset[str] = frozenset()
    # instance id -> (model, time) it streamed tokens of that model (`note_serving`), until a
    # state stamped after that time.
    serving: dict[str, tuple[str, int]] = field(default_factory=dict)


class ClusterView:
    """Latest state, prefix index and RTTs of every region (see the module docstring).

    Args:
        topology: The mesh topology: RTT seeds, prices and the model; may be ``None`` (then
            RTTs come only from agent reports and prices only from states).
        staleness_ms: A region whose last state was received longer ago than this is not
            routable.
        request_snapshot: Called with a region name when the view needs a full KV index
            snapshot of that region (sequence gap, new agent incarnation, first sight). The
            caller fetches it and passes it to `apply_kv_snapshot`, or calls `snapshot_failed`.
            ``None``: no snapshots; out-of-sequence deltas are then applied as they come.
        snapshot_retry_ms: A snapshot asked for and not received within this is asked again.
        max_buffered_deltas: Deltas kept per region while a snapshot is awaited.
        clock_ns: Wall (or virtual) clock in Unix nanoseconds.
        unknown_rtt_ms: RTT assumed for region pairs nobody knows.
        output_lengths: Learned output lengths shared by every policy placing on this view;
            default a new, empty `OutputLengthPredictor`.
        prefill_rate_window_s: Time constant of the per-instance rate of placed prompt
            tokens (`prefill_arrival_tokens_per_s`), seconds.
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        staleness_ms: float = 1000.0,
        request_snapshot: Callable[[str], None] | None = None,
        snapshot_retry_ms: float = 2000.0,
        max_buffered_deltas: int = 1024,
        clock_ns: Callable[[], int] = time.time_ns,
        unknown_rtt_ms: float = DEFAULT_UNKNOWN_RTT_MS,
        output_lengths: OutputLengthPredictor | None = None,
        prefill_rate_window_s: float = DEFAULT_PREFILL_RATE_WINDOW_S,
    ):
        if staleness_ms <= 0:
            raise ValueError(f"staleness_ms: must be > 0, got {staleness_ms}")
        if prefill_rate_window_s <= 0:
            raise ValueError(f"prefill_rate_window_s: must be > 0, got {prefill_rate_window_s}")
        self.prefill_rate_window_s = prefill_rate_window_s
        # instance id -> (time of the last update in unix ns, rate in tokens/s at that time).
        self._prefill_rate: dict[str, tuple[int, float]] = {}
        # instance id -> (arrival unix ns, uncached prompt tokens) of recent placements, sorted.
        # instance id -> [(arrival ns, uncached prompt tokens, cached prefix tokens, keep
        # until ns)], by arrival.
        self._prefill_arrivals: dict[str, list[tuple[int, int, int, int]]] = {}
        self.topology = topology
        self.staleness_ms = staleness_ms
        self.request_snapshot = request_snapshot
        self.snapshot_retry_ms = snapshot_retry_ms
        self.max_buffered_deltas = max_buffered_deltas
        self.clock_ns = clock_ns
        self.unknown_rtt_ms = unknown_rtt_ms
        self.prefix_index = PrefixIndex()
        self.output_lengths = (
            output_lengths if output_lengths is not None else OutputLengthPredictor()
        )
        self._regions: dict[str, _Region] = {}
        self._kv: dict[str, _KvTrack] = {}
        self._index_instances: dict[str, set[str]] = {}
        self._rtt_seed: dict[tuple[str, str], float] = {}
        self._rtt_measured: dict[tuple[str, str], float] = {}
        self._topology_prices: dict[str, float] = {}
        # (src, dst) -> (received unix ns, spare bytes/s) from `apply_link_stats`.
        self._link_spare: dict[tuple[str, str], tuple[int, float]] = {}
        # (src, dst) -> unix ns when the foreground KV moves this scheduler ordered are done.
        # (src, dst) -> (when the foreground moves this scheduler ordered there are done, ns;
        # the bandwidth they were given, bytes/s).
        self._link_busy_until: dict[tuple[str, str], tuple[int, float]] = {}
        self.link_stats_staleness_ms = DEFAULT_LINK_STATS_STALENESS_MS
        # (region, instance) -> request id -> (TPOT target ms, expiry unix ns or None).
        self._inflight: dict[tuple[str, str], dict[str, tuple[float, int | None]]] = {}
        self.snapshots_requested = 0
        self.deltas_applied = 0
        if topology is not None:
            names = topology.region_names
            for src in names:
                for dst in names:
                    try:
                        self._rtt_seed[(src, dst)] = topology.rtt_ms(src, dst)
                    except KeyError:
                        continue
            for region in topology.regions:
                for inst in region.instances:
                    self._topology_prices[inst.id] = topology.instance_price_usd_per_hour(inst.id)

    # -- region state --------------------------------------------------------------------

    def apply_state(
        self, state: state_pb2.RegionState, received_unix_ns: int | None = None
    ) -> None:
        """Records a region's state (the newest one wins; older or repeated ones are ignored).

        Pending placements that the state reflects (those that reached the agent by the
        state's timestamp) are dropped. A region seen for the first time, or a new agent
        incarnation, asks for a KV snapshot.

        Args:
            state: The `RegionState` from `slomesh.region.<region>.state`.
            received_unix_ns: When it was received; default now.
        """
        now = self.clock_ns() if received_unix_ns is None else received_unix_ns
        region = state.region
        entry = self._regions.get(region)
        if entry is not None:
            old = entry.state
            if old.agent_incarnation == state.agent_incarnation and state.seq <= old.seq:
                return
            entry.state = state
            entry.received_unix_ns = now
        else:
            entry = _Region(state=state, received_unix_ns=now)
            self._regions[region] = entry
        entry.online_fits = {
            inst.instance_id: fit
            for inst in state.instances
            if (fit := PublishedStepTimeFit.from_pb(inst)) is not None
        }
        entry.rows = tuple(_InstanceRow.of(inst) for inst in state.instances)
        entry.weight_cache_models = frozenset(state.weight_cache_models)
        stamp = state.timestamp_unix_ns
        for queue in entry.pending.values():
            while queue and queue[0].arrives_unix_ns <= stamp:
                queue.popleft()
        if entry.serving:
            entry.serving = {i: s for i, s in entry.serving.items() if s[1] > stamp}
        track = self._kv.setdefault(region, _KvTrack())
        if track.incarnation != state.agent_incarnation and not track.awaiting_snapshot:
            self._ask_snapshot(region, track, now)
        elif track.awaiting_snapshot:
            self._maybe_retry_snapshot(region, track, now)

    def regions(self) -> list[str]:
        """Names of every region that has published a state."""
        return list(self._regions)

    def region_state(self, region: str) -> state_pb2.RegionState | None:
        """The latest state of `region`, or ``None``."""
        entry = self._regions.get(region)
        return entry.state if entry is not None else None

    def state_age_ms(self, region: str, now_unix_ns: int | None = None) -> float:
        """Milliseconds since `region`'s last state was received (inf if never)."""
        entry = self._regions.get(region)
        if entry is None:
            return float("inf")
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        return (now - entry.received_unix_ns) / 1e6

    def is_fresh(self, region: str, now_unix_ns: int | None = None) -> bool:
        """Whether `region`'s state is within the staleness bound."""
        return self.state_age_ms(region, now_unix_ns) <= self.staleness_ms

    def routable_regions(self, now_unix_ns: int | None = None) -> list[str]:
        """Regions with a fresh state and at least one healthy instance."""
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        return [
            name
            for name, entry in self._regions.items()
            if (now - entry.received_unix_ns) / 1e6 <= self.staleness_ms
            and any(i.healthy for i in entry.state.instances)
        ]

    def known_region_names(self) -> set[str]:
        """Regions of the topology plus every region that has published a state."""
        names = set(self._regions)
        if self.topology is not None:
            names.update(self.topology.region_names)
        return names

    def known_models(self) -> dict[str, int]:
        """Model name -> the largest max_model_len any instance (or the topology) reports.

        Every model of the topology counts (a model no instance serves now may be loaded on a
        swappable one); instances whose state has no max_model_len count with the topology's
        default model's (or 0 if none).
        """
        models: dict[str, int] = {}
        default_len = 0
        if self.topology is not None:
            default_len = self.topology.model.max_model_len
            for ref in self.topology.models:
                models[ref.name] = ref.max_model_len
        for entry in self._regions.values():
            for inst in entry.state.instances:
                if not inst.model:
                    continue
                limit = inst.max_model_len or default_len
                if limit > models.get(inst.model, 0):
                    models[inst.model] = limit
        return models

    def model_weights_bytes(self, model: str) -> int | None:
        """Bytes of weights an engine loads to serve `model`: the topology's (its
        ``weights_bytes``, else the engine model's), else the engine model's alone; None when
        neither knows the model (then no instance can be switched to it)."""
        if self.topology is not None:
            for ref in self.topology.models:
                if ref.name == model:
                    return ref.resolved_weights_bytes
        spec = MODELS.get(model)
        return spec.weight_bytes if spec is not None else None

    def agent_endpoint(self, region: str) -> str:
        """The agent address `region` reports (as reachable inside the region), or ""."""
        entry = self._regions.get(region)
        return entry.state.agent_endpoint if entry is not None else ""

    def instances(
        self, regions: Iterable[str] | None = None, now_unix_ns: int | None = None
    ) -> list[InstanceView]:
        """Every instance of the given regions (default all) with pending placements added.

        Args:
            regions: Regions to list; ``None`` = every region with a state (fresh or not).
            now_unix_ns: Time of the query (for `state_age_ms`); default now.

        Returns:
            One `InstanceView` per instance, in region then state order.
        """
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        names = list(self._regions) if regions is None else list(regions)
        since = now - int(PREFILL_TIMELINE_HORIZON_S * 1e9)
        out: list[InstanceView] = []
        for name in names:
            entry = self._regions.get(name)
            if entry is None:
                continue
            state = entry.state
            age_ms = (now - entry.received_unix_ns) / 1e6
            stamp_age_ms = (now - state.timestamp_unix_ns) / 1e6
            weight_cache = entry.weight_cache_models
            endpoint, egress = state.agent_endpoint, state.egress_usd_per_gb
            cache_gb_per_s = state.weight_cache_gb_per_s
            remote_gb_per_s = state.remote_weights_gb_per_s
            for inst in entry.rows:
                pending = entry.pending.get(inst.instance_id)
                n_pending = len(pending) if pending else 0
                pre = dec = 0
                model, max_len, blocks = inst.model, inst.max_model_len, inst.num_gpu_blocks
                usage, load_remaining_s = inst.kv_cache_usage, inst.model_load_remaining_s
                prefill_tps, decode_tps = inst.prefill_tokens_per_s, inst.decode_tokens_per_s
                fit = entry.online_fits.get(inst.instance_id)
                if pending:
                    for p in pending:
                        pre += p.prefill_tokens
                        dec += p.decode_tokens
                        if p.switch_model:
                            # A switch the state does not show yet: the instance is loading
                            # p.switch_model (remaining time as of the state's receipt, so
                            # that remaining - state_age_ms = time left from now).
                            model, max_len = p.switch_model, p.switch_max_model_len
                            blocks, usage, prefill_tps, decode_tps = 0, 0.0, 0.0, 0.0
                            fit = None  # measured on the old model
                            load_remaining_s = max(
                                0.0, (p.loaded_unix_ns - entry.received_unix_ns) / 1e9
                            )
                if load_remaining_s > 0 and entry.serving:
                    served = entry.serving.get(inst.instance_id)
                    if served is not None and served[0] == model:
                        load_remaining_s = 0.0  # it streams this model's tokens already
                price = inst.price_usd_per_hour or self._topology_prices.get(inst.instance_id, 0.0)
                arrivals = self._prefill_arrivals.get(inst.instance_id)
                timeline: tuple[tuple[float, int, int], ...] = ()
                if arrivals:
                    first = 0  # leading arrivals whose prefill ended over a horizon ago
                    while first < len(arrivals) and arrivals[first][3] < since:
                        first += 1
                    timeline = tuple(
                        ((t - now) / 1e6, n, cached) for t, n, cached, _ in arrivals[first:]
                    )
                out.append(
                    InstanceView(
                        region=name,
                        instance_id=inst.instance_id,
                        agent_endpoint=endpoint,
                        gpu_type=inst.gpu_type,
                        model=model,
                        healthy=inst.healthy,
                        num_requests_running=inst.num_requests_running,
                        num_requests_waiting=inst.num_requests_waiting + n_pending,
                        num_requests_outstanding=inst.num_requests_outstanding + n_pending,
                        kv_cache_usage=usage,
                        queued_prefill_tokens=inst.queued_prefill_tokens + pre,
                        queued_decode_tokens=inst.queued_decode_tokens + dec,
                        prefill_tokens_per_s=prefill_tps,
                        decode_tokens_per_s=decode_tps,
                        block_size=inst.block_size,
                        num_gpu_blocks=blocks,
                        max_model_len=max_len,
                        price_usd_per_hour=price,
                        egress_usd_per_gb=egress,
                        state_age_ms=age_ms,
                        pending_placements=n_pending,
                        tightest_inflight_tpot_ms=self.tightest_inflight_tpot_ms(
                            name, inst.instance_id, now
                        ),
                        swappable=inst.swappable,
                        model_load_overhead_s=inst.model_load_overhead_s,
                        model_load_remaining_s=load_remaining_s,
                        weight_cache_models=weight_cache,
                        weight_cache_gb_per_s=cache_gb_per_s,
                        remote_weights_gb_per_s=remote_gb_per_s,
                        prefill_arrival_tokens_per_s=self.prefill_arrival_tokens_per_s(
                            inst.instance_id, now
                        ),
                        prefill_rate_window_s=self.prefill_rate_window_s,
                        online_fit=fit,
                        prefill_arrivals_ms=timeline,
                        state_prefill_tokens=inst.queued_prefill_tokens,
                        state_stamp_age_ms=stamp_age_ms,
                    )
                )
        return out

    # -- optimistic accounting -----------------------------------------------------------

    def record_placement(
        self,
        region: str,
        instance_id: str,
        request_id: str,
        prefill_tokens: int,
        decode_tokens: int,
        placed_unix_ns: int | None = None,
        one_way_ms: float = 0.0,
        switch_model: str = "",
        switch_max_model_len: int = 0,
        model_load_ms: float = 0.0,
        cached_tokens: int = 0,
        prefill_busy_ms: float = 0.0,
    ) -> None:
        """Adds a just-placed request to an instance's load until the agent's state shows it.

        Args:
            region: Region of the instance.
            instance_id: The instance.
            request_id: The request (for audit).
            prefill_tokens: Uncached prompt tokens the request will prefill.
            decode_tokens: Output tokens it is expected to decode.
            placed_unix_ns: Placement time; default now.
            one_way_ms: Delay from the scheduler to the agent (half the origin's RTT); a state
                stamped before the request can have reached the agent does not reflect it.
            switch_model: For a placement that switches the instance to another model: that
                model (the instance shows as loading it until the state reflects the switch).
            switch_max_model_len: The instance's context limit once switched, tokens.
            model_load_ms: The switch's load time ``M_q``, ms (it starts when the request
                reaches the agent).
            cached_tokens: Prompt tokens the instance holds already (its prefill's attention
                context before the first uncached token).
            prefill_busy_ms: Predicted time from its arrival to the end of its prefill (queue
                wait, model load and prefill), ms: its arrival stays on the queue-wait timeline
                until `PREFILL_TIMELINE_HORIZON_S` past that.
        """
        entry = self._regions.get(region)
        if entry is None:
            return
        placed = self.clock_ns() if placed_unix_ns is None else placed_unix_ns
        arrives = placed + int(one_way_ms * 1e6)
        tau_s = self.prefill_rate_window_s
        last = self._prefill_rate.get(instance_id)
        rate = prefill_tokens / tau_s
        if last is not None:
            rate += last[1] * math.exp(-max(0, placed - last[0]) / 1e9 / tau_s)
        self._prefill_rate[instance_id] = (placed, rate)
        arrivals = self._prefill_arrivals.setdefault(instance_id, [])
        keep_until = arrives + int(max(0.0, prefill_busy_ms) * 1e6)
        bisect.insort(arrivals, (arrives, prefill_tokens, cached_tokens, keep_until))
        # Leading arrivals whose prefill ended over a horizon ago (a long one still running
        # keeps the arrivals behind it: they queue behind it).
        cut = placed - int(PREFILL_TIMELINE_HORIZON_S * 1e9)
        old = 0
        while old < len(arrivals) and arrivals[old][3] < cut:
            old += 1
        old = max(old, len(arrivals) - PREFILL_TIMELINE_MAX_ARRIVALS)
        if old > 0:
            del arrivals[:old]
        queue = entry.pending.setdefault(instance_id, deque())
        queue.append(
            PendingPlacement(
                request_id,
                prefill_tokens,
                decode_tokens,
                arrives,
                switch_model=switch_model,
                switch_max_model_len=switch_max_model_len,
                loaded_unix_ns=arrives + int(model_load_ms * 1e6) if switch_model else 0,
            )
        )

    def prefill_arrival_tokens_per_s(
        self, instance_id: str, now_unix_ns: int | None = None
    ) -> float:
        """Recent rate of uncached prompt tokens placed on an instance, tokens per second.

        An exponentially decaying count of the placements' ``prefill_tokens`` (each adds
        ``tokens / tau`` and the sum decays as ``exp(-dt / tau)``, ``tau`` =
        ``prefill_rate_window_s``): the arrival rate of prefill work, whose steps the
        instance's running decodes share (see `slomesh.scheduler.predictor.tpot_ms`). Counts
        this scheduler's placements only.

        Returns:
            Tokens per second, 0 when nothing was placed there.
        """
        last = self._prefill_rate.get(instance_id)
        if last is None:
            return 0.0
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        dt_s = max(0, now - last[0]) / 1e9
        return last[1] * math.exp(-dt_s / self.prefill_rate_window_s)

    def pending_placements(self, region: str, instance_id: str) -> list[PendingPlacement]:
        """The pending placements of one instance, oldest first."""
        entry = self._regions.get(region)
        if entry is None:
            return []
        return list(entry.pending.get(instance_id, ()))

    def note_serving(
        self, region: str, instance_id: str, model: str, at_unix_ns: int | None = None
    ) -> None:
        """Records that an instance streamed tokens of `model` (a request's first token).

        It serves that model now, so any load of it there has ended, whatever the last state
        (published during the load) says is left of it: until a state stamped after
        `at_unix_ns` arrives, the view shows no load time left on the instance for `model`.

        Args:
            region: Region of the instance.
            instance_id: The instance.
            model: The model of the request it streamed.
            at_unix_ns: When the tokens came; default now.
        """
        entry = self._regions.get(region)
        if entry is None:
            return
        entry.serving[instance_id] = (model, self.clock_ns() if at_unix_ns is None else at_unix_ns)

    # -- requests in flight ----------------------------------------------------------------

    def track_inflight(
        self,
        region: str,
        instance_id: str,
        request_id: str,
        tpot_target_ms: float,
        expires_unix_ns: int | None = None,
    ) -> None:
        """Records a request running on an instance with its TPOT target.

        Every sequence of a decode batch waits for the same step, so a placement that slows
        the step slows them all; `tightest_inflight_tpot_ms` lets policies protect them.

        Args:
            region: Region of the instance.
            instance_id: The instance.
            request_id: The request.
            tpot_target_ms: Its TPOT target in ms (inf = none; then nothing is recorded).
            expires_unix_ns: Forget it after this time (for requests whose end the scheduler
                may never see, e.g. placed with `Place`); None = until `untrack_inflight`.
        """
        if math.isinf(tpot_target_ms):
            return
        self._inflight.setdefault((region, instance_id), {})[request_id] = (
            tpot_target_ms,
            expires_unix_ns,
        )

    def untrack_inflight(self, region: str, instance_id: str, request_id: str) -> None:
        """Forgets a request recorded with `track_inflight` (no error if unknown)."""
        requests = self._inflight.get((region, instance_id))
        if requests is not None:
            requests.pop(request_id, None)
            if not requests:
                del self._inflight[(region, instance_id)]

    def untrack_request(self, request_id: str) -> None:
        """Forgets a request wherever it was recorded."""
        for key in [k for k, reqs in self._inflight.items() if request_id in reqs]:
            self.untrack_inflight(key[0], key[1], request_id)

    def tightest_inflight_tpot_ms(
        self, region: str, instance_id: str, now_unix_ns: int | None = None
    ) -> float:
        """The smallest TPOT target (ms) of the requests in flight on an instance; inf if none.

        Expired entries are dropped on the way.
        """
        requests = self._inflight.get((region, instance_id))
        if not requests:
            return math.inf
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        tightest = math.inf
        expired = []
        for request_id, (target_ms, expires) in requests.items():
            if expires is not None and expires <= now:
                expired.append(request_id)
            elif target_ms < tightest:
                tightest = target_ms
        for request_id in expired:
            del requests[request_id]
        if not requests:
            del self._inflight[(region, instance_id)]
        return tightest

    # -- RTT -----------------------------------------------------------------------------

    def apply_rtt(self, report: state_pb2.RttReport) -> None:
        """Records the RTTs an agent measured from its region to its peers (ms)."""
        src = report.region
        for dst, rtt_ms in report.rtt_ms.items():
            if rtt_ms >= 0:
                self._rtt_measured[(src, dst)] = float(rtt_ms)

    def rtt_ms(self, origin: str, region: str) -> float:
        """Round-trip time between a client's origin region and a serving region, in ms.

        0 for the same region; else the latest agent measurement (either direction), else the
        topology's RTT matrix, else `unknown_rtt_ms`.
        """
        if origin == region:
            return 0.0
        key = (origin, region)
        measured = self._rtt_measured.get(key)
        if measured is None:
            measured = self._rtt_measured.get((region, origin))
        if measured is not None:
            return measured
        seed = self._rtt_seed.get(key)
        return seed if seed is not None else self.unknown_rtt_ms

    # -- WAN links -----------------------------------------------------------------------

    def apply_link_stats(
        self, report: state_pb2.LinkStatsReport, received_unix_ns: int | None = None
    ) -> None:
        """Records the WAN link statistics a region's KV transfer service published
        (`slomesh.transfer.link_stats`): the spare bandwidth of each link report.region -> peer,
        bytes/s. Negative or non-finite figures are ignored (logged)."""
        now = self.clock_ns() if received_unix_ns is None else received_unix_ns
        for dst, link in report.links.items():
            spare = link.spare_bytes_per_s
            if not (spare >= 0 and math.isfinite(spare)):
                logger.warning(
                    "ignoring link stats", extra={"src": report.region, "dst": dst, "spare": spare}
                )
                continue
            self._link_spare[(report.region, dst)] = (now, float(spare))

    def link_spare_bytes_per_s(
        self, src: str, dst: str, now_unix_ns: int | None = None
    ) -> float | None:
        """Bandwidth that a KV transfer a request waits on can expect from `src` to `dst`,
        bytes/s: the spare bandwidth last published for the link (capacity less the
        foreground's use; prefetch and prewarm yield to it) if younger than
        `link_stats_staleness_ms`; else the topology's configured capacity of the link; else
        None (unknown). ``math.inf`` for src == dst (no WAN link to cross).

        While foreground moves this scheduler ordered are still on the link
        (`link_queue_ms` > 0), a new one runs after them (first in, first out) at the
        bandwidth they were given, not at what they leave spare now: the published figure
        is then taken as at least that bandwidth (the moves count once, as the queue ahead,
        not also as load on the link)."""
        if src == dst:
            return math.inf
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        busy = self._link_busy_until.get((src, dst))
        queued_bytes_per_s = busy[1] if busy is not None and busy[0] > now else 0.0
        seen = self._link_spare.get((src, dst))
        if seen is not None and (now - seen[0]) / 1e6 <= self.link_stats_staleness_ms:
            return max(seen[1], queued_bytes_per_s)
        if self.topology is not None:
            try:
                return self.topology.link_capacity_bytes_per_s(src, dst)
            except KeyError:
                return None
        return None

    def record_kv_move(
        self, src: str, dst: str, nbytes: int, placed_unix_ns: int | None = None
    ) -> None:
        """Records a foreground KV move this scheduler ordered on the link ``src -> dst``:
        moves there are served first in, first out at the link's spare bandwidth, so the
        next one waits for it (`link_queue_ms`). A link of unknown or no spare bandwidth is
        not tracked.

        Args:
            src: Source region.
            dst: Destination region.
            nbytes: Bytes of the move (>= 0).
            placed_unix_ns: When it was ordered; default now.
        """
        now = self.clock_ns() if placed_unix_ns is None else placed_unix_ns
        spare = self.link_spare_bytes_per_s(src, dst, now)
        if src == dst or not spare or not math.isfinite(spare) or nbytes <= 0:
            return
        busy = self._link_busy_until.get((src, dst))
        start = max(now, busy[0]) if busy is not None else now
        self._link_busy_until[(src, dst)] = (start + int(nbytes / spare * 1e9), spare)

    def link_queue_ms(self, src: str, dst: str, now_unix_ns: int | None = None) -> float:
        """Time until the foreground KV moves this scheduler ordered on ``src -> dst`` are
        done (`record_kv_move`), ms; 0 when the link is free of them."""
        busy = self._link_busy_until.get((src, dst))
        if busy is None:
            return 0.0
        now = self.clock_ns() if now_unix_ns is None else now_unix_ns
        return max(0.0, (busy[0] - now) / 1e6)

    # -- KV index ------------------------------------------------------------------------

    def apply_kv_delta(self, delta: state_pb2.KvIndexDelta) -> bool:
        """Applies a region's prefix-index delta if it is the next in sequence.

        A delta from an unknown incarnation, or one that skips a sequence number, is buffered
        and a snapshot is requested; an old or repeated delta is ignored.

        Args:
            delta: The `KvIndexDelta` from `slomesh.region.<region>.kv`.

        Returns:
            True when the delta was applied to the index now.
        """
        region = delta.region
        now = self.clock_ns()
        track = self._kv.setdefault(region, _KvTrack())
        if track.awaiting_snapshot:
            self._buffer(track, delta)
            self._maybe_retry_snapshot(region, track, now)
            return False
        if track.incarnation == delta.agent_incarnation and track.seq is not None:
            if delta.seq <= track.seq:
                return False
            if delta.seq == track.seq + 1:
                self._apply_delta_instances(region, delta.instances)
                track.seq = delta.seq
                self.deltas_applied += 1
                return True
        logger.info(
            "kv index delta out of sequence; requesting snapshot",
            extra={
                "region": region,
                "incarnation": delta.agent_incarnation,
                "seq": delta.seq,
                "expected_seq": None if track.seq is None else track.seq + 1,
            },
        )
        self._buffer(track, delta)
        self._ask_snapshot(region, track, now)
        return False

    def apply_kv_snapshot(self, snapshot: state_pb2.KvIndexSnapshot) -> None:
        """Replaces a region's prefix index with a snapshot, then replays buffered deltas.

        Buffered deltas of the snapshot's incarnation with a higher seq are applied in order;
        if they do not continue the snapshot's seq without a gap, another snapshot is asked.
        """
        region = snapshot.region
        track = self._kv.setdefault(region, _KvTrack())
        for instance_id in self._index_instances.pop(region, set()):
            self.prefix_index.remove_instance(instance_id)
        self._apply_delta_instances(region, snapshot.instances)
        track.incarnation = snapshot.agent_incarnation
        track.seq = snapshot.seq
        track.awaiting_snapshot = False
        buffered = sorted(
            (
                d
                for d in track.buffered
                if d.agent_incarnation == snapshot.agent_incarnation and d.seq > snapshot.seq
            ),
            key=lambda d: d.seq,
        )
        track.buffered = []
        for i, delta in enumerate(buffered):
            if delta.seq == track.seq:
                continue
            if delta.seq != track.seq + 1:
                track.buffered = buffered[i:]
                self._ask_snapshot(region, track, self.clock_ns())
                return
            self._apply_delta_instances(region, delta.instances)
            track.seq = delta.seq
            self.deltas_applied += 1

    def snapshot_failed(self, region: str) -> None:
        """Records that a requested snapshot did not arrive; the next delta or state retries."""
        track = self._kv.get(region)
        if track is not None and track.awaiting_snapshot:
            track.requested_unix_ns = 0

    def kv_sequence(self, region: str) -> tuple[str | None, int | None, bool]:
        """(incarnation, last applied seq, awaiting a snapshot) of a region's KV index."""
        track = self._kv.get(region)
        if track is None:
            return None, None, False
        return track.incarnation, track.seq, track.awaiting_snapshot

    def cached_prefix_tokens(
        self, instance_ids: Sequence[str] | None, token_ids: Sequence[int]
    ) -> dict[str, int]:
        """Longest cached prefix of `token_ids` per instance, in tokens.

        Args:
            instance_ids: Instances to look up (None = every indexed instance).
            token_ids: The prompt, shape [prompt_tokens].

        Returns:
            instance id -> cached prefix tokens (a multiple of the instance's block size).
        """
        return self.prefix_index.match(token_ids, instance_ids)

    def _apply_delta_instances(
        self, region: str, instances: Iterable[state_pb2.InstanceBlockDelta]
    ) -> None:
        known = self._index_instances.setdefault(region, set())
        for inst_delta in instances:
            known.add(inst_delta.instance_id)
            self.prefix_index.apply_delta(inst_delta)

    def _buffer(self, track: _KvTrack, delta: state_pb2.KvIndexDelta) -> None:
        track.buffered.append(delta)
        if len(track.buffered) > self.max_buffered_deltas:
            del track.buffered[: len(track.buffered) - self.max_buffered_deltas]

    def _ask_snapshot(self, region: str, track: _KvTrack, now: int) -> None:
        if self.request_snapshot is None:
            # Nobody can fetch snapshots (e.g. a simulator feeding the view directly): adopt
            # the buffered deltas as they come, best effort.
            self._adopt_buffered(track)
            return
        track.awaiting_snapshot = True
        track.requested_unix_ns = now
        self.snapshots_requested += 1
        self.request_snapshot(region)

    def _adopt_buffered(self, track: _KvTrack) -> None:
        for delta in sorted(track.buffered, key=lambda d: d.seq):
            self._apply_delta_instances(delta.region, delta.instances)
            track.incarnation = delta.agent_incarnation
            track.seq = delta.seq
            self.deltas_applied += 1
        track.buffered = []
        track.awaiting_snapshot = False

    def _maybe_retry_snapshot(self, region: str, track: _KvTrack, now: int) -> None:
        if (now - track.requested_unix_ns) / 1e6 >= self.snapshot_retry_ms:
            self._ask_snapshot(region, track, now)
