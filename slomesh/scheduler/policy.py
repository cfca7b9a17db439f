"""Placement policies: filters, scorers and pickers composed by a profile.

A policy places one request in five steps:

1. every instance of every region with a state becomes a `Candidate`;
2. **filters** (hard constraints: healthy, fresh state, serves the model -- or, for the
   ``slomesh`` profiles, can switch to it first: `slomesh.scheduler.model_load` -- allowed
   regions) drop candidates; if none is left the request cannot be served now (gRPC
   UNAVAILABLE);
3. the survivors get a `Prediction` (`slomesh.scheduler.predictor`: RTT, queue wait,
   uncached prefill, decode, cost) and a feasibility verdict against the request's SLO with
   the profile's margin, and the objective ``E_q = e2e_ms / 1000 + alpha_s_per_usd * cost_usd``
   (DESIGN.md section 2: seconds of latency plus money converted to seconds); a prediction
   that leaves the profile's ``cost_first_slo_usage`` slack on every target is *cost-first*:
   it ranks ahead, with ``cost_first_alpha_s_per_usd`` (money decides) in its ``E_q``;
4. **admission** filters (``slo-feasible``; ``protect-inflight``: the requests already running
   there must keep their TPOT) drop candidates that would miss an SLO -- with the margin of
   the request's priority: a less urgent request must leave more of its targets unused
   (``priority_slo_margins``), which keeps headroom for more urgent ones and sheds the less
   urgent first under overload; if none is left, the request's tier decides: ``refuse``
   (RESOURCE_EXHAUSTED with a retry-after estimate) or ``best_effort``: the **fallback
   scorers** (by default the lowest predicted TTFT) pick among the survivors of the
   **best-effort admission** filters (by default ``protect-inflight``: it must not push the
   requests running there past their TPOT); with none, the decision is ``queued`` and the
   caller holds the request in its `slomesh.scheduler.admission.BestEffortQueue`, which
   places it again as the cluster changes and, once it has waited
   ``best_effort_max_wait_ms``, with ``wait_expired`` (fallback scorers over every survivor);
5. **scorers** give each remaining candidate a score in [0, 1] (higher is better), the
   weighted sum is formed, and the **picker** chooses.

Plugins are small classes registered by name (`slomesh.scheduler.registry`); a profile (YAML,
see ``configs/policies/``) lists them with parameters and weights, as llm-d's scheduler
profiles do. Built-in profiles:

- ``slomesh``: SLO-feasible with margin, lowest objective ``E_q``; refuse or best effort.
  It predicts output lengths from the client's hint, else a quantile of the lengths learned
  from completed requests of the same model and SLO class, else the class default, and never
  reads the true length (`slomesh.scheduler.output_length.OutputLengthPredictor.predict`, fed
  through ``ClusterView.output_lengths``).
- ``slomesh`` also weighs "move the prefix, then run here" (``kv_moves``): a candidate may
  wait for the longest prefix another region holds to be copied to it, then prefill only
  the rest (`PolicyProfile.kv_moves`, `slomesh.scheduler.predictor.plan_kv_move`).
- ``oracle``: ``slomesh`` with each request's true output length (``max_tokens`` of an
  ``ignore_eos`` request, as trace replays and the simulator send them): the same profile but
  ``predictor.use_true_output_length``; it bounds what output-length prediction can gain.

Baselines, all never refusing (no admission step):

- ``round-robin``: cycles over the healthy, fresh instances serving the model.
- ``least-load``: fewest outstanding requests (SkyServe's least-load policy).
- ``nearest``: the lowest-RTT region with a serving instance (the origin when it has one),
  then the fewest outstanding requests within it (`NearestRegionFilter`).
- ``llm-d``: llm-d's default weighted profile, 3 x prefix-cache hit fraction + 2 x queue score
  + 2 x (1 - KV-cache usage), max score (`PrefixCacheHitScorer`, `QueueDepthScorer`,
  `KvCacheUtilizationScorer`); region-agnostic.
- ``dynamo``: NVIDIA Dynamo's KV router, lowest ``w * prefill_blocks + decode_blocks`` with
  w = 1, temperature 0 (`KvOverlapCostScorer`, `SoftmaxSamplePicker`); region-agnostic.
- ``qlm``: QLM's request waiting time estimate only (`LowestQueueWaitScorer`).

Every policy (baselines included) sees the same `ClusterView`: the agents' last states plus
this scheduler's own placements not yet reflected in them, and the prefix index from KV
events. Region-agnostic baselines score every region's instances alike; the RTT they ignore
still reaches the client.

Source: llm-d inference scheduler (filter -> scorer -> picker plugins with weighted profiles);
SkyServe (Mao et al., EuroSys 2025) least-load policy; SLOs-Serve (Chen et al., 2025) soft
admission control (refuse or best effort when the SLO cannot be met); the baselines' own
sources are on their plugins.
"""

from __future__ import annotations

import abc
import copy
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from slomesh.scheduler import predictor as pred
from slomesh.scheduler.model_load import ModelLoad, plan_model_switch, remaining_load_ms
from slomesh.scheduler.predictor import Prediction, PredictorConfig
from slomesh.scheduler.prefetch import PrefetchConfig
from slomesh.scheduler.registry import FILTERS, PICKERS, PROFILES, SCORERS, UnknownNameError
from slomesh.scheduler.validation import ValidatedRequest
from slomesh.scheduler.view import ClusterView, InstanceView
from slomesh.v1 import scheduler_pb2

__all__ = [
    "Candidate",
    "Filter",
    "Outcome",
    "Picker",
    "PlacementContext",
    "PlacementDecision",
    "Policy",
    "PolicyConfigError",
    "PolicyProfile",
    "Scorer",
    "load_profile",
    "make_policy",
]

Outcome = Literal["placed", "best_effort", "queued", "refused", "unavailable"]


class PolicyConfigError(ValueError):
    """A policy profile is invalid; the message names the field."""


# -- data passed between plugins --------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    """One instance considered for a request.

    Attributes:
        instance: The instance's view (state plus pending placements).
        prediction: Predicted timings and cost; ``None`` if a filter dropped it first.
        feasible: The prediction meets the SLO with the profile's margin.
        objective: ``E_q`` in seconds (lower is better); NaN without a prediction.
        cost_first: The prediction leaves the profile's cost-first slack on every SLO target
            (`PolicyProfile.cost_first_slo_usage`): ``objective`` weighs its cost with
            ``cost_first_alpha_s_per_usd`` and it ranks ahead of every candidate that does not.
        rejected_by: Name of the filter that dropped it; "" while it is in the running.
        score: Weighted score from the scorers (higher is better); NaN if not scored.
        prefix_hit_tokens: Longest prefix of the prompt the instance holds, in tokens, as the
            prefix index reports it (a multiple of its block size; not clipped the way
            ``prediction.cached_prefix_tokens`` is); set with the prediction.
        model_load: The model switch the instance needs before it can serve the request
            (it serves another model now; `slomesh.scheduler.model_load`); set by the
            ``serves-model`` filter, ``None`` when it serves the request's model.
    """

    instance: InstanceView
    prediction: Prediction | None = None
    feasible: bool = False
    objective: float = math.nan
    cost_first: bool = False
    rejected_by: str = ""
    score: float = math.nan
    prefix_hit_tokens: int = 0
    model_load: ModelLoad | None = None

    @property
    def region(self) -> str:
        return self.instance.region

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    def audit(self) -> dict[str, Any]:
        """A flat JSON-able record of the candidate (for spans, logs and the ledger)."""
        out: dict[str, Any] = {
            "region": self.region,
            "instance_id": self.instance_id,
            "gpu_type": self.instance.gpu_type,
            "rejected_by": self.rejected_by,
        }
        p = self.prediction
        if p is not None:
            out.update(
                feasible=self.feasible,
                objective=round(self.objective, 6),
                score=None if math.isnan(self.score) else round(self.score, 6),
                ttft_ms=round(p.ttft_ms, 3),
                tpot_ms=round(p.tpot_ms, 3),
                inflight_tpot_ms=round(p.inflight_tpot_ms, 3),
                e2e_ms=round(p.e2e_ms, 3),
                rtt_ms=round(p.rtt_ms, 3),
                queue_wait_ms=round(p.queue_wait_ms, 3),
                prefill_ms=round(p.prefill_ms, 3),
                cached_prefix_tokens=p.cached_prefix_tokens,
                cost_usd=p.cost_usd,
                model_load_ms=round(p.model_load_ms, 3),
            )
            if p.transfer_source_instance:
                out.update(
                    transfer_ms=round(p.transfer_ms, 3),
                    bytes_moved=p.bytes_moved,
                    transfer_source_region=p.transfer_source_region,
                    transfer_source_instance=p.transfer_source_instance,
                    transfer_prefix_tokens=p.transfer_prefix_tokens,
                )
        load = self.model_load
        if load is not None:
            out.update(
                loads_model=load.model,
                unloads_model=load.from_model,
                weights_from_cache=load.from_cache,
            )
        return out


@dataclass(slots=True)
class PlacementContext:
    """What plugins may look at besides the candidates.

    Attributes:
        request: The validated request.
        view: The cluster view.
        now_unix_ns: Time of the decision.
        slo_margin: Fraction of each SLO target a feasible prediction may use: the profile's
            margin for the request's priority (`PolicyProfile.slo_margin_for`).
        predictor_config: The policy's predictor knobs.
        output_tokens: Predicted output length ``N_out`` of the request (set before the
            admission filters and scorers run; 0 until then).
    """

    request: ValidatedRequest
    view: ClusterView
    now_unix_ns: int
    slo_margin: float
    predictor_config: PredictorConfig = field(default_factory=PredictorConfig)
    output_tokens: int = 0


@dataclass(slots=True)
class PlacementDecision:
    """The outcome of placing one request.

    Attributes:
        request: The request.
        policy: Name of the policy that decided.
        outcome: ``placed`` (on a candidate; SLO-feasible unless the policy has no admission
            step), ``best_effort`` (no candidate feasible; placed anyway for a best-effort
            tier, where the best-effort admission filters allow, or anywhere once its wait
            expired), ``queued`` (best-effort tier, no candidate feasible nor spare: the
            caller queues it, `slomesh.scheduler.admission.BestEffortQueue`; `retry_after_ms`
            estimates when capacity frees), ``refused`` (no candidate feasible; gRPC
            RESOURCE_EXHAUSTED with `retry_after_ms`), ``unavailable`` (no candidate passed
            the filters; gRPC UNAVAILABLE).
        chosen: The chosen candidate (``None`` when refused or unavailable).
        candidates: Every candidate with its prediction and verdicts, for audit.
        retry_after_ms: For ``refused`` and ``queued``: when a retry may succeed, in ms.
        reason: Human-readable reason for refused/unavailable outcomes.
        decided_unix_ns: Time of the decision.
        decision_ms: Wall time the policy took, in ms.
    """

    request: ValidatedRequest
    policy: str
    outcome: Outcome
    chosen: Candidate | None
    candidates: list[Candidate]
    retry_after_ms: float | None = None
    reason: str = ""
    decided_unix_ns: int = 0
    decision_ms: float = 0.0

    @property
    def feasible(self) -> bool:
        """Whether the chosen candidate is predicted to meet the SLO with the margin."""
        return self.chosen is not None and self.chosen.feasible

    def record_in(self, view: ClusterView) -> None:
        """Adds the chosen placement to `view`'s optimistic load until the serving agent's
        state reflects it, and its KV move (if any) to the link's queue
        (`ClusterView.record_kv_move`); no-op when nothing was chosen. The live scheduler and
        the simulator both call this after every decision."""
        chosen = self.chosen
        if chosen is None or chosen.prediction is None:
            return
        load = chosen.model_load
        p = chosen.prediction
        view.record_placement(
            chosen.region,
            chosen.instance_id,
            self.request.request_id,
            prefill_tokens=p.uncached_prompt_tokens,
            decode_tokens=p.output_tokens,
            placed_unix_ns=self.decided_unix_ns,
            # A KV move holds the request at the scheduler until it is done.
            one_way_ms=p.rtt_ms / 2.0 + p.transfer_ms,
            switch_model=load.model if load is not None else "",
            switch_max_model_len=load.instance.max_model_len if load is not None else 0,
            model_load_ms=load.load_ms if load is not None else 0.0,
            cached_tokens=p.cached_prefix_tokens,
            prefill_busy_ms=p.queue_wait_ms + p.model_load_ms + p.prefill_ms,
        )
        if p.transfer_source_region and p.bytes_moved:
            view.record_kv_move(
                p.transfer_source_region, chosen.region, p.bytes_moved, self.decided_unix_ns
            )

    def to_placement(self, agent_endpoint: str) -> scheduler_pb2.Placement:
        """The `Placement` message for the chosen candidate.

        Args:
            agent_endpoint: The region agent's address as reachable from the request's origin.

        Raises:
            ValueError: nothing was chosen.
        """
        chosen = self.chosen
        if chosen is None or chosen.prediction is None:
            raise ValueError(f"no placement: outcome {self.outcome}")
        p = chosen.prediction
        return scheduler_pb2.Placement(
            request_id=self.request.request_id,
            region=chosen.region,
            instance_id=chosen.instance_id,
            agent_endpoint=agent_endpoint,
            predicted=p.to_pb(),
            cached_prefix_tokens=p.cached_prefix_tokens,
            predicted_cost_usd=p.gpu_cost_usd,
            objective=chosen.objective,
            policy=self.policy,
            origin_region=self.request.origin_region,
            slo_class=self.request.slo_class,
            slo_feasible=chosen.feasible,
            loads_model=chosen.model_load is not None,
            kv_transfer_source_region=p.transfer_source_region,
            kv_transfer_source_instance=p.transfer_source_instance,
            kv_transfer_prefix_tokens=p.transfer_prefix_tokens,
            kv_transfer_bytes=p.bytes_moved,
        )


# -- interfaces ---------------------------------------------------------------------------------


class Filter(abc.ABC):
    """Drops candidates that must not (or should not) serve the request.

    Most filters judge each candidate alone (`keep`); a filter that compares candidates
    (e.g. keeps only the nearest region) overrides `keep_many`, which the policy calls.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        """Whether `candidate` stays in the running."""

    def keep_many(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[bool]:
        """One verdict per candidate, in order (default: `keep` on each)."""
        return [self.keep(ctx, c) for c in candidates]


class Scorer(abc.ABC):
    """Scores candidates in [0, 1]; higher is better.

    Attributes:
        category: What the score is about ("latency", "cost", "load", "objective").
    """

    name: ClassVar[str] = ""
    category: ClassVar[str] = ""

    @abc.abstractmethod
    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """One score in [0, 1] per candidate, in order."""


class Picker(abc.ABC):
    """Chooses one candidate given their weighted scores."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def pick(
        self, ctx: PlacementContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> Candidate:
        """The chosen candidate (`candidates` is non-empty)."""


def lower_is_better(values: Sequence[float]) -> list[float]:
    """Min-max normalises `values` to scores in [0, 1] with the smallest value scoring 1.

    All-equal values all score 1; NaN or infinite values score 0.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(0.0)
        elif span <= 0:
            out.append(1.0)
        else:
            out.append((hi - v) / span)
    return out


# -- filters ------------------------------------------------------------------------------------


class HealthyFilter(Filter):
    """Keeps instances their agent reports healthy."""

    name = "healthy"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return candidate.instance.healthy


class FreshFilter(Filter):
    """Keeps instances whose region's state is within the view's staleness bound."""

    name = "fresh"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return candidate.instance.state_age_ms <= ctx.view.staleness_ms


class ServesModelFilter(Filter):
    """Keeps instances serving the request's model with room for its prompt and max_tokens;
    with ``allow_model_load``, also instances that can switch to the model first.

    A switch candidate (`slomesh.scheduler.model_load.plan_model_switch`) is an idle,
    swappable instance serving another model, whose GPU holds the request's model with room
    for prompt + max_tokens, and whose current model another healthy instance of a fresh
    region still serves (or is loading): a switch never takes the last server of a model
    away. The filter records the switch in `Candidate.model_load`; the prediction then adds
    its load time ``M_q`` and GPU seconds. Candidates that can serve the model neither way are
    dropped.

    Args:
        allow_model_load: Consider switch candidates (the ``slomesh`` and ``oracle``
            profiles); False keeps only instances serving the model (the baselines, which
            mirror routers that never load models).
    """

    name = "serves-model"

    def __init__(self, allow_model_load: bool = False):
        if not isinstance(allow_model_load, bool):
            raise TypeError(f"allow_model_load: must be true or false, got {allow_model_load!r}")
        self.allow_model_load = allow_model_load

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return self.keep_many(ctx, [candidate])[0]

    def keep_many(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[bool]:
        req = ctx.request
        need = req.prompt_tokens + req.max_tokens
        out: list[bool] = []
        servers: dict[str, int] | None = None
        weights_bytes: int | None = None
        model_max_len = 0
        for cand in candidates:
            inst = cand.instance
            cand.model_load = None
            if inst.model == req.model:
                out.append(not inst.max_model_len or need <= inst.max_model_len)
                continue
            if not self.allow_model_load or not inst.swappable:
                out.append(False)
                continue
            if servers is None:
                servers = self._servers_per_model(ctx)
                weights_bytes = ctx.view.model_weights_bytes(req.model)
                model_max_len = ctx.view.known_models().get(req.model, 0)
            plan = plan_model_switch(inst, req.model, weights_bytes, model_max_len)
            if plan is None or need > plan.instance.max_model_len or servers.get(inst.model, 0) < 2:
                out.append(False)
                continue
            cand.model_load = plan
            out.append(True)
        return out

    @staticmethod
    def _servers_per_model(ctx: PlacementContext) -> dict[str, int]:
        """Model -> healthy instances of fresh regions that serve or are loading it."""
        view = ctx.view
        counts: dict[str, int] = {}
        for region in view.regions():
            if not view.is_fresh(region, ctx.now_unix_ns):
                continue
            state = view.region_state(region)
            if state is None:
                continue
            for inst in state.instances:
                if inst.healthy and inst.model:
                    counts[inst.model] = counts.get(inst.model, 0) + 1
        return counts


class RegionAllowlistFilter(Filter):
    """Keeps instances in the listed regions (data residency, capacity reservations).

    Args:
        regions: Region names allowed to serve; must not be empty.
    """

    name = "region-allowlist"

    def __init__(self, regions: Sequence[str]):
        if not regions:
            raise ValueError("regions: the allowlist must name at least one region")
        self.regions = frozenset(regions)

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return candidate.region in self.regions


class ProtectInflightFilter(Filter):
    """Keeps candidates where the requests already running keep their TPOT: the predicted TPOT
    of their decodes with the request placed there (`Prediction.inflight_tpot_ms`: the shared
    decode step with the request added, stretched by the prefill arrivals with its own prompt
    counted) stays within the margin of the tightest TPOT target among them.

    DESIGN.md section 2: a placement must not push already-admitted requests on the instance
    past their SLO. The targets come from `ClusterView.track_inflight` (requests this scheduler
    placed).
    """

    name = "protect-inflight"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        p = candidate.prediction
        limit = candidate.instance.tightest_inflight_tpot_ms
        return p is None or math.isinf(limit) or p.inflight_tpot_ms <= ctx.slo_margin * limit


class KvRoomFilter(Filter):
    """Keeps candidates whose KV cache can hold the requests there and this one to their end,
    so that the engine need not preempt::

        demand   = kv_cache_usage * capacity + queued_prefill_tokens
                   + (num_requests_outstanding + 1) * N_out + N_p
        keep when demand <= capacity                     # tokens, capacity = blocks x block size

    ``kv_cache_usage * capacity`` is what the running sequences hold; ``queued_prefill_tokens``
    the prompts still waiting (their blocks are not allocated yet); each outstanding request
    (running or waiting, pending placements included) and this one may still add up to the
    predicted output length ``N_out`` (the policy's output-length quantile, the same for every
    request: the agents' ``queued_decode_tokens`` come from the clients' ``max_tokens``, which a
    real client sets far above its output, and which in a benchmark replay *is* the output);
    and the request pins its whole prompt, its cached prefix included (an idle cached block is
    not in the usage; once the request runs, it is).

    Why: vLLM admits a waiting request as soon as its prompt's blocks fit and, when the
    running decodes later outgrow the cache, preempts the newest running request and
    recomputes it (``vllm/v1/core/sched/scheduler.py``): its TPOT, and the TTFT of the
    requests queued behind the recompute, blow up. The Mooncake conversation trace (whole,
    simulated): at 0.6x load, 175 preemptions on the H100 and 76 on the A100 under slomesh
    with neither this filter nor the in-flight TPOT of ``protect-inflight`` (TPOT p99 443 ms
    on the H100); at 0.8x, 46 and 1 with that TPOT alone; none with both. SLO attainment
    barely moves with it (0.8x: 91.6 % with, 91.9 % without; 0.65x: 94.1 %, 94.0 %): the
    in-flight TPOT already keeps most decodes from outgrowing the cache, and this filter
    refuses a few more requests than it saves (docs/results/2026-11-22).

    Source: Llumnix (Sun et al., OSDI 2024), section 4.4: an instance's "virtual usage"
    counts the memory its queued requests and its running requests' decodes will need, and
    dispatching keeps instances away from preemption.
    """

    name = "kv-room"

    @staticmethod
    def demand_and_capacity_tokens(
        ctx: PlacementContext, inst: InstanceView
    ) -> tuple[float, float]:
        """``(demand, capacity)`` of the class docstring, in tokens."""
        config = ctx.predictor_config
        capacity = pred.kv_capacity_blocks(inst, config) * (
            inst.block_size or config.default_block_size
        )
        demand = (
            min(1.0, max(0.0, inst.kv_cache_usage)) * capacity
            + inst.queued_prefill_tokens
            + (inst.num_requests_outstanding + 1) * ctx.output_tokens
            + ctx.request.prompt_tokens
        )
        return demand, float(capacity)

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        demand, capacity = self.demand_and_capacity_tokens(ctx, candidate.instance)
        return demand <= capacity


class SloFeasibleFilter(Filter):
    """Keeps candidates predicted to meet the request's SLO with the profile's margin."""

    name = "slo-feasible"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return candidate.feasible


class NearestRegionFilter(Filter):
    """Keeps the candidates of the region nearest the request's origin (lowest RTT).

    Judged among the candidates still in the running: placed after the hard filters, it keeps
    the lowest-RTT region that has a healthy, fresh instance serving the model -- the origin
    region itself (RTT 0) whenever it has one, however busy. RTTs come from the view (agent
    measurements, else the topology's matrix). Regions within `tie_tolerance_ms` of the lowest
    RTT all stay. Alone, a candidate is always the nearest (`keep` is True); the policy calls
    `keep_many`.

    Source: latency-based ("nearest region") routing of geo load balancers, e.g. AWS Route 53
    latency-based routing and GeoDNS; what a multi-region deployment without a global
    scheduler does.

    Args:
        tie_tolerance_ms: RTTs within this of the lowest count as equally near, ms (>= 0).
    """

    name = "nearest-region"

    def __init__(self, tie_tolerance_ms: float = 0.0):
        if not tie_tolerance_ms >= 0:
            raise ValueError(f"tie_tolerance_ms: must be >= 0, got {tie_tolerance_ms}")
        self.tie_tolerance_ms = float(tie_tolerance_ms)

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return True

    def keep_many(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[bool]:
        origin = ctx.request.origin_region
        rtts: dict[str, float] = {}
        for cand in candidates:
            if cand.region not in rtts:
                rtts[cand.region] = ctx.view.rtt_ms(origin, cand.region)
        if not rtts:
            return []
        limit = min(rtts.values()) + self.tie_tolerance_ms
        return [rtts[c.region] <= limit for c in candidates]


# -- scorers ------------------------------------------------------------------------------------


class ObjectiveScorer(Scorer):
    """Lowest objective ``E_q`` (predicted E2E plus alpha-weighted cost) scores highest.

    Cost-first candidates (`Candidate.cost_first`) rank ahead of the others: they score in
    [0.5, 1] by their ``E_q``, the others in [0, 0.5] by theirs.
    """

    name = "objective"
    category = "objective"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        if not any(c.cost_first for c in candidates):
            return lower_is_better([c.objective for c in candidates])
        first = lower_is_better([c.objective if c.cost_first else math.inf for c in candidates])
        rest = lower_is_better([math.inf if c.cost_first else c.objective for c in candidates])
        return [
            0.5 + 0.5 * f if c.cost_first else 0.5 * r
            for c, f, r in zip(candidates, first, rest, strict=True)
        ]


class LowestTtftScorer(Scorer):
    """Lowest predicted TTFT scores highest."""

    name = "lowest-ttft"
    category = "latency"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        return lower_is_better(
            [c.prediction.ttft_ms if c.prediction else math.inf for c in candidates]
        )


class LeastOutstandingScorer(Scorer):
    """Fewest outstanding requests (forwarded, not finished) scores highest.

    Source: SkyServe (Mao et al., EuroSys 2025) least-load balancing policy.
    """

    name = "least-outstanding"
    category = "load"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        return lower_is_better([float(c.instance.num_requests_outstanding) for c in candidates])


class PrefixCacheHitScorer(Scorer):
    """Fraction of the prompt's full KV blocks the instance holds as a cached prefix.

    ``score = floor(h_i / B) / floor(N_p / B)`` with ``h_i`` the instance's longest cached
    prefix (tokens, from the prefix index fed by vLLM KV events) and ``B`` its block size;
    0 for a prompt shorter than one block (or a text prompt, which has no token ids).

    Source: llm-d inference scheduler / Gateway API Inference Extension ``prefix-cache-scorer``
    (kubernetes-sigs/gateway-api-inference-extension,
    pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go: score = matched prefix
    blocks / prompt blocks); llm-d's ``precise-prefix-cache-scorer`` takes the matches from
    KV events, as here.
    """

    name = "prefix-cache-hit"
    category = "affinity"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        prompt_tokens = ctx.request.prompt_tokens
        default_bs = ctx.predictor_config.default_block_size
        out = []
        for cand in candidates:
            block_size = cand.instance.block_size or default_bs
            total_blocks = prompt_tokens // block_size
            if total_blocks <= 0:
                out.append(0.0)
                continue
            out.append(min(1.0, (cand.prefix_hit_tokens // block_size) / total_blocks))
        return out


class QueueDepthScorer(Scorer):
    """Fewest waiting requests scores highest: ``(max_q - q_i) / (max_q - min_q)``, 1 if equal.

    ``q_i`` is the instance's engine queue (``vllm:num_requests_waiting``) plus this
    scheduler's placements its state does not show yet.

    Source: Gateway API Inference Extension ``queue-scorer``
    (kubernetes-sigs/gateway-api-inference-extension,
    pkg/epp/scheduling/framework/plugins/scorer/queue.go), used by llm-d's default profile.
    """

    name = "queue-depth"
    category = "load"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        return lower_is_better([float(c.instance.num_requests_waiting) for c in candidates])


class KvCacheUtilizationScorer(Scorer):
    """Free KV cache scores highest: ``1 - kv_cache_usage`` (``vllm:kv_cache_usage_perc``).

    Source: Gateway API Inference Extension ``kv-cache-utilization-scorer``
    (kubernetes-sigs/gateway-api-inference-extension,
    pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go), used by llm-d's
    default profile.
    """

    name = "kv-cache-utilization"
    category = "load"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        return [1.0 - min(1.0, max(0.0, c.instance.kv_cache_usage)) for c in candidates]


class KvOverlapCostScorer(Scorer):
    """NVIDIA Dynamo KV router's cost; the lowest cost scores highest (min-max normalised).

    ::

        cost_i           = w * prefill_blocks_i + decode_blocks_i
        prefill_blocks_i = (N_p - h_i + queued_prefill_tokens_i) / B_i
        decode_blocks_i  = round(kv_cache_usage_i * num_gpu_blocks_i)
                           + ceil(queued_prefill_tokens_i / B_i) + floor(N_p / B_i)

    Dynamo's router computes, per worker, the prefill tokens it would have with the request
    added (the request's uncached tokens plus the prefill tokens of its requests still in
    prefill) and the KV blocks its active sequences would hold (active blocks plus the
    request's blocks not already active). slomesh has no router-side sequence tracker, so the
    terms come from the region agent's state:

    - the uncached tokens ``N_p - h_i`` come from the prefix index (KV events), as Dynamo's
      overlap blocks do;
    - prefill tokens still to do: the agent's ``queued_prefill_tokens`` (plus this
      scheduler's placements not yet in the state -- Dynamo likewise counts a request the
      moment it routes it);
    - active blocks: the engine's KV blocks in use (``vllm:kv_cache_usage_perc`` x
      ``num_gpu_blocks``: running sequences, shared prefix blocks counted once, as in
      Dynamo's active set) plus the blocks of the prompts still waiting (not yet allocated by
      the engine, but in Dynamo's active set from routing on);
    - the request's new blocks: all ``floor(N_p / B)`` full prompt blocks. Dynamo subtracts
      blocks already held by *active* requests; the index cannot tell an active block from an
      idle cached one, so none is assumed shared (exact for a conversation's next turn, whose
      cached prefix belongs to a finished request).

    Source: NVIDIA Dynamo KV router (ai-dynamo/dynamo, lib/llm/src/kv_router/scheduler.rs,
    ``DefaultWorkerSelector::select_worker``: ``logit = overlap_weight *
    potential_prefill_block + decode_block``; potential blocks/tokens from
    lib/llm/src/kv_router/sequence.rs ``potential_blocks_and_tokens``); docs/router
    ``cost = overlap_score_weight * prefill_blocks + decode_blocks``, default weight 1.

    Args:
        overlap_score_weight: ``w``, Dynamo's ``--kv-overlap-score-weight`` (default 1; 0 =
            pure load balancing).
    """

    name = "kv-overlap-cost"
    category = "affinity"

    def __init__(self, overlap_score_weight: float = 1.0):
        if not (overlap_score_weight >= 0 and math.isfinite(overlap_score_weight)):
            raise ValueError(
                f"overlap_score_weight: must be finite and >= 0, got {overlap_score_weight}"
            )
        self.overlap_score_weight = float(overlap_score_weight)

    @staticmethod
    def blocks(ctx: PlacementContext, candidate: Candidate) -> tuple[float, int]:
        """(prefill_blocks, decode_blocks) of placing the request on `candidate` (see above)."""
        inst = candidate.instance
        config = ctx.predictor_config
        block_size = inst.block_size or config.default_block_size
        prompt_tokens = ctx.request.prompt_tokens
        uncached = max(0, prompt_tokens - candidate.prefix_hit_tokens)
        queued = max(0, inst.queued_prefill_tokens)
        prefill_blocks = (uncached + queued) / block_size
        in_use = round(
            min(1.0, max(0.0, inst.kv_cache_usage)) * pred.kv_capacity_blocks(inst, config)
        )
        decode_blocks = in_use + math.ceil(queued / block_size) + prompt_tokens // block_size
        return prefill_blocks, decode_blocks

    def cost(self, ctx: PlacementContext, candidate: Candidate) -> float:
        """Dynamo's cost (logit) of `candidate`, in KV blocks; lower is better."""
        prefill_blocks, decode_blocks = self.blocks(ctx, candidate)
        return self.overlap_score_weight * prefill_blocks + decode_blocks

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        return lower_is_better([self.cost(ctx, c) for c in candidates])


class LowestQueueWaitScorer(Scorer):
    """Lowest predicted queue wait (QLM's request waiting time) scores highest.

    The wait is `slomesh.scheduler.predictor.queue_wait_ms` for a request adding
    ``N_p + N_out`` KV tokens: the whole prompt (no prefix knowledge) plus the predicted
    output. No RTT, no prefill or decode time, no cost.

    Source: QLM (Patke et al., SoCC 2024), request waiting time (RWT) estimator: requests go
    to the instance whose queue they would wait on least.
    """

    name = "lowest-queue-wait"
    category = "latency"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        req = ctx.request
        config = ctx.predictor_config
        n_out = ctx.output_tokens or ctx.view.output_lengths.predict(req, config)
        new_kv_tokens = req.prompt_tokens + n_out
        return lower_is_better(
            [pred.queue_wait_ms(c.instance, new_kv_tokens, config) for c in candidates]
        )


# -- pickers ------------------------------------------------------------------------------------


class MaxScorePicker(Picker):
    """Highest weighted score; ties broken uniformly at random (seeded, reproducible).

    Args:
        seed: Seed of the tie-breaking random generator.
        tie_tolerance: Scores within this of the best count as tied.
    """

    name = "max-score"

    def __init__(self, seed: int = 0, tie_tolerance: float = 1e-9):
        self._rng = random.Random(seed)
        self.tie_tolerance = tie_tolerance

    def pick(
        self, ctx: PlacementContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> Candidate:
        best = max(scores)
        tied = [
            c for c, s in zip(candidates, scores, strict=True) if s >= best - self.tie_tolerance
        ]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RoundRobinPicker(Picker):
    """Cycles over the candidates in (region, instance id) order, ignoring scores."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, ctx: PlacementContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> Candidate:
        ordered = sorted(candidates, key=lambda c: (c.region, c.instance_id))
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return chosen


class SoftmaxSamplePicker(Picker):
    """Dynamo's worker selection: softmax sampling over the scores at a temperature.

    With ``temperature`` 0 (Dynamo's default) the highest score wins; ties go to the instance
    holding the fewest cached blocks (Dynamo breaks ties by the smallest prefix-tree size),
    then uniformly at random (seeded). With ``temperature`` T > 0 candidate ``i`` is drawn
    with probability proportional to ``exp(s_i / T)``. Dynamo samples
    ``exp(-(c_i / (c_max - c_min)) / T)`` over its costs ``c``; for a min-max normalised
    cost score ``s_i = (c_max - c_i) / (c_max - c_min)`` the two are the same distribution
    (softmax ignores a constant shift).

    Source: NVIDIA Dynamo KV router (ai-dynamo/dynamo, lib/llm/src/kv_router/scheduler.rs,
    ``softmax_sample`` and the tie-break in ``DefaultWorkerSelector::select_worker``).

    Args:
        temperature: Softmax temperature, >= 0 (Dynamo's ``--router-temperature``).
        seed: Seed of the sampling / tie-breaking random generator.
    """

    name = "softmax-sample"

    def __init__(self, temperature: float = 0.0, seed: int = 0):
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: must be finite and >= 0, got {temperature}")
        self.temperature = float(temperature)
        self._rng = random.Random(seed)

    def pick(
        self, ctx: PlacementContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> Candidate:
        if self.temperature == 0.0:
            best = max(scores)
            tied = [c for c, s in zip(candidates, scores, strict=True) if s >= best - 1e-12]
            if len(tied) > 1:
                index = ctx.view.prefix_index
                fewest = min(index.num_blocks(c.instance_id) for c in tied)
                tied = [c for c in tied if index.num_blocks(c.instance_id) == fewest]
            return tied[0] if len(tied) == 1 else self._rng.choice(tied)
        top = max(scores)
        weights = [math.exp((s - top) / self.temperature) for s in scores]
        return self._rng.choices(list(candidates), weights=weights, k=1)[0]


# -- profiles -----------------------------------------------------------------------------------


class PluginSpec(BaseModel):
    """One plugin in a profile: its registered name, weight (scorers only) and parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    params: dict[str, Any] = Field(default_factory=dict)


def _specs(value: Any) -> Any:
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class PolicyProfile(BaseModel):
    """A policy as configuration (a YAML file in ``configs/policies/``).

    Attributes:
        name: Policy name (reported in placements and the ledger).
        description: What the policy does.
        filters: Hard filters, applied in order.
        admission: SLO filters; when they leave nothing the request's ``on_infeasible`` (its
            tenant's tier, else its SLO class's) applies.
        scorers: Weighted scorers over the admitted candidates (may be empty for pickers that
            ignore scores, such as round-robin).
        picker: Chooses among the scored candidates.
        fallback_scorers: Scorers for best-effort placement when admission leaves nothing.
        best_effort_admission: Filters a best-effort placement must pass when no candidate
            meets the request's SLO (default ``protect-inflight``: it must not push the
            requests running there past their TPOT); none left -> the request is ``queued``.
        best_effort_max_wait_ms: Longest a queued best-effort request waits for a candidate
            the best-effort admission allows, ms (>= 0); then it goes to the fallback
            scorers' pick among every filter survivor (no starvation). 0 = never wait.
        best_effort_queue_limit: Best-effort requests queued at most (>= 0); beyond that a
            new one is refused with RESOURCE_EXHAUSTED and a retry hint, unless it is more
            urgent than the least urgent queued one, which is refused (shed) instead.
        slo_margin: Fraction of each SLO target a prediction may use to count as feasible,
            for priority 0 and more urgent requests (unless `priority_slo_margins` says
            otherwise).
        priority_slo_margins: Priority -> SLO margin cap for less urgent requests: a request
            of priority ``p`` uses ``min(slo_margin, m)`` with ``m`` the margin listed for the
            greatest listed priority ``<= p``, and `slo_margin` when none is listed at or below
            ``p``. Each margin is in ``(0, 1]`` and no larger than that of any more urgent
            listed priority, so a less urgent request is admitted only where a more urgent
            one would be: the difference is headroom kept for urgent requests arriving before
            the next state update, and what sheds (or queues) the less urgent first under
            overload. Empty = `slo_margin` for every priority.
        alpha_s_per_usd: Seconds of latency one USD of cost is worth in ``E_q``.
        cost_first_slo_usage: Fraction of every SLO target (in [0, 1]; 0 = off) under which a
            prediction counts as *cost-first*: it leaves so much slack that money, not
            latency, should decide. Cost-first candidates rank ahead of the others, and among
            them ``E_q`` weighs cost with `cost_first_alpha_s_per_usd`; the others keep
            `alpha_s_per_usd`, so a request only tight placements can serve still gets the
            fastest. (A fast GPU wins E2E on nearly every request, which alone would fill the
            most expensive GPUs first even where a cheaper one meets the SLO comfortably.)
        cost_first_alpha_s_per_usd: Seconds of latency one USD is worth in ``E_q`` among
            cost-first candidates (>= 0).
        kv_moves: Also consider "move the prefix, then run here" for each candidate: when
            an instance of another region serving the same model (same block size) holds a
            longer cached prefix of the prompt, the candidate's *move* variant waits for
            those blocks to be copied over the WAN (`slomesh.scheduler.predictor.plan_kv_move`:
            control RTT + bytes / the link's spare bandwidth, egress priced in the cost) and
            prefills only the rest. A candidate takes its move variant only when that meets
            the SLO and recompute does not, or both do and the move ranks ahead (cost-first
            band, then the lower objective); a move never serves a request that misses its
            SLO anyway (`Policy._predict`).
        kv_move_min_blocks: Fewest KV blocks a move must carry to be considered, >= 1 (a
            shorter gain is not worth a WAN round trip and a decision-path prediction).
        kv_move_scope: Which cached prefixes a move may carry. ``whole-prompt`` (default):
            only one covering the whole prompt but its last token's block -- what an engine
            with vLLM's file-based ``ExampleConnector`` (and the emulator's KV store, which
            mirrors it) can load: it looks up the one object of exactly the request's
            ``align(len(prompt) - 1)`` tokens, so a moved shorter prefix of a longer prompt
            (the previous turn of a conversation) would never be read. ``prefix``: any
            prefix, for engines whose connector loads the longest stored prefix of a prompt
            (chunked stores such as LMCache); the simulator's engines can do either.
        kv_prefetch: `slomesh.scheduler.prefetch.PrefetchConfig` fields of the hot-prefix
            prefetch run beside the policy; empty (the default) = no prefetch.
        min_retry_after_ms: Floor of the retry hint of a refusal, ms.
        max_retry_after_ms: Cap of the retry hint of a refusal, ms.
        predictor: `PredictorConfig` fields.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    filters: list[PluginSpec] = Field(default_factory=list)
    admission: list[PluginSpec] = Field(default_factory=list)
    scorers: list[PluginSpec] = Field(default_factory=list)
    picker: PluginSpec = PluginSpec(name="max-score")
    fallback_scorers: list[PluginSpec] = Field(
        default_factory=lambda: [PluginSpec(name="lowest-ttft")]
    )
    best_effort_admission: list[PluginSpec] = Field(
        default_factory=lambda: [PluginSpec(name="protect-inflight")]
    )
    best_effort_max_wait_ms: float = Field(default=10_000.0, ge=0, allow_inf_nan=False)
    best_effort_queue_limit: int = Field(default=1024, ge=0)
    slo_margin: float = Field(default=0.9, gt=0, le=1)
    priority_slo_margins: dict[int, float] = Field(default_factory=dict)
    alpha_s_per_usd: float = Field(default=1000.0, ge=0, allow_inf_nan=False)
    cost_first_slo_usage: float = Field(default=0.0, ge=0, le=1)
    cost_first_alpha_s_per_usd: float = Field(default=100_000.0, ge=0, allow_inf_nan=False)
    kv_moves: bool = False
    kv_move_min_blocks: int = Field(default=16, ge=1)
    kv_move_scope: Literal["whole-prompt", "prefix"] = "whole-prompt"
    kv_prefetch: dict[str, Any] = Field(default_factory=dict)
    min_retry_after_ms: float = Field(default=100.0, ge=0)
    max_retry_after_ms: float = Field(default=30_000.0, gt=0)
    predictor: dict[str, Any] = Field(default_factory=dict)

    @field_validator(
        "filters",
        "admission",
        "scorers",
        "fallback_scorers",
        "best_effort_admission",
        mode="before",
    )
    @classmethod
    def _plugin_lists(cls, v: Any) -> Any:
        return _specs(v)

    @model_validator(mode="after")
    def _priority_margins(self) -> PolicyProfile:
        more_urgent = 1.0
        for priority in sorted(self.priority_slo_margins):
            margin = self.priority_slo_margins[priority]
            if not (0 < margin <= 1):
                raise ValueError(
                    f"priority_slo_margins.{priority}: must be in (0, 1], got {margin}"
                )
            if margin > more_urgent:
                raise ValueError(
                    f"priority_slo_margins.{priority}: {margin} exceeds the margin "
                    f"{more_urgent} of a more urgent priority (lower = more urgent)"
                )
            more_urgent = margin
        return self

    def slo_margin_for(self, priority: int) -> float:
        """The SLO margin of a request of `priority` (see `priority_slo_margins`).

        Args:
            priority: The request's priority; lower = more urgent (vLLM's convention).

        Returns:
            A fraction in ``(0, slo_margin]``, non-increasing in `priority`.
        """
        margin = self.slo_margin
        best = None
        for listed, value in self.priority_slo_margins.items():
            if listed <= priority and (best is None or listed > best):
                best = listed
                margin = min(self.slo_margin, value)
        return margin

    @field_validator("picker", mode="before")
    @classmethod
    def _picker(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


def _format(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "profile"
        parts.append(f"{loc}: {e['msg']}")
    return f"{where}: " + "; ".join(parts)


def load_profile(source: str | Path | Mapping[str, Any]) -> PolicyProfile:
    """A policy profile from a built-in name, a YAML file path, or a mapping.

    Raises:
        PolicyConfigError: unknown name, unreadable file, or invalid content (names the field).
    """
    if isinstance(source, Mapping):
        data: Any = dict(source)
        where = "policy profile"
    elif isinstance(source, str) and source in PROFILES:
        data = PROFILES.make(source)
        where = f"built-in policy {source!r}"
    else:
        path = Path(source)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            known = ", ".join(PROFILES.names())
            raise PolicyConfigError(
                f"policy: {str(source)!r} is neither a built-in policy ({known}) "
                "nor a YAML profile file"
            )
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise PolicyConfigError(f"policy: cannot read {path}: {err}") from None
        where = str(path)
    try:
        return PolicyProfile.model_validate(data)
    except ValidationError as err:
        raise PolicyConfigError(_format(err, where)) from None


# -- the policy ---------------------------------------------------------------------------------


class Policy:
    """A placement policy built from a profile (see the module docstring).

    Args:
        profile: The profile.

    Raises:
        PolicyConfigError: a plugin name is unknown or its parameters are invalid.
    """

    def __init__(self, profile: PolicyProfile):
        self.profile = profile
        self.name = profile.name
        try:
            self.filters: list[Filter] = [FILTERS.make(s.name, **s.params) for s in profile.filters]
            self.admission: list[Filter] = [
                FILTERS.make(s.name, **s.params) for s in profile.admission
            ]
            self.scorers: list[tuple[Scorer, float]] = [
                (SCORERS.make(s.name, **s.params), s.weight) for s in profile.scorers
            ]
            self.fallback_scorers: list[tuple[Scorer, float]] = [
                (SCORERS.make(s.name, **s.params), s.weight) for s in profile.fallback_scorers
            ]
            self.best_effort_admission: list[Filter] = [
                FILTERS.make(s.name, **s.params) for s in profile.best_effort_admission
            ]
            self.picker: Picker = PICKERS.make(profile.picker.name, **profile.picker.params)
            self.predictor_config = PredictorConfig(**profile.predictor)
            self.prefetch_config = (
                PrefetchConfig(**profile.kv_prefetch) if profile.kv_prefetch else None
            )
        except UnknownNameError as err:
            raise PolicyConfigError(f"policy {profile.name!r}: {err}") from None
        except (TypeError, ValueError) as err:
            raise PolicyConfigError(f"policy {profile.name!r}: {err}") from None

    def place(
        self,
        request: ValidatedRequest,
        view: ClusterView,
        now_unix_ns: int | None = None,
        exclude_regions: frozenset[str] = frozenset(),
        *,
        exclude_instances: frozenset[str] = frozenset(),
        wait_expired: bool = False,
    ) -> PlacementDecision:
        """Decides where `request` runs.

        Args:
            request: The validated request.
            view: The cluster view (not modified; the caller records the placement).
            now_unix_ns: Decision time; default the view's clock.
            exclude_regions: Regions not to consider (e.g. one that just failed the request);
                their candidates are marked ``rejected_by="excluded"``.
            exclude_instances: Instance ids not to consider: those a best-effort request
                queued ahead of this one is waiting for
                (`slomesh.scheduler.admission.BestEffortQueue.dispatch`); their candidates
                are marked ``rejected_by="queued-ahead"``.
            wait_expired: The request is a queued best-effort request that has waited the
                profile's ``best_effort_max_wait_ms``: when no candidate is feasible nor
                allowed by the best-effort admission, the fallback scorers pick among every
                filter survivor instead of queueing it again.

        Returns:
            The decision (see `PlacementDecision.outcome` for the five outcomes).
        """
        t0 = time.perf_counter()
        now = view.clock_ns() if now_unix_ns is None else now_unix_ns
        margin = self.profile.slo_margin_for(request.priority)
        ctx = PlacementContext(request, view, now, margin, self.predictor_config)
        candidates = [Candidate(inst) for inst in view.instances(now_unix_ns=now)]
        alive = candidates
        allowed = request.allowed_regions
        if exclude_regions or allowed or exclude_instances:
            # Hard constraints of the request itself, honoured under every policy: regions
            # that just failed it, its tenant's data residency, and the instances that
            # best-effort requests queued ahead of it wait for.
            alive = []
            for cand in candidates:
                if cand.region in exclude_regions:
                    cand.rejected_by = "excluded"
                elif allowed and cand.region not in allowed:
                    cand.rejected_by = "tenant-regions"
                elif cand.instance_id in exclude_instances:
                    cand.rejected_by = "queued-ahead"
                else:
                    alive.append(cand)

        alive = self._apply_filters(ctx, alive, self.filters)
        if not alive:
            if not candidates:
                reason = "no region has published state"
            elif allowed and all(c.rejected_by == "tenant-regions" for c in candidates):
                reason = (
                    f"tenant {request.tenant!r} may only be served in {sorted(allowed)}, "
                    "where no instance has published state"
                )
            elif any(c.rejected_by == "queued-ahead" for c in candidates):
                reason = (
                    "every instance that could serve it is awaited by best-effort requests "
                    "queued ahead of it"
                )
            else:
                reason = f"no healthy instance with fresh state serves model {request.model!r}"
                if allowed:
                    reason += f" in tenant {request.tenant!r}'s regions {sorted(allowed)}"
            return self._decision(ctx, "unavailable", None, candidates, t0, reason=reason)

        self._predict(ctx, alive, candidates)

        admitted = self._apply_filters(ctx, alive, self.admission)
        if not admitted:
            if request.on_infeasible == "best_effort":
                return self._best_effort(ctx, alive, candidates, t0, wait_expired)
            retry = self._retry_after_ms(ctx, alive)
            best = min(alive, key=lambda c: c.prediction.ttft_ms if c.prediction else math.inf)
            p = best.prediction
            target_ms = request.slo.ttft_target_ms(request.prompt_tokens)
            if all(c.rejected_by == KvRoomFilter.name for c in alive):
                reason = (
                    "no instance's KV cache has room for it beside the requests there "
                    f"({len(alive)} meet its SLO; kv-room)"
                )
            elif p is not None:
                reason = (
                    f"no placement meets SLO class {request.slo_class!r}: best predicted TTFT "
                    f"{p.ttft_ms:.0f} ms (target {target_ms:.0f} ms), TPOT {p.tpot_ms:.1f} ms "
                    f"(target {request.slo.tpot_target_ms():.0f} ms) at {best.instance_id}"
                )
            else:
                reason = "no feasible placement"
            return self._decision(
                ctx, "refused", None, candidates, t0, reason=reason, retry_after_ms=retry
            )
        chosen = self._choose(ctx, admitted, self.scorers, self.picker.pick)
        return self._decision(ctx, "placed", chosen, candidates, t0)

    # -- steps --------------------------------------------------------------------------------

    def _best_effort(
        self,
        ctx: PlacementContext,
        alive: list[Candidate],
        candidates: list[Candidate],
        t0: float,
        wait_expired: bool,
    ) -> PlacementDecision:
        """A best-effort-tier request no candidate admits: placed where the best-effort
        admission filters allow (the fallback scorers pick), else anywhere once its wait
        expired, else ``queued`` with a retry estimate."""
        spare = self._apply_filters(ctx, alive, self.best_effort_admission)
        if spare or wait_expired:
            pool = spare or alive
            chosen = self._choose(ctx, pool, self.fallback_scorers, self._best_effort_pick)
            return self._decision(ctx, "best_effort", chosen, candidates, t0)
        req = ctx.request
        checks = ", ".join(f.name for f in self.best_effort_admission)
        reason = (
            f"no placement meets SLO class {req.slo_class!r} at priority {req.priority} "
            f"and none passes the best-effort admission ({checks}): requests running there "
            "would miss their SLO"
        )
        retry = self._retry_after_ms(ctx, alive)
        return self._decision(
            ctx, "queued", None, candidates, t0, reason=reason, retry_after_ms=retry
        )

    @staticmethod
    def _apply_filters(
        ctx: PlacementContext, candidates: list[Candidate], filters: Sequence[Filter]
    ) -> list[Candidate]:
        alive = candidates
        for flt in filters:
            if not alive:
                break
            kept = []
            for cand, ok in zip(alive, flt.keep_many(ctx, alive), strict=True):
                if ok:
                    kept.append(cand)
                else:
                    cand.rejected_by = flt.name
            alive = kept
        return alive

    def _objective(self, ctx: PlacementContext, p: pred.Prediction) -> tuple[bool, float]:
        """(cost-first, ``E_q`` in seconds) of a prediction: ``e2e_ms / 1000 + alpha * cost_usd``
        with alpha = ``cost_first_alpha_s_per_usd`` where the prediction uses at most
        ``cost_first_slo_usage`` of every SLO target, else ``alpha_s_per_usd``."""
        profile = self.profile
        req = ctx.request
        cost_first = (
            profile.cost_first_slo_usage > 0
            and p.slo_usage(req.slo, req.prompt_tokens) <= profile.cost_first_slo_usage
        )
        alpha = profile.cost_first_alpha_s_per_usd if cost_first else profile.alpha_s_per_usd
        return cost_first, p.e2e_ms / 1000.0 + alpha * p.cost_usd

    def _predict(
        self,
        ctx: PlacementContext,
        candidates: list[Candidate],
        sources: Sequence[Candidate] = (),
    ) -> None:
        """Predicts every candidate (and, with ``kv_moves``, its move variant: the class
        docstring of `PolicyProfile.kv_moves`); ``sources`` are the instances a prefix may be
        moved from (every instance of the view, filtered or not)."""
        req = ctx.request
        view = ctx.view
        tokens = req.prompt_token_ids
        moves = self.profile.kv_moves and len(tokens) > 0
        cached: dict[str, int] = {}
        if len(tokens):
            ids = [c.instance_id for c in candidates]
            if moves:
                ids.extend(c.instance_id for c in sources)
            cached = view.cached_prefix_tokens(ids, tokens)
        remote = self._move_sources(ctx, sources, cached) if moves else {}
        best_source: dict[tuple[str, int], tuple[int, InstanceView] | None] = {}
        config = self.predictor_config
        n_out = view.output_lengths.predict(req, config)
        ctx.output_tokens = n_out
        margin = ctx.slo_margin
        rtts: dict[str, float] = {}
        for cand in candidates:
            region = cand.region
            rtt = rtts.get(region)
            if rtt is None:
                rtt = rtts[region] = view.rtt_ms(req.origin_region, region)
            hit = cached.get(cand.instance_id, 0)
            inst = cand.instance
            load_ms, charge_load = 0.0, False
            if cand.model_load is not None:
                # A switch: the engine restarts on the request's model, its KV cache empty.
                inst, load_ms, charge_load = cand.model_load.instance, cand.model_load.load_ms, True
                hit = 0
            elif inst.model_load_remaining_s > 0:
                load_ms = remaining_load_ms(inst, rtt)
            p = pred.predict(
                inst,
                rtt_ms=rtt,
                prompt_tokens=req.prompt_tokens,
                cached_prefix_tokens=hit,
                output_tokens=n_out,
                config=config,
                model_load_ms=load_ms,
                charge_model_load=charge_load,
            )
            feasible = p.meets(req.slo, req.prompt_tokens, margin)
            cost_first, objective = self._objective(ctx, p)
            if remote and cand.model_load is None and load_ms == 0.0:
                move = self._kv_move(ctx, inst, hit, remote, best_source)
                if move is not None and self._move_may_win(
                    ctx, move, rtt, feasible, cost_first, objective
                ):
                    pm = pred.predict(
                        inst,
                        rtt_ms=rtt,
                        prompt_tokens=req.prompt_tokens,
                        cached_prefix_tokens=hit,
                        output_tokens=n_out,
                        config=config,
                        kv_move=move,
                    )
                    feasible_m = pm.meets(req.slo, req.prompt_tokens, margin)
                    cost_first_m, objective_m = self._objective(ctx, pm)
                    if feasible_m and (
                        not feasible
                        or (not cost_first_m, objective_m) < (not cost_first, objective)
                    ):
                        p, feasible, objective = pm, feasible_m, objective_m
                        cost_first = cost_first_m
            cand.prediction = p
            cand.prefix_hit_tokens = hit
            cand.feasible = feasible
            cand.objective = objective
            cand.cost_first = cost_first

    def _move_may_win(
        self,
        ctx: PlacementContext,
        move: pred.KvMove,
        rtt_ms: float,
        feasible: bool,
        cost_first: bool,
        objective: float,
    ) -> bool:
        """Whether a candidate's move variant is worth predicting: a move is kept only when
        it meets the SLO and ranks ahead of the recompute variant (`_predict`). Its TTFT is
        at least its RTT and transfer, so one whose TTFT target cannot hold them never
        meets the SLO; and against a feasible cost-first recompute (or any feasible one
        when the profile has no cost-first band) its objective is at least its egress at
        that band's alpha plus the same RTT and transfer."""
        req = ctx.request
        floor_ms = rtt_ms + move.transfer_ms
        if floor_ms > ctx.slo_margin * req.slo.ttft_target_ms(req.prompt_tokens):
            return False
        profile = self.profile
        if feasible and (cost_first or profile.cost_first_slo_usage <= 0):
            alpha = profile.cost_first_alpha_s_per_usd if cost_first else profile.alpha_s_per_usd
            return alpha * move.egress_cost_usd + floor_ms / 1000.0 < objective
        return True

    def _move_sources(
        self, ctx: PlacementContext, sources: Sequence[Candidate], cached: Mapping[str, int]
    ) -> dict[tuple[str, int], tuple[int, InstanceView]]:
        """(region, block size) -> (longest movable prefix in tokens, the instance holding
        it) among the healthy instances of fresh regions serving the request's model, for
        prefixes of at least ``kv_move_min_blocks`` blocks. A prefix is movable up to the
        last whole block before the prompt's last token (the engine recomputes that one); with
        ``kv_move_scope`` ``whole-prompt`` only a prefix that long is."""
        req = ctx.request
        default_bs = self.predictor_config.default_block_size
        min_blocks = self.profile.kv_move_min_blocks
        whole_prompt = self.profile.kv_move_scope == "whole-prompt"
        staleness_ms = ctx.view.staleness_ms
        out: dict[tuple[str, int], tuple[int, InstanceView]] = {}
        for src in sources:
            inst = src.instance
            hit = cached.get(inst.instance_id, 0)
            if (
                not hit
                or src.rejected_by == "excluded"
                or inst.model != req.model
                or not inst.healthy
                or inst.state_age_ms > staleness_ms
                or inst.model_load_remaining_s > 0
            ):
                continue
            block_size = inst.block_size or default_bs
            movable = (req.prompt_tokens - 1) // block_size * block_size
            hit = min(hit, movable)
            if hit < min_blocks * block_size or (whole_prompt and hit < movable):
                continue
            key = (inst.region, block_size)
            best = out.get(key)
            if best is None or hit > best[0]:
                out[key] = (hit, inst)
        return out

    def _kv_move(
        self,
        ctx: PlacementContext,
        inst: InstanceView,
        hit: int,
        remote: Mapping[tuple[str, int], tuple[int, InstanceView]],
        best_source: dict[tuple[str, int], tuple[int, InstanceView] | None],
    ) -> pred.KvMove | None:
        """The move to ``inst`` (holding ``hit`` prompt tokens) from the best source of
        another region: the longest prefix, then the shortest transfer (looked up once per
        destination region and block size, in ``best_source``); None when no source gains
        ``kv_move_min_blocks`` blocks or its link has no spare bandwidth."""
        view = ctx.view
        now = ctx.now_unix_ns
        block_size = inst.block_size or self.predictor_config.default_block_size
        key = (inst.region, block_size)
        if key not in best_source:
            kv_bytes = pred.kv_bytes_per_token(inst)
            best, best_rank = None, None
            for (region, bs), (h, src) in remote.items():
                if bs != block_size or region == inst.region:
                    continue
                spare = view.link_spare_bytes_per_s(region, inst.region, now)
                if not spare or not math.isfinite(spare):
                    continue
                ms = view.rtt_ms(region, inst.region) + view.link_queue_ms(region, inst.region, now)
                rank = (-h, ms + h * kv_bytes / spare * 1000.0)
                if best_rank is None or rank < best_rank:
                    best, best_rank = (h, src), rank
            best_source[key] = best
        best = best_source[key]
        if best is None or best[0] - hit < self.profile.kv_move_min_blocks * block_size:
            return None
        h, src = best
        return pred.plan_kv_move(
            source_region=src.region,
            source_instance=src.instance_id,
            source_prefix_tokens=h,
            cached_prefix_tokens=hit,
            block_size=block_size,
            kv_bytes_per_token=pred.kv_bytes_per_token(inst),
            control_rtt_ms=view.rtt_ms(src.region, inst.region),
            spare_bytes_per_s=view.link_spare_bytes_per_s(src.region, inst.region, now),
            egress_usd_per_gb=src.egress_usd_per_gb,
            link_queue_ms=view.link_queue_ms(src.region, inst.region, now),
        )

    @staticmethod
    def _best_effort_pick(
        ctx: PlacementContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> Candidate:
        best = max(scores)
        return next(c for c, s in zip(candidates, scores, strict=True) if s == best)

    @staticmethod
    def _choose(
        ctx: PlacementContext,
        candidates: list[Candidate],
        scorers: Sequence[tuple[Scorer, float]],
        pick: Any,
    ) -> Candidate:
        totals = [0.0] * len(candidates)
        for scorer, weight in scorers:
            if weight <= 0:
                continue
            for i, s in enumerate(scorer.score(ctx, candidates)):
                totals[i] += weight * s
        for cand, total in zip(candidates, totals, strict=True):
            cand.score = total
        return pick(ctx, candidates, totals)

    def _retry_after_ms(self, ctx: PlacementContext, candidates: list[Candidate]) -> float:
        """When a refused request may succeed: the least time any candidate needs to drain.

        Per candidate: if TTFT is over target, the queue must shrink by the excess (it drains
        at one ms per ms) -- possible only if the queue wait is at least the excess; if TPOT
        is over target (the request's own, or that of requests running there with its prefill
        added), the current decode work must finish (queued decode tokens / decode
        throughput, the drain time); if its KV cache lacks room (`KvRoomFilter`), enough of
        the ``n`` requests there must finish to release the missing tokens, each freeing what
        it holds or will (``held / n`` on average) when it ends, and they end evenly over the
        drain time: ``drain time x ceil(missing / (held / n)) / n``. A candidate no wait can
        fix (RTT and prefill alone too slow) contributes the cap. The result is clamped to
        [min_retry_after_ms, max_retry_after_ms].
        """
        req = ctx.request
        margin = ctx.slo_margin
        cap = self.profile.max_retry_after_ms
        best = cap
        ttft_target = margin * req.slo.ttft_target_ms(req.prompt_tokens)
        tpot_target = margin * req.slo.tpot_target_ms()
        e2e_target = margin * req.slo.e2e_target_ms()
        for cand in candidates:
            p = cand.prediction
            if p is None:
                continue
            need = 0.0
            excess = max(p.ttft_ms - ttft_target, p.e2e_ms - e2e_target, 0.0)
            if excess > 0:
                if p.queue_wait_ms < excess:
                    continue
                need = excess
            inst = cand.instance
            tpot_over = (
                p.tpot_ms > tpot_target
                or p.inflight_tpot_ms > margin * inst.tightest_inflight_tpot_ms
            )
            kv_full = cand.rejected_by == KvRoomFilter.name
            if tpot_over or kv_full:
                if inst.queued_decode_tokens <= 0:
                    continue
                drain_ms = (
                    inst.queued_decode_tokens
                    / pred.decode_throughput_tokens_per_s(inst, self.predictor_config)
                    * 1000.0
                )
                if tpot_over:
                    need = max(need, drain_ms)
                if kv_full:
                    demand, capacity = KvRoomFilter.demand_and_capacity_tokens(ctx, inst)
                    n = inst.num_requests_outstanding
                    held = demand - ctx.output_tokens - req.prompt_tokens
                    if n <= 0 or held <= 0:
                        continue  # none there to end, or its own prompt and output overflow
                    finish = math.ceil((demand - capacity) / (held / n))
                    if finish > n:
                        continue
                    need = max(need, drain_ms * finish / n)
            best = min(best, need)
        return min(cap, max(self.profile.min_retry_after_ms, best))

    def _decision(
        self,
        ctx: PlacementContext,
        outcome: Outcome,
        chosen: Candidate | None,
        candidates: list[Candidate],
        t0: float,
        *,
        reason: str = "",
        retry_after_ms: float | None = None,
    ) -> PlacementDecision:
        return PlacementDecision(
            request=ctx.request,
            policy=self.name,
            outcome=outcome,
            chosen=chosen,
            candidates=candidates,
            retry_after_ms=retry_after_ms,
            reason=reason,
            decided_unix_ns=ctx.now_unix_ns,
            decision_ms=(time.perf_counter() - t0) * 1000.0,
        )


def make_policy(source: str | Path | Mapping[str, Any], **overrides: Any) -> Policy:
    """Builds a policy from a built-in name, a YAML profile path, or a profile mapping.

    Args:
        source: A built-in name (``"slomesh"``, ``"oracle"``, ``"round-robin"``,
            ``"least-load"``, ``"nearest"``, ``"llm-d"``, ``"dynamo"``, ``"qlm"``), a path to a
            YAML profile, or a mapping with the profile's fields.
        **overrides: Profile fields to replace (e.g. ``slo_margin=0.8``).

    Raises:
        PolicyConfigError: unknown name or plugin, or invalid profile (names the field).
    """
    profile = load_profile(source)
    if overrides:
        try:
            profile = PolicyProfile.model_validate({**profile.model_dump(), **overrides})
        except ValidationError as err:
            raise PolicyConfigError(_format(err, f"policy {profile.name!r} overrides")) from None
    return Policy(profile)


# -- registrations: every built-in plugin and profile, in one place -----------------------------

for _cls in (
    HealthyFilter,
    FreshFilter,
    ServesModelFilter,
    RegionAllowlistFilter,
    SloFeasibleFilter,
    ProtectInflightFilter,
    KvRoomFilter,
    NearestRegionFilter,
):
    FILTERS.add(_cls.name, _cls)
for _cls in (
    ObjectiveScorer,
    LowestTtftScorer,
    LeastOutstandingScorer,
    PrefixCacheHitScorer,
    QueueDepthScorer,
    KvCacheUtilizationScorer,
    KvOverlapCostScorer,
    LowestQueueWaitScorer,
):
    SCORERS.add(_cls.name, _cls)
for _cls in (MaxScorePicker, RoundRobinPicker, SoftmaxSamplePicker):
    PICKERS.add(_cls.name, _cls)

#: Built-in profiles; ``configs/policies/<name>.yaml`` spell them out (a test keeps them equal).
BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "slomesh": {
        "name": "slomesh",
        "description": (
            "SLO-feasible placements (with a margin that tightens for less urgent priorities) "
            "at the lowest objective E_q = predicted e2e seconds + alpha_s_per_usd * "
            "predicted cost; when none is feasible: refuse with a retry hint, or for "
            "best-effort tiers the lowest TTFT among instances whose running requests keep "
            "their TPOT, else a best-effort queue (priority, then arrival; at most "
            "best_effort_max_wait_ms, then the lowest TTFT anywhere)."
        ),
        # allow_model_load: an idle swappable instance may load the request's model first.
        "filters": [
            "healthy",
            "fresh",
            {"name": "serves-model", "params": {"allow_model_load": True}},
        ],
        "admission": ["slo-feasible", "protect-inflight", "kv-room"],
        "scorers": [{"name": "objective", "weight": 1.0}],
        "picker": "max-score",
        "fallback_scorers": [{"name": "lowest-ttft", "weight": 1.0}],
        "best_effort_admission": ["protect-inflight", "kv-room"],
        "best_effort_max_wait_ms": 10_000.0,
        "best_effort_queue_limit": 1024,
        "slo_margin": 0.9,
        "priority_slo_margins": {1: 0.8, 2: 0.7},
        "alpha_s_per_usd": 1000.0,
        # Placements leaving 40 % of every SLO target unused go by cost (configs/policies/
        # slomesh.yaml gives the reasons and the measurements).
        "cost_first_slo_usage": 0.6,
        "cost_first_alpha_s_per_usd": 100_000.0,
        "kv_moves": True,
        "kv_move_min_blocks": 16,
    },
    "round-robin": {
        "name": "round-robin",
        "description": "Cycles over healthy, fresh instances serving the model; never refuses.",
        "filters": ["healthy", "fresh", "serves-model"],
        "scorers": [],
        "picker": "round-robin",
    },
    "least-load": {
        "name": "least-load",
        "description": (
            "Fewest outstanding requests among healthy, fresh instances serving the model "
            "(SkyServe least-load); never refuses."
        ),
        "filters": ["healthy", "fresh", "serves-model"],
        "scorers": [{"name": "least-outstanding", "weight": 1.0}],
        "picker": "max-score",
    },
    "nearest": {
        "name": "nearest",
        "description": (
            "The region nearest the request's origin (lowest RTT) among those with a healthy, "
            "fresh instance serving the model -- the origin itself when it has one -- then the "
            "fewest outstanding requests within it; never refuses."
        ),
        "filters": ["healthy", "fresh", "serves-model", "nearest-region"],
        "scorers": [{"name": "least-outstanding", "weight": 1.0}],
        "picker": "max-score",
    },
    "llm-d": {
        "name": "llm-d",
        "description": (
            "llm-d inference scheduler's default profile: 3 x prefix-cache hit fraction + "
            "2 x queue score (fewest waiting requests) + 2 x (1 - KV-cache usage), highest "
            "total wins; region-agnostic (ignores the WAN); never refuses."
        ),
        "filters": ["healthy", "fresh", "serves-model"],
        "scorers": [
            {"name": "prefix-cache-hit", "weight": 3.0},
            {"name": "queue-depth", "weight": 2.0},
            {"name": "kv-cache-utilization", "weight": 2.0},
        ],
        "picker": "max-score",
    },
    "dynamo": {
        "name": "dynamo",
        "description": (
            "NVIDIA Dynamo KV router: lowest cost = overlap_score_weight (1) x prefill blocks "
            "(uncached prompt + queued prefill) + decode blocks (active KV blocks with the "
            "request added), temperature 0; region-agnostic (ignores the WAN); never refuses."
        ),
        "filters": ["healthy", "fresh", "serves-model"],
        "scorers": [
            {"name": "kv-overlap-cost", "weight": 1.0, "params": {"overlap_score_weight": 1.0}}
        ],
        "picker": {"name": "softmax-sample", "params": {"temperature": 0.0}},
    },
    "qlm": {
        "name": "qlm",
        "description": (
            "QLM: the lowest predicted queue wait (request waiting time estimate) only -- no "
            "prefix, RTT or cost; never refuses."
        ),
        "filters": ["healthy", "fresh", "serves-model"],
        "scorers": [{"name": "lowest-queue-wait", "weight": 1.0}],
        "picker": "max-score",
    },
}

#: ``oracle``: the ``slomesh`` profile plus knowledge of each request's true output length
#: (``max_tokens`` of an ``ignore_eos`` request; see `PredictorConfig.use_true_output_length`).
BUILTIN_PROFILES["oracle"] = {
    **BUILTIN_PROFILES["slomesh"],
    "name": "oracle",
    "description": (
        "The slomesh policy with the true output length of each request (max_tokens of an "
        "ignore_eos request) instead of the client's hint, the learned output lengths or the "
        "SLO class default: an upper bound on what better output-length prediction can buy."
    ),
    "predictor": {"use_true_output_length": True},
}

for _name, _profile in BUILTIN_PROFILES.items():
    PROFILES.add(_name, lambda _p=_profile: copy.deepcopy(_p))
