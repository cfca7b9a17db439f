"""Discrete-event simulation of the multi-region mesh in virtual time.

The simulator replays a trace against the same pieces the live mesh runs, driven by a virtual
clock instead of the wall clock:

- **Engines**: one `slomesh.engine.model.Engine` per topology instance, with the GPU profile
  and the engine settings the emulator uses (`slomesh.emulator.server.EmulatorConfig`
  defaults: 8192 batched tokens, 256 sequences, 16-token KV blocks, prefix caching; the
  context limit of the instance or the topology's model, as the launcher passes it). Steps are
  chained back to back while an engine has work (the emulator's runner chains them on
  deadlines the same way); a request reaching an idle engine starts a step at once, one
  reaching a busy engine joins the next step.
- **Region agents** (`slomesh.sim.agent`): the agent's accounting, KV index and
  `RegionState`s; a state every ``state_period_ms`` and the KV index delta (when non-empty)
  every ``kv_flush_period_ms``, each delivered to the scheduler ``state_delay_ms`` later, as
  over NATS. Regions publish from ``warmup_ms`` before the first request (a running mesh has
  state before a replay starts), phase-shifted by ``i / n_regions`` of a period so that
  regions do not publish in lockstep.
- **Scheduler** (`slomesh.sim.scheduler.SimScheduler`): validation, the policy on a
  `ClusterView` on the virtual clock, optimistic placement accounting, in-flight TPOT
  tracking and the output lengths learned when a completed stream ends at the scheduler, as
  `services.global_scheduler`; and its best-effort queue, with a dispatch pass after every
  enqueue, state delivery and stream end at the scheduler, and when a queued request's
  ``best_effort_max_wait_ms`` expires. A queued request is sent on when a pass places it: its
  time queued is part of its client-side TTFT.
- **Model switches**: in a topology of several models each engine serves its instance's
  model; a request for another model reaching an idle swappable instance switches it (as the
  live agent does on a placement with ``loads_model``): the engine is rebuilt on the new model
  with an empty KV cache and serves nothing for ``M_q`` =
  `slomesh.engine.profiles.model_load_time_s` (the instance's start-up overhead plus the
  weights over the region's cache or remote bandwidth), requests reaching it meanwhile wait,
  and the region's weight cache holds the model afterwards. A request for a model its
  instance does not serve and cannot switch to fails with FAILED_PRECONDITION (the agent's
  "model not loaded").
- **KV moves and prefetches** (`slomesh.sim.wan`): one link per ordered region pair at the
  topology's capacity (`Topology.link_capacity_bytes_per_s`). A placement that moves prefix
  KV (`Prediction.transfer_source_instance`, the ``kv_moves`` profiles) puts the bytes on
  the link as foreground traffic -- first in, first out at full capacity, preempting
  prefetches -- plus the control round trips (two ``RTT(source, dest)``: manifest, then
  chunk stream); the request is held at the scheduler meanwhile, then the destination
  engine caches the prefix (`Engine.insert_cached_prefix`: its KV events reach the agent's
  index like any others) and the request is forwarded. The hot-prefix prefetch of a
  profile's ``kv_prefetch`` (`slomesh.scheduler.prefetch`) plans every ``period_s`` from the
  placements and sends its copies as background traffic on what the foreground leaves; a
  copy lands the same way. As the live scheduler does (`services.global_scheduler.prefetch`),
  each copy runs a one-token request for ``P + P[:2]`` on the source engine when planned (the
  export) and on the destination engine when it lands (the import, after the prefix is
  cached there); their GPU time is charged to the prefetch (``prefetch_gpu_usd``). The copy
  does not wait for the export's one step (a simplification: the live one does).
  The moved and prefetched bytes, the moves' transfer times and the prompt tokens served
  from prefetched blocks are in the records and the stats. The source's blocks are read
  as they were at the decision (their eviction during a move is not modelled).
- **WAN**: a request placed in region ``j`` from origin ``o`` reaches the agent
  ``rtt_ms(o, j) / 2`` after the decision, and every token reaches the client ``rtt/2`` after
  the step that produced it (`Topology.rtt_ms`, 0 within a region). As in the local mesh, the
  client talks to a scheduler replica in its own region: no WAN between client and scheduler.

Client-side timings are those of ``slomesh replay``: TTFT from the arrival (send) to the first
token at the client (``engine TTFT + RTT``), E2E to the last token, TPOT ``(E2E - TTFT) /
(tokens - 1)``. Requests are sent as replay sends them: token-id prompt, ``max_tokens`` = the
trace's output length, ``ignore_eos``, the trace's origin region and SLO class. A request the
scheduler refuses (RESOURCE_EXHAUSTED), cannot route (UNAVAILABLE) or rejects
(INVALID_ARGUMENT) fails and does not attain its SLO, as does a best-effort request the full
queue refuses (RESOURCE_EXHAUSTED).

How it runs: one heap of events (arrivals, requests reaching an agent, state and KV
publications and deliveries, stream ends at the scheduler), processed in time order (ties in
insertion order). Engines have no events of their own; they are advanced when something looks
at them or may change them -- a publication of their region, every scheduling decision (it must
see every stream that ended before it), a request reaching them: every step that starts
before that time is computed, and the outputs of the steps that have ended by then are
delivered, each at its own end time. Steady decode phases (no request waiting, every running
request decoding) are computed ahead as one run (`Engine.run_decode_steps`, exactly what
stepping one by one gives) up to the earliest time a new request could reach the engine: a
request already on its way, or the next arrival of each origin region plus half its RTT to the
engine's region. This is exact -- nothing reaches an engine earlier -- and `SimConfig.decode_runs`
turns it off to check that. Engine gauges in a published state include the step in flight (the
emulator's ``/metrics`` lag by that step, and the live agent scrapes every 100 ms).

Everything is deterministic: the trace's origins and SLO classes are fixed by the trace loader,
engine output tokens by ``seed`` and the request id, the policy's tie-breaking by its profile's
seed, and event order by time then insertion.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slomesh.engine import kv_cache as engine_kv
from slomesh.engine.model import DecodeRun, Engine, EngineConfig, EngineRequest, StepResult
from slomesh.engine.profiles import (
    get_model_spec,
    get_profile,
    switched_max_model_len,
)
from slomesh.report import RequestResult
from slomesh.scheduler.admission import BestEffortQueueFull
from slomesh.scheduler.policy import PlacementDecision, Policy, make_policy
from slomesh.scheduler.predictor import KV_MOVE_CONTROL_ROUND_TRIPS
from slomesh.scheduler.prefetch import HotPrefixTracker, PrefetchOrder
from slomesh.scheduler.validation import RequestValidationError, ValidatedRequest
from slomesh.scheduler.view import ClusterView
from slomesh.sim.agent import SimInstance, SimRegion
from slomesh.sim.scheduler import SimScheduler
from slomesh.sim.wan import WanLink
from slomesh.slo import SloConfig, load_slo_config
from slomesh.topology import Topology
from slomesh.traces import Trace, TraceRequest
from slomesh.v1 import scheduler_pb2

__all__ = [
    "EPOCH_UNIX_NS",
    "SimConfig",
    "SimOutcome",
    "SimRecord",
    "Simulator",
    "generate_request",
    "queue_wait_error",
]

EPOCH_UNIX_NS = 1_700_000_000 * 10**9
"""Unix time (ns) of virtual time 0, the first request's arrival (the view's clock reads
``EPOCH_UNIX_NS + virtual seconds * 1e9``)."""

# Event kinds, in no particular order (ties are broken by insertion order).
_ARRIVAL = 0
_AT_AGENT = 1
_STATE_TICK = 2
_KV_TICK = 3
_DELIVER_STATE = 4
_DELIVER_KV = 5
_STREAM_END = 6
_MODEL_LOADED = 7
_BEST_EFFORT_DEADLINE = 8
_MOVE_DONE = 9
_LINK_CHECK = 10
_PREFETCH_TICK = 11

#: A best-effort wait's expiry event fires this long after the deadline, seconds, so that the
#: virtual clock's rounding to whole nanoseconds cannot leave the entry a hair short of it.
_DEADLINE_SLACK_S = 1e-6


@dataclass
class SimConfig:
    """Settings of a simulation (the flags of ``slomesh sim``).

    Attributes:
        state_period_ms: Period of each region's `RegionState` publication, ms (> 0); the
            live agent's ``--state-hz 10`` is 100 ms.
        state_delay_ms: Delay from a publication (state or KV delta) to its delivery at the
            scheduler, ms (>= 0): a NATS hop and processing on one host by default. Raise it
            (e.g. to an inter-region RTT/2) to study staleness.
        kv_flush_period_ms: Period of KV index delta publication, ms (> 0); the live agent
            flushes every 50 ms.
        staleness_ms: The scheduler's staleness bound (``--staleness-ms``), ms (> 0).
        warmup_ms: Regions publish from this long before the first request, ms (>= 0); with
            less than ``state_delay_ms`` the first requests find no state (UNAVAILABLE).
        seed: Seed of the engines' output tokens (the emulator's ``--seed``).
        max_num_batched_tokens: Engine token budget per step (emulator default).
        max_num_seqs: Engine running-batch limit (emulator default).
        block_size: Tokens per KV block (emulator default, vLLM on GPU).
        enable_prefix_caching: Engines reuse cached prefixes (emulator default).
        decode_runs: Run steady decode phases many steps at a time
            (`Engine.run_decode_steps`); False steps one by one, with the same results,
            slower (for verification).
        request_path_ms: Latency of the serving stack on a request's way in, beyond the WAN:
            from the client's send to the engine's receipt (scheduler decision and forward,
            relay, agent, engine HTTP), ms (>= 0).
        token_path_ms: Latency of the serving stack on a token's way out, beyond the WAN: from
            the engine's step end to the client (engine HTTP stream, agent, relay, scheduler),
            ms (>= 0).

    The two path latencies default to what the spans of the local mesh (`slomesh up`, one
    host, Python services) show at their medians: 7 ms in, 7 ms out -- the per-service
    processing of every real deployment, which Vidur likewise models as CPU overhead next to
    the GPU's step time. Set them to 0 for an idealised stack, or to a deployment's own
    measurements.
    """

    state_period_ms: float = 100.0
    state_delay_ms: float = 5.0
    kv_flush_period_ms: float = 50.0
    staleness_ms: float = 1000.0
    warmup_ms: float = 500.0
    seed: int = 0
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    enable_prefix_caching: bool = True
    decode_runs: bool = True
    request_path_ms: float = 7.0
    token_path_ms: float = 7.0

    def __post_init__(self) -> None:
        for name in ("state_period_ms", "kv_flush_period_ms", "staleness_ms"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be > 0, got {value}")
        for name in ("state_delay_ms", "warmup_ms", "request_path_ms", "token_path_ms"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be >= 0, got {value}")
        # The engine settings are range-checked by EngineConfig.
        EngineConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            block_size=self.block_size,
        )


@dataclass(slots=True)
class SimRecord:
    """What happened to one request of the trace (virtual seconds; 0 = first arrival).

    Attributes:
        request_id: The trace's request id.
        arrival_s: When the client sent it.
        origin_region: The client's region.
        slo_class: SLO class name.
        prompt_tokens: Prompt length in tokens.
        output_tokens: ``max_tokens`` (the trace's output length).
        region: Serving region ("" when not placed).
        instance_id: Serving instance ("" when not placed).
        wan_rtt_ms: RTT between origin and serving region, ms.
        return_delay_s: From the engine producing a token to the client seeing it: RTT/2
            plus `SimConfig.token_path_ms`, seconds.
        at_agent_s: When it reached the serving region's agent (and engine).
        first_token_s: When the engine produced its first token (engine side).
        finish_s: When the engine produced its last token (engine side).
        completion_tokens: Tokens generated.
        cached_prompt_tokens: Prompt tokens the engine found in its prefix cache.
        outcome: The placement outcome ("placed", "best_effort", "refused", "unavailable";
            "queued" while it waits in the best-effort queue, or when the full queue refused
            or shed it) or "" when validation failed.
        best_effort_wait_ms: Time it spent in the scheduler's best-effort queue, ms.
        predicted_cost_usd: The placement's predicted GPU cost, USD.
        gpu_seconds: The engine's modelled GPU seconds of the request, its token-proportional
            share of its steps (`slomesh.engine.model`, ``RequestMetrics.gpu_seconds``); None
            until it finished.
        price_usd_per_hour: The price its instance is billed at (spot or on-demand,
            `Topology.instance_price_usd_per_hour`), USD/hour; None until it finished.
        predicted_ttft_ms: The placement's predicted TTFT, ms.
        predicted_queue_wait_ms: The placement's predicted queue wait (RWT) on the chosen
            instance, ms.
        model: The model the request asks for.
        predicted_model_load_ms: The placement's predicted model load time ``M_q``, ms (0
            when the instance served the model).
        loads_model: The placement switched the instance to the request's model.
        model_load_wait_s: Time the request waited at its instance for a model switch to
            end, seconds (0 when none).
        queue_wait_ms: Observed queue wait: from reaching the engine to its first scheduled
            step (vLLM's ``request_queue_time_seconds``), ms; None until scheduled.
        kv_move_bytes: KV bytes moved across the WAN for it before it ran (0: no move).
        kv_move_source_region: Region the prefix KV came from ("" when none moved).
        kv_move_prefix_tokens: The prefix the serving instance held once the move was done.
        predicted_transfer_ms: The placement's predicted ``transfer_ms``.
        kv_transfer_ms: Time from the decision until the move was done (the request then
            left the scheduler), ms.
        prefetched_prompt_tokens: Prompt tokens the engine served from blocks a hot-prefix
            prefetch had brought (`slomesh.scheduler.prefetch`).
        slo_feasible: The policy's verdict that the placement meets the SLO.
        policy: The policy that placed it.
        error_code: gRPC status code name of a failure ("" when it completed).
        error: Failure message.
    """

    request_id: str
    arrival_s: float
    origin_region: str
    slo_class: str
    prompt_tokens: int
    output_tokens: int
    region: str = ""
    instance_id: str = ""
    wan_rtt_ms: float = 0.0
    return_delay_s: float = 0.0
    at_agent_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    outcome: str = ""
    best_effort_wait_ms: float = 0.0
    predicted_cost_usd: float | None = None
    gpu_seconds: float | None = None
    price_usd_per_hour: float | None = None
    predicted_ttft_ms: float = 0.0
    predicted_queue_wait_ms: float = 0.0
    model: str = ""
    predicted_model_load_ms: float = 0.0
    loads_model: bool = False
    model_load_wait_s: float = 0.0
    queue_wait_ms: float | None = None
    slo_feasible: bool = False
    policy: str = ""
    error_code: str = ""
    error: str = ""
    kv_move_bytes: int = 0
    kv_move_source_region: str = ""
    kv_move_prefix_tokens: int = 0
    predicted_transfer_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    prefetched_prompt_tokens: int = 0
    _tokens: list[int] | None = None
    _block_hashes: list[int] | None = None
    _request: ValidatedRequest | None = None

    @property
    def ok(self) -> bool:
        """Whether the request completed."""
        return self.finish_s is not None and not self.error_code

    @property
    def client_end_s(self) -> float:
        """When the client saw the last token (or the failure)."""
        if self.finish_s is not None:
            return self.finish_s + self.return_delay_s
        return self.arrival_s

    def result(self) -> RequestResult:
        """The request as ``slomesh replay`` reports it (client-side timings, ms)."""
        r = RequestResult(
            request_id=self.request_id,
            origin_region=self.origin_region,
            slo_class=self.slo_class,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            region=self.region,
            instance_id=self.instance_id,
            predicted_cost_usd=self.predicted_cost_usd,
            gpu_seconds=self.gpu_seconds,
            price_usd_per_hour=self.price_usd_per_hour,
            predicted_ttft_ms=self.predicted_ttft_ms,
            slo_feasible=self.slo_feasible,
            policy=self.policy,
            error_code=self.error_code,
            error=self.error,
            kv_transfer_bytes=self.kv_move_bytes,
            kv_transfer_source_region=self.kv_move_source_region,
        )
        if self.ok:
            assert self.first_token_s is not None and self.finish_s is not None
            back_s = self.return_delay_s
            r.ok = True
            r.completion_tokens = self.completion_tokens
            r.cached_prompt_tokens = self.cached_prompt_tokens
            r.ttft_ms = (self.first_token_s + back_s - self.arrival_s) * 1000.0
            r.e2e_ms = (self.finish_s + back_s - self.arrival_s) * 1000.0
            n = self.completion_tokens
            r.tpot_ms = (r.e2e_ms - r.ttft_ms) / (n - 1) if n > 1 else 0.0
        return r


def queue_wait_error(
    records: Sequence[SimRecord], min_observed_ms: float = 50.0
) -> dict[str, float | int]:
    """Error of the placements' queue-wait (RWT) predictions against the observed waits.

    Compared per placed request that reached its first scheduled step: the RWT the policy
    predicted on the chosen instance at decision time (`Prediction.queue_wait_ms`) against the
    wait the engine then imposed (arrival at the engine to first scheduled step). The median
    absolute percentage error is over the requests that waited at least ``min_observed_ms``:
    below that, the wait is mostly the rest of the step in flight when the request arrives,
    which RWT does not model, and percentages of a few milliseconds mean little.

    Source: QLM (Patke et al., SoCC 2024) evaluates its RWT estimator the same way, by the
    relative error of predicted against measured waiting times.

    Args:
        records: The simulation's records.
        min_observed_ms: Smallest observed wait counted in the MdAPE, ms.

    Returns:
        ``{"placed": n, "compared": n waiting >= min_observed_ms, "min_observed_ms",
        "mdape": median |predicted - observed| / observed over those (NaN if none),
        "mae_ms": mean |predicted - observed| over all placed, "observed_p50_ms",
        "observed_p90_ms", "predicted_p50_ms"}``.
    """
    pairs = [
        (r.predicted_queue_wait_ms, r.queue_wait_ms)
        for r in records
        if r.queue_wait_ms is not None
    ]
    if not pairs:
        return {"placed": 0, "compared": 0, "min_observed_ms": min_observed_ms,
                "mdape": math.nan, "mae_ms": math.nan, "observed_p50_ms": math.nan,
                "observed_p90_ms": math.nan, "predicted_p50_ms": math.nan}
    predicted = np.array([p for p, _ in pairs])
    observed = np.array([o for _, o in pairs])
    big = observed >= min_observed_ms
    ape = np.abs(predicted[big] - observed[big]) / observed[big]
    return {
        "placed": len(pairs),
        "compared": int(big.sum()),
        "min_observed_ms": min_observed_ms,
        "mdape": float(np.median(ape)) if ape.size else math.nan,
        "mae_ms": float(np.mean(np.abs(predicted - observed))),
        "observed_p50_ms": float(np.percentile(observed, 50)),
        "observed_p90_ms": float(np.percentile(observed, 90)),
        "predicted_p50_ms": float(np.percentile(predicted, 50)),
    }


@dataclass
class SimOutcome:
    """Results of one simulation.

    Attributes:
        records: One per trace request, in trace (arrival) order.
        results: The same as `RequestResult`s (client-side view, as replay reports).
        duration_s: Virtual time from the first arrival to the last client-side completion.
        policy: Name of the policy.
        wall_s: Wall time the simulation took, seconds.
        stats: Counters of the run (events, engine steps, decode runs, publications, ...).
    """

    records: list[SimRecord]
    results: list[RequestResult]
    duration_s: float
    policy: str
    wall_s: float
    stats: dict[str, Any] = field(default_factory=dict)


DecisionHook = Callable[[float, ValidatedRequest, PlacementDecision, ClusterView], None]
"""Called after each placement decision with (virtual time s, request, decision, view)."""
DeliveryHook = Callable[[float, Any], None]
"""Called with (virtual time s, message) for each `RegionState` / `KvIndexDelta` delivered to
the scheduler, before it is applied."""


def generate_request(request: TraceRequest, model: str) -> scheduler_pb2.GenerateRequest:
    """The `GenerateRequest` a replay client sends for a trace request: token-id prompt,
    ``max_tokens`` = the trace's output length, ``ignore_eos``, origin region and SLO class."""
    return scheduler_pb2.GenerateRequest(
        request_id=request.request_id,
        model=model,
        prompt_token_ids=request.prompt_token_ids.tolist(),
        max_tokens=request.output_tokens,
        ignore_eos=True,
        slo_class=request.slo_class,
        origin_region=request.origin_region,
    )


class Simulator:
    """Simulates a topology serving traces under one placement policy (module docstring).

    Args:
        topology: Regions, instances, prices and RTTs.
        policy: A built-in policy name, a YAML profile path, a profile mapping, or a `Policy`.
            Names, paths and mappings are built afresh for every `run` (pickers keep state);
            a `Policy` object is used as given.
        config: Simulation settings.
        slo: SLO classes (default: the built-in ones).
        on_decision: Optional hook called after each placement decision.
        on_delivery: Optional hook called for each state/KV message delivered.

    Raises:
        slomesh.scheduler.policy.PolicyConfigError: unknown or invalid policy.
        ValueError: a topology model is unknown to the engine model, or an instance's KV
            cache is too small.
    """

    def __init__(
        self,
        topology: Topology,
        policy: str | Path | Mapping[str, Any] | Policy = "slomesh",
        config: SimConfig | None = None,
        slo: SloConfig | None = None,
        *,
        on_decision: DecisionHook | None = None,
        on_delivery: DeliveryHook | None = None,
    ) -> None:
        self.topology = topology
        self.policy_source = policy
        self.config = config if config is not None else SimConfig()
        self.slo = slo if slo is not None else load_slo_config()
        self.on_decision = on_decision
        self.on_delivery = on_delivery
        self.model = get_model_spec(topology.model.name)
        self.model_specs = {name: get_model_spec(name) for name in topology.model_names}
        # Fail early on a bad policy or engine configuration.
        self._make_policy()
        self._build_regions()

    def _make_policy(self) -> Policy:
        if isinstance(self.policy_source, Policy):
            return self.policy_source
        return make_policy(self.policy_source)

    def _build_regions(self) -> list[SimRegion]:
        topo = self.topology
        regions = []
        for region in topo.regions:
            instances = []
            for spec in region.instances:
                model = topo.instance_model(spec.id)
                engine = self._engine(
                    spec.gpu_type, model.name, topo.instance_max_model_len(spec.id)
                )
                on_demand, spot = topo.gpu_price_usd_per_hour(spec.gpu_type, region.cloud_region)
                instances.append(
                    SimInstance(
                        region.name,
                        spec,
                        engine,
                        model.name,
                        on_demand,
                        spot,
                        model.stream_interval,
                        topo.model_load_overhead_s(spec.id),
                    )
                )
            regions.append(
                SimRegion(region, instances, incarnation=f"sim-{region.name}", topology=topo)
            )
        return regions

    def _engine(self, gpu_type: str, model: str, max_model_len: int) -> Engine:
        """A fresh engine serving ``model`` on ``gpu_type`` with the simulation's settings."""
        cfg = self.config
        return Engine(
            get_profile(gpu_type),
            self.model_specs[model],
            EngineConfig(
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_num_seqs=cfg.max_num_seqs,
                block_size=cfg.block_size,
                enable_prefix_caching=cfg.enable_prefix_caching,
                max_model_len=max_model_len,
                seed=cfg.seed,
            ),
        )

    def run(
        self, trace: Trace, progress: Callable[[int, int], None] | None = None
    ) -> SimOutcome:
        """Simulates ``trace`` from scratch (fresh engines, agents, view and policy).

        Args:
            trace: The requests, arrival times already rate-scaled.
            progress: Optional callback ``(requests sent, total)`` called now and then.

        Returns:
            The outcome (records in trace order, results, virtual duration, counters).
        """
        return _Run(self, trace, progress).execute()


class _Run:
    """The mutable state of one simulation."""

    def __init__(
        self, sim: Simulator, trace: Trace, progress: Callable[[int, int], None] | None
    ) -> None:
        self.sim = sim
        self.cfg = sim.config
        self.topology = sim.topology
        self.trace = trace
        self.progress = progress
        self.policy = sim._make_policy()
        self.now = 0.0
        self.scheduler = SimScheduler(
            sim.topology,
            self.policy,
            sim.slo,
            self._clock_ns,
            staleness_ms=self.cfg.staleness_ms,
        )
        self.regions = sim._build_regions()
        self.region_by_name = {r.name: r for r in self.regions}
        self.instances: list[SimInstance] = [i for r in self.regions for i in r.instances]
        self.instance_by_id = {i.instance_id: i for i in self.instances}
        self.records: list[SimRecord] = []
        self.live: dict[str, SimRecord] = {}
        self.in_flight = 0
        self.arrivals_done = False
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.rtt_cache: dict[tuple[str, str], float] = {}
        # What may reach an engine next: per origin, the arrival times not yet processed
        # (with a cursor), and per instance, the requests already on their way to it.
        self.origin_arrivals: dict[str, list[float]] = {}
        for tr in trace.requests:
            self.origin_arrivals.setdefault(tr.origin_region, []).append(tr.arrival_s)
        self.origin_cursor = dict.fromkeys(self.origin_arrivals, 0)
        self.incoming: dict[str, list[float]] = {i.instance_id: [] for i in self.instances}
        # Requests waiting at an instance for its model switch to end, in arrival order.
        self.held: dict[str, list[SimRecord]] = {i.instance_id: [] for i in self.instances}
        self.stats = {
            "events": 0,
            "engine_steps": 0,
            "decode_runs": 0,
            "decode_run_steps": 0,
            "decisions": 0,
            "model_switches": 0,
            "kv_moves": 0,
            "kv_move_bytes": 0,
            "prefetches": 0,
            "prefetch_bytes": 0,
            "prefetch_egress_usd": 0.0,
            "prefetch_requests": 0,
            "prefetch_gpu_seconds": 0.0,
            "prefetch_gpu_usd": 0.0,
            "prefetched_prompt_tokens": 0,
            "preemptions": 0,
            "preemptions_by_instance": {},
        }
        # WAN links by (src, dst), made on first use (`slomesh.sim.wan`).
        self.links: dict[tuple[str, str], WanLink] = {}
        self.link_checks: dict[tuple[str, str], int] = {}  # link -> version checked for
        # Earliest a KV move decided now can reach a region: its control round trips on the
        # least RTT into it, when the policy moves KV.
        names = [r.name for r in self.regions]
        self.move_lead_s: dict[str, float] = {
            dst: (
                KV_MOVE_CONTROL_ROUND_TRIPS
                * min((self._rtt_ms(src, dst) for src in names if src != dst), default=math.inf)
                / 1000.0
                if self.policy.profile.kv_moves
                else math.inf
            )
            for dst in names
        }
        prefetch = self.policy.prefetch_config
        self.prefetch = HotPrefixTracker(prefetch) if prefetch is not None else None
        self.next_prefetch_s = math.inf
        # Engine block hashes each instance holds because a prefetch brought them.
        self.prefetched: dict[str, set[int]] = {i.instance_id: set() for i in self.instances}

    # -- clock and heap ------------------------------------------------------------------------

    def _clock_ns(self) -> int:
        return EPOCH_UNIX_NS + round(self.now * 1e9)

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    def _rtt_ms(self, origin: str, region: str) -> float:
        key = (origin, region)
        rtt = self.rtt_cache.get(key)
        if rtt is None:
            rtt = self.rtt_cache[key] = self.topology.rtt_ms(origin, region)
        return rtt

    # -- main loop -----------------------------------------------------------------------------

    def execute(self) -> SimOutcome:
        wall0 = time.perf_counter()
        cfg = self.cfg
        requests = self.trace.requests
        start = -cfg.warmup_ms / 1000.0
        n_regions = len(self.regions)
        for i in range(n_regions):
            phase = i / n_regions
            self._push(start + phase * cfg.state_period_ms / 1000.0, _STATE_TICK, i)
            self._push(start + phase * cfg.kv_flush_period_ms / 1000.0, _KV_TICK, i)
        if requests:
            self._push(requests[0].arrival_s, _ARRIVAL, 0)
        else:
            self.arrivals_done = True
        if self.prefetch is not None and requests:
            self.next_prefetch_s = requests[0].arrival_s + self.prefetch.config.period_s
            self._push(self.next_prefetch_s, _PREFETCH_TICK, None)
        heap = self.heap
        pop = heapq.heappop
        events = 0
        while heap:
            t, _, kind, payload = pop(heap)
            self.now = t
            events += 1
            if kind == _ARRIVAL:
                self._on_arrival(payload)
            elif kind == _AT_AGENT:
                self._on_at_agent(payload)
            elif kind == _STATE_TICK:
                self._on_state_tick(payload)
            elif kind == _KV_TICK:
                self._on_kv_tick(payload)
            elif kind == _DELIVER_STATE:
                if self.sim.on_delivery is not None:
                    self.sim.on_delivery(t, payload)
                self.scheduler.on_state(payload)
                self._dispatch_queued()
            elif kind == _DELIVER_KV:
                if self.sim.on_delivery is not None:
                    self.sim.on_delivery(t, payload)
                self.scheduler.on_kv(payload)
            elif kind == _STREAM_END:
                self._stream_end_at_scheduler(payload)
                self._dispatch_queued()
            elif kind == _MODEL_LOADED:
                self._on_model_loaded(payload)
            elif kind == _BEST_EFFORT_DEADLINE:
                self._dispatch_queued()
            elif kind == _MOVE_DONE:
                self._on_move_done(payload)
            elif kind == _LINK_CHECK:
                self._drain_link(self.links[payload])
            elif kind == _PREFETCH_TICK:
                self._on_prefetch_tick()
        if self.in_flight:
            raise RuntimeError(f"simulation ended with {self.in_flight} requests in flight")
        if len(self.scheduler.best_effort):
            raise RuntimeError(
                f"simulation ended with {len(self.scheduler.best_effort)} requests queued"
            )
        wall_s = time.perf_counter() - wall0
        if self.progress is not None:
            self.progress(len(requests), len(requests))
        duration_s = max((r.client_end_s for r in self.records), default=0.0)
        for inst in self.instances:
            self._count_preemptions(inst)
        self.stats.update(
            events=events,
            states_published=sum(r.published_states for r in self.regions),
            kv_deltas_published=sum(r.published_deltas for r in self.regions),
            kv_deltas_applied=self.scheduler.view.deltas_applied,
        )
        return SimOutcome(
            records=self.records,
            results=[r.result() for r in self.records],
            duration_s=duration_s,
            policy=self.policy.name,
            wall_s=wall_s,
            stats=dict(self.stats),
        )

    def _count_preemptions(self, inst: SimInstance) -> None:
        """Adds the preemptions of ``inst``'s engine (vLLM's ``num_preemptions``: a running
        request evicted for lack of KV blocks, recomputed later) to the stats, by instance; at
        the end of the run and before a model switch replaces the engine."""
        n = inst.engine.stats().num_preemptions_total
        if n:
            self.stats["preemptions"] += n
            by_instance = self.stats["preemptions_by_instance"]
            by_instance[inst.instance_id] = by_instance.get(inst.instance_id, 0) + n

    def _done(self) -> bool:
        return self.arrivals_done and self.in_flight == 0 and not len(self.scheduler.best_effort)

    # -- events --------------------------------------------------------------------------------

    def _next_input_s(self, inst: SimInstance) -> float:
        """Earliest time a request not yet at ``inst`` can reach it: a request on its way, or
        the next arrival of each origin region plus half its RTT to the instance's region."""
        incoming = self.incoming[inst.instance_id]
        bound = incoming[0] if incoming else math.inf
        # A KV move decided at an arrival reaches the region its control RTT later at best.
        lead_s = self.move_lead_s[inst.region]
        for origin, times in self.origin_arrivals.items():
            i = self.origin_cursor[origin]
            if i < len(times):
                t = times[i] + min(self._rtt_ms(origin, inst.region) / 2000.0, lead_s)
                bound = min(bound, t)
        # A queued best-effort request may be sent at any event from now on.
        queued_origins = {e.request.origin_region for e in self.scheduler.best_effort}
        for origin in queued_origins:
            bound = min(bound, self.now + min(self._rtt_ms(origin, inst.region) / 2000.0, lead_s))
        if self.prefetch is not None:
            # A prefetch ends no earlier than its link's lower bound, or after the next plan.
            bound = min(bound, self.next_prefetch_s)
            for (_, dst), link in self.links.items():
                if dst == inst.region:
                    end = link.next_background_end_s()
                    if end is not None:
                        bound = min(bound, end)
        return bound

    def _on_arrival(self, index: int) -> None:
        requests = self.trace.requests
        tr = requests[index]
        try:
            self._decide(index, tr)
        finally:
            # Until decided, the request may still go anywhere (see _next_input_s).
            self.origin_cursor[tr.origin_region] += 1

    def _decide(self, index: int, tr: TraceRequest) -> None:
        requests = self.trace.requests
        if index + 1 < len(requests):
            self._push(requests[index + 1].arrival_s, _ARRIVAL, index + 1)
        else:
            self.arrivals_done = True
        if self.progress is not None and index % 500 == 0:
            self.progress(index, len(requests))
        now = self.now
        # Any instance may receive this request without delay (a placement in the origin's
        # region), and the scheduler must have seen every stream that ended before now.
        for inst in self.instances:
            self._advance(inst, now)
        rec = SimRecord(
            request_id=tr.request_id,
            arrival_s=tr.arrival_s,
            origin_region=tr.origin_region,
            slo_class=tr.slo_class,
            prompt_tokens=tr.prompt_tokens,
            output_tokens=tr.output_tokens,
            model=tr.model or self.topology.model.name,
        )
        self.records.append(rec)
        msg = generate_request(tr, rec.model)
        tr.release_tokens()
        scheduler = self.scheduler
        try:
            vreq = scheduler.validate(msg)
        except RequestValidationError as err:
            rec.error_code = "INVALID_ARGUMENT"
            rec.error = str(err)
            return
        if scheduler.must_wait(vreq):
            # Best-effort requests wait ahead of it: it must not overtake them.
            self._enqueue(rec, vreq)
            return
        self._decided(rec, vreq, scheduler.place(vreq))

    def _decided(self, rec: SimRecord, vreq: ValidatedRequest, decision: PlacementDecision) -> None:
        """Acts on a placement decision taken now: queues, fails or sends the request."""
        now = self.now
        scheduler = self.scheduler
        self.stats["decisions"] += 1
        if self.sim.on_decision is not None:
            self.sim.on_decision(now, vreq, decision, scheduler.view)
        rec.outcome = decision.outcome
        rec.policy = decision.policy
        if decision.outcome == "queued":
            self._enqueue(rec, vreq)
            return
        chosen = decision.chosen
        if chosen is None or chosen.prediction is None:
            rec.error_code = "RESOURCE_EXHAUSTED" if decision.outcome == "refused" else "UNAVAILABLE"
            rec.error = decision.reason
            return
        p = chosen.prediction
        rec.region = chosen.region
        rec.instance_id = chosen.instance_id
        rec.predicted_cost_usd = p.gpu_cost_usd
        rec.predicted_ttft_ms = p.ttft_ms
        rec.predicted_queue_wait_ms = p.queue_wait_ms
        rec.predicted_model_load_ms = p.model_load_ms
        rec.loads_model = chosen.model_load is not None
        rec.slo_feasible = chosen.feasible
        rec.wan_rtt_ms = self._rtt_ms(rec.origin_region, chosen.region)
        rec._tokens = vreq.prompt_token_ids.tolist()
        rec._request = vreq
        scheduler.forwarded(vreq, chosen.region, chosen.instance_id)
        self.in_flight += 1
        rec.return_delay_s = (rec.wan_rtt_ms / 2 + self.cfg.token_path_ms) / 1000.0
        if self.prefetch is not None:
            self.prefetch.observe(rec.model, rec.origin_region, rec._tokens, now)
        if p.transfer_source_instance and p.bytes_moved:
            self._start_move(rec, p.transfer_source_region, p.bytes_moved, p.transfer_prefix_tokens)
            rec.predicted_transfer_ms = p.transfer_ms
            return
        self._forward(rec, now)

    def _forward(self, rec: SimRecord, now: float) -> None:
        """The request leaves the scheduler for its instance's agent at ``now``."""
        at_agent_s = now + (rec.wan_rtt_ms / 2 + self.cfg.request_path_ms) / 1000.0
        heapq.heappush(self.incoming[rec.instance_id], at_agent_s)
        self._push(at_agent_s, _AT_AGENT, rec)

    # -- KV moves and prefetches ---------------------------------------------------------------

    def _link(self, src: str, dst: str) -> WanLink:
        link = self.links.get((src, dst))
        if link is None:
            capacity = self.topology.link_capacity_bytes_per_s(src, dst)
            link = self.links[(src, dst)] = WanLink(src, dst, capacity)
        return link

    def _start_move(self, rec: SimRecord, src: str, nbytes: int, prefix_tokens: int) -> None:
        """A placement that moves prefix KV first (`Prediction.transfer_source_instance`):
        the move goes on the link ``src -> serving region`` as foreground traffic
        (`slomesh.sim.wan`: first in, first out, preempting prefetches), its control round
        trips (`KV_MOVE_CONTROL_ROUND_TRIPS` x ``RTT(src, dst)``, as the live protocol takes)
        are added at its end, and the request is held at the scheduler until then
        (`_on_move_done`)."""
        now = self.now
        link = self._link(src, rec.region)
        control_s = KV_MOVE_CONTROL_ROUND_TRIPS * self._rtt_ms(src, rec.region) / 1000.0
        done_s = link.foreground(nbytes, now) + control_s
        self._drain_link(link)
        rec.kv_move_bytes = nbytes
        rec.kv_move_source_region = src
        rec.kv_move_prefix_tokens = prefix_tokens
        rec.kv_transfer_ms = (done_s - now) * 1000.0
        self.stats["kv_moves"] += 1
        self.stats["kv_move_bytes"] += nbytes
        # The blocks reach the instance then: nothing computed ahead may pass it.
        heapq.heappush(self.incoming[rec.instance_id], done_s)
        self._push(done_s, _MOVE_DONE, rec)

    def _on_move_done(self, rec: SimRecord) -> None:
        """A foreground move ended: the serving instance caches the prefix (its KV events go
        to its agent's index like any others), and the request leaves the scheduler."""
        now = self.now
        inst = self.instance_by_id[rec.instance_id]
        self._advance(inst, now)
        heapq.heappop(self.incoming[inst.instance_id])  # after advancing: it bounds the run
        tokens = rec._tokens or []
        self._insert_prefix(inst, tokens[: rec.kv_move_prefix_tokens])
        self._forward(rec, now)

    def _insert_prefix(self, inst: SimInstance, token_ids: Sequence[int]) -> list[int]:
        """Caches a prefix that arrived over the WAN on ``inst`` now; returns the engine
        hashes of the blocks it added."""
        _, events = inst.engine.insert_cached_prefix(token_ids)
        self._on_kv_events(inst, events)
        return [
            h for ev in events if isinstance(ev, engine_kv.BlockStored) for h in ev.block_hashes
        ]

    def _drain_link(self, link: WanLink) -> None:
        """Accounts the link up to now, lands the prefetches that ended, and sets a check
        for the end of the one in service (once per link version)."""
        now = self.now
        link.advance(now)
        for job in link.take_finished():
            order: PrefetchOrder = job.payload
            inst = self.instance_by_id[order.dest_instance]
            self._advance(inst, now)
            added = self._insert_prefix(inst, order.token_ids)
            self.prefetched[inst.instance_id].update(added)
            self._prefetch_request(inst, order, now)  # the import
            assert self.prefetch is not None
            self.prefetch.done(order)
        end = link.next_background_end_s()
        key = (link.src, link.dst)
        if end is not None and self.link_checks.get(key) != link.version:
            self.link_checks[key] = link.version
            self._push(max(end, now), _LINK_CHECK, key)

    def _on_prefetch_tick(self) -> None:
        """Plans the hot-prefix prefetches (`slomesh.scheduler.prefetch`) and puts them on
        their links as background traffic."""
        tracker = self.prefetch
        assert tracker is not None
        now = self.now
        for order in tracker.plan(self.scheduler.view, now, self._clock_ns()):
            source = self.instance_by_id[order.source_instance]
            self._advance(source, now)
            self._prefetch_request(source, order, now)  # the export
            link = self._link(order.source_region, order.dest_region)
            link.background(order.bytes, order, now)
            self.stats["prefetches"] += 1
            self.stats["prefetch_bytes"] += order.bytes
            egress = self.topology.region(order.source_region).egress_usd_per_gb
            self.stats["prefetch_egress_usd"] += order.bytes / 1e9 * egress
            self._drain_link(link)
        if self._done():
            self.next_prefetch_s = math.inf
        else:
            self.next_prefetch_s = now + tracker.config.period_s
            self._push(self.next_prefetch_s, _PREFETCH_TICK, None)

    def _prefetch_request(self, inst: SimInstance, order: PrefetchOrder, now: float) -> None:
        """Sends a prefetch's one-token request for ``P + P[:2]`` to ``inst``'s engine at
        ``now`` (``inst`` advanced to ``now``), through its agent like the live one; skipped
        when the instance does not serve the order's model now (the live step fails)."""
        if inst.model_name != order.model or inst.loading_until_s is not None:
            return
        tokens = [int(t) for t in order.token_ids]
        prompt = tokens + tokens[:2]
        self.stats["prefetch_requests"] += 1
        request_id = f"prefetch:{self.stats['prefetch_requests']}"  # never a trace request's
        region = self.region_by_name[inst.region]
        try:
            inst.engine.add_request(
                EngineRequest(request_id, prompt, 1, ignore_eos=True), now_s=now
            )
        except ValueError:  # e.g. past the context limit: the live step fails the same way
            return
        inst.start_request(
            request_id, len(prompt), region.cached_prefix_tokens(inst, prompt), 1, now
        )
        if inst.next_start_s is None:
            inst.next_start_s = now

    def _prefetch_request_done(self, inst: SimInstance, request_id: str, gpu_s: float) -> None:
        """A prefetch's one-token request finished: its GPU time is the prefetch's cost."""
        inst.finish_request(request_id)
        self.stats["prefetch_gpu_seconds"] += gpu_s
        price = self.topology.instance_price_usd_per_hour(inst.instance_id)
        self.stats["prefetch_gpu_usd"] += gpu_s * price / 3600.0

    def _on_kv_events(self, inst: SimInstance, events: Sequence[engine_kv.KVEvent]) -> None:
        """An engine's KV events reach its agent; evicted blocks stop counting as
        prefetched."""
        if not events:
            return
        prefetched = self.prefetched[inst.instance_id]
        if prefetched:
            for ev in events:
                if isinstance(ev, engine_kv.BlockRemoved):
                    prefetched.difference_update(ev.block_hashes)
                elif isinstance(ev, engine_kv.AllBlocksCleared):
                    prefetched.clear()
        self.region_by_name[inst.region].on_kv_events(inst, events)

    def _enqueue(self, rec: SimRecord, vreq: ValidatedRequest) -> None:
        """Queues a best-effort request at the scheduler (refused when the queue is full), sets
        the event of its wait's expiry and runs a dispatch pass, as the live scheduler does."""
        rec.outcome = "queued"
        rec.policy = self.policy.name
        try:
            shed = self.scheduler.enqueue(vreq, rec)
        except (BestEffortQueueFull, ValueError) as err:
            rec.error_code = (
                "RESOURCE_EXHAUSTED" if isinstance(err, BestEffortQueueFull) else "ALREADY_EXISTS"
            )
            rec.error = str(err)
            return
        if shed is not None:
            dropped: SimRecord = shed.payload
            dropped.best_effort_wait_ms = shed.waited_ms(self._clock_ns())
            dropped.error_code = "RESOURCE_EXHAUSTED"
            dropped.error = (
                f"shed from the best-effort queue for a more urgent request (priority "
                f"{vreq.priority} < {shed.priority})"
            )
        wait_s = self.scheduler.best_effort.max_wait_ms / 1000.0
        self._push(self.now + wait_s + _DEADLINE_SLACK_S, _BEST_EFFORT_DEADLINE, None)
        self._dispatch_queued()

    def _dispatch_queued(self) -> None:
        """A dispatch pass over the scheduler's best-effort queue (every engine advanced to
        now first, as before any decision); each entry that leaves it is sent or fails."""
        if not len(self.scheduler.best_effort):
            return
        now = self.now
        for inst in self.instances:
            self._advance(inst, now)
        for dispatch in self.scheduler.dispatch_queued():
            rec: SimRecord = dispatch.entry.payload
            rec.best_effort_wait_ms = dispatch.waited_ms
            self._decided(rec, dispatch.entry.request, dispatch.decision)

    def _on_at_agent(self, rec: SimRecord) -> None:
        now = self.now
        inst = self.instance_by_id[rec.instance_id]
        region = self.region_by_name[inst.region]
        self._advance(inst, now)
        heapq.heappop(self.incoming[inst.instance_id])  # after advancing: it bounds the run
        if rec.model != inst.model_name:
            if not inst.can_switch():
                # The live agent answers FAILED_PRECONDITION: the model is not loaded there.
                rec.at_agent_s = now
                rec._tokens = None
                rec.error_code = "FAILED_PRECONDITION"
                rec.error = (
                    f"instance {inst.instance_id} serves {inst.model_name!r}, not "
                    f"{rec.model!r}, and cannot switch now"
                )
                self.in_flight -= 1
                self._stream_end(rec, now)
                return
            self._begin_switch(inst, region, rec.model, now)
        if inst.loading_until_s is not None:
            # Held until the switch ends; the agent accounts for it from now.
            rec.at_agent_s = now
            inst.start_request(rec.request_id, rec.prompt_tokens, 0, rec.output_tokens, now)
            self.live[rec.request_id] = rec
            self.held[inst.instance_id].append(rec)
            return
        self._to_engine(inst, region, rec, now)

    def _to_engine(self, inst: SimInstance, region: SimRegion, rec: SimRecord, now: float) -> None:
        """Forwards a request that reached its instance's agent to the engine (at ``now``)."""
        tokens = rec._tokens or []
        rec._tokens = None
        rec.at_agent_s = now
        if self.prefetched[inst.instance_id]:
            rec._block_hashes = engine_kv.compute_block_hashes(tokens, inst.block_size)
        if rec.request_id not in inst.outstanding:
            cached = region.cached_prefix_tokens(inst, tokens)
            inst.start_request(rec.request_id, rec.prompt_tokens, cached, rec.output_tokens, now)
        try:
            inst.engine.add_request(
                EngineRequest(rec.request_id, tokens, rec.output_tokens, ignore_eos=True),
                now_s=now,
            )
        except ValueError as err:
            # The engine answers HTTP 400; the agent and the scheduler pass INVALID_ARGUMENT on.
            inst.finish_request(rec.request_id)
            self.live.pop(rec.request_id, None)
            rec.error_code = "INVALID_ARGUMENT"
            rec.error = str(err)
            self.in_flight -= 1
            self._stream_end(rec, now)
            return
        self.live[rec.request_id] = rec
        if inst.next_start_s is None:
            inst.next_start_s = now

    def _begin_switch(self, inst: SimInstance, region: SimRegion, model: str, now: float) -> None:
        """Starts switching ``inst`` to ``model`` at ``now``: a fresh engine on the model, the
        instance's index cleared, ``M_q`` until it serves (module docstring)."""
        topo = self.topology
        ref = topo.model_ref(model)
        load_s, _ = topo.model_load_s(inst.instance_id, model, region.weight_cache_models)
        max_len = switched_max_model_len(
            get_profile(inst.gpu_type),
            self.sim.model_specs[model],
            ref.max_model_len,
            self.cfg.block_size,
        )
        engine = self.sim._engine(inst.gpu_type, model, max_len)
        self._count_preemptions(inst)
        region.clear_instance(inst)
        inst.begin_model_load(engine, model, ref.stream_interval, now + load_s)
        self.stats["model_switches"] += 1
        self._push(now + load_s, _MODEL_LOADED, (inst.instance_id, model))

    def _on_model_loaded(self, payload: tuple[str, str]) -> None:
        """A model switch ended: the region's cache holds the model, held requests go to the
        engine in arrival order."""
        instance_id, model = payload
        now = self.now
        inst = self.instance_by_id[instance_id]
        region = self.region_by_name[inst.region]
        region.cache_model(model)
        inst.engine_ready(now)
        held, self.held[instance_id] = self.held[instance_id], []
        for rec in held:
            assert rec.at_agent_s is not None
            rec.model_load_wait_s = now - rec.at_agent_s
            self._to_engine(inst, region, rec, now)

    def _on_state_tick(self, region_index: int) -> None:
        now = self.now
        region = self.regions[region_index]
        gauges = []
        for inst in region.instances:
            self._advance(inst, now)
            inst.tick(now)
            gauges.append(self._gauges(inst))
            inst.observe_step_times(gauges[-1])
        state = region.region_state(self._clock_ns(), gauges, now)
        self._push(now + self.cfg.state_delay_ms / 1000.0, _DELIVER_STATE, state)
        if not self._done():
            self._push(now + self.cfg.state_period_ms / 1000.0, _STATE_TICK, region_index)

    def _on_kv_tick(self, region_index: int) -> None:
        now = self.now
        region = self.regions[region_index]
        for inst in region.instances:
            self._advance(inst, now)
        delta = region.take_kv_delta(self._clock_ns())
        if delta is not None:
            self._push(now + self.cfg.state_delay_ms / 1000.0, _DELIVER_KV, delta)
        if not self._done():
            self._push(now + self.cfg.kv_flush_period_ms / 1000.0, _KV_TICK, region_index)

    # -- engines -------------------------------------------------------------------------------

    @staticmethod
    def _gauges(inst: SimInstance) -> tuple[int, int, float]:
        """(running, waiting, KV usage) of the engine after its step in flight."""
        engine = inst.engine
        run = inst.pending
        if type(run) is DecodeRun:
            j = inst.pending_step
            running = run.batch_size
            if j == run.num_steps - 1:
                running -= len(run.finished)
            usage = 1.0 - run.num_free_blocks[j] / engine.num_gpu_blocks
            return running, engine.num_waiting, usage
        return engine.num_running, engine.num_waiting, engine.kv.usage

    def _advance(self, inst: SimInstance, t: float) -> None:
        """Computes every step of ``inst`` that starts before ``t`` and delivers every output
        that exists by ``t`` (module docstring: lazy advancement)."""
        engine = inst.engine
        stats = self.stats
        while True:
            p = inst.pending
            if p is not None:
                if type(p) is DecodeRun:
                    j0 = j = inst.pending_step
                    k = len(p.start_s)
                    starts, durations = p.start_s, p.duration_s
                    while j < k and starts[j] + durations[j] <= t:
                        j += 1
                    if j > j0:
                        self._deliver_run(inst, p, j0, j)
                    if j < k:
                        inst.pending_step = j
                        return
                else:
                    if p.start_s + p.duration_s > t:
                        return
                    self._deliver_step(inst, p)
                inst.pending = None
                if not engine.has_work():
                    inst.next_start_s = None
                    return
            s = inst.next_start_s
            if s is None or s >= t:
                return
            # A run may go on past t: nothing can reach the engine before _next_input_s.
            run = (
                engine.run_decode_steps(s, until_s=max(t, self._next_input_s(inst)))
                if self.cfg.decode_runs
                else None
            )
            if run is not None:
                inst.pending = run
                inst.pending_step = 0
                inst.next_start_s = run.end_s
                stats["decode_runs"] += 1
                stats["decode_run_steps"] += len(run.start_s)
                stats["engine_steps"] += len(run.start_s)
                continue
            res = engine.step(s)
            if res.num_scheduled_tokens == 0:
                # Nothing schedulable (the emulator's runner then waits for a new request).
                self._deliver_step(inst, res)
                inst.next_start_s = None
                return
            stats["engine_steps"] += 1
            inst.pending = res
            inst.next_start_s = res.end_s

    def _deliver_step(self, inst: SimInstance, res: StepResult) -> None:
        end_s = res.start_s + res.duration_s
        live = self.live
        for fs in res.first_scheduled:
            rec = live.get(fs.request_id)
            if rec is not None:
                rec.cached_prompt_tokens = fs.num_cached_tokens
                if rec.at_agent_s is not None:
                    rec.queue_wait_ms = (res.start_s - rec.at_agent_s) * 1000.0
                if rec._block_hashes is not None:
                    self._count_prefetched(inst, rec, fs.num_cached_tokens)
        for out in res.outputs:
            rec = live.get(out.request_id)
            if rec is None:  # a prefetch's one-token request
                if out.finished:
                    m = next(m for m in res.finished if m.request_id == out.request_id)
                    self._prefetch_request_done(inst, out.request_id, m.gpu_seconds)
                continue
            n = len(out.new_token_ids)
            inst.tokens_received(out.request_id, n, end_s)
            if rec.first_token_s is None:
                rec.first_token_s = end_s
            rec.completion_tokens += n
            if out.finished:
                m = next(m for m in res.finished if m.request_id == out.request_id)
                self._finish(inst, rec, end_s, m.gpu_seconds)
        inst.engine_metrics.on_step(res)
        self._on_kv_events(inst, res.kv_events)

    def _count_prefetched(self, inst: SimInstance, rec: SimRecord, cached_tokens: int) -> None:
        """Counts the request's cached prompt tokens that prefetched blocks served."""
        hashes, rec._block_hashes = rec._block_hashes or [], None
        prefetched = self.prefetched[inst.instance_id]
        n = sum(1 for h in hashes[: cached_tokens // inst.block_size] if h in prefetched)
        rec.prefetched_prompt_tokens = n * inst.block_size
        self.stats["prefetched_prompt_tokens"] += rec.prefetched_prompt_tokens

    def _deliver_run(self, inst: SimInstance, run: DecodeRun, j0: int, j1: int) -> None:
        n = j1 - j0
        live = self.live
        ids = run.request_ids
        inst.decode_tokens_received(ids, n)
        inst.engine_metrics.on_decode_run(run, j0, j1)
        for rid in ids:
            rec = live.get(rid)
            if rec is not None:  # else a prefetch's one-token request
                rec.completion_tokens += n
        batch: list = []
        for evs in run.kv_events[j0:j1]:
            if evs:
                batch.extend(evs)
        self._on_kv_events(inst, batch)
        if j1 == len(run.start_s) and run.finished:
            end_s = run.end_s
            for m in run.finished:
                rec = live.get(m.request_id)
                if rec is None:
                    self._prefetch_request_done(inst, m.request_id, m.gpu_seconds)
                else:
                    self._finish(inst, rec, end_s, m.gpu_seconds)

    def _finish(self, inst: SimInstance, rec: SimRecord, end_s: float, gpu_seconds: float) -> None:
        rec.finish_s = end_s
        rec.gpu_seconds = gpu_seconds
        rec.price_usd_per_hour = self.topology.instance_price_usd_per_hour(rec.instance_id)
        inst.finish_request(rec.request_id)
        del self.live[rec.request_id]
        rec._request = None
        self.in_flight -= 1
        self._stream_end(rec, end_s)

    def _stream_end(self, rec: SimRecord, engine_s: float) -> None:
        """The end of the request's stream reaches the scheduler (and the client) its
        ``return_delay_s`` after the engine."""
        at = engine_s + rec.return_delay_s
        if at <= self.now:
            # Found while advancing past it; no decision was taken in between (decisions
            # advance every engine first), so applying it now keeps the order decisions see.
            self._stream_end_at_scheduler(rec)
        else:
            self._push(at, _STREAM_END, rec)

    def _stream_end_at_scheduler(self, rec: SimRecord) -> None:
        """The scheduler sees the stream end: it stops protecting the request's TPOT and, for
        a completion, learns its output length (trace requests always name their SLO class)."""
        self.scheduler.stream_ended(
            rec.region,
            rec.instance_id,
            rec.request_id,
            model=rec.model,
            slo_class=rec.slo_class,
            completion_tokens=rec.completion_tokens if rec.ok else 0,
        )
