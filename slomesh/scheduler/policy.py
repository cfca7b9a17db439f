"""Placement policies: filters, scorers and pickers composed by a profile.

A policy places one request in five steps:

1. every instance of every region with a state becomes a `Candidate`;
2. **filters** (hard constraints: healthy, fresh state, serves the model, allowed regions)
   drop candidates; if none is left the request cannot be served now (gRPC UNAVAILABLE);
3. the survivors get a `Prediction` (`slomesh.scheduler.predictor`: RTT, queue wait,
   uncached prefill, decode, cost) and a feasibility verdict against the request's SLO with
   the profile's margin, and the objective ``E_q = e2e_ms / 1000 + alpha_s_per_usd * cost_usd``
   (DESIGN.md section 2: seconds of latency plus money converted to seconds);
4. **admission** filters (``slo-feasible``; ``protect-inflight``: the requests already running
   there must keep their TPOT) drop candidates that would miss an SLO; if
   none is left, the SLO class decides: ``refuse`` (RESOURCE_EXHAUSTED with a retry-after
   estimate) or ``best_effort`` (the **fallback scorers** pick among all survivors, by default
   the lowest predicted TTFT);
5. **scorers** give each remaining candidate a score in [0, 1] (higher is better), the
   weighted sum is formed, and the **picker** chooses.

Plugins are small classes registered by name (`slomesh.scheduler.registry`); a profile (YAML,
see ``configs/policies/``) lists them with parameters and weights, as llm-d's scheduler
profiles do. Built-in profiles:

- ``slomesh``: SLO-feasible with margin, lowest objective ``E_q``; refuse or best effort.
- ``round-robin``: cycles over the healthy, fresh instances serving the model.
- ``least-load``: fewest outstanding requests (SkyServe's least-load policy).

Source: llm-d inference scheduler (filter -> scorer -> picker plugins with weighted profiles);
SkyServe (Mao et al., EuroSys 2025) least-load policy; SLOs-Serve (Chen et al., 2025) soft
admission control (refuse or best effort when the SLO cannot be met).
"""

from __future__ import annotations

import abc
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slomesh.scheduler import predictor as pred
from slomesh.scheduler.predictor import Prediction, PredictorConfig
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

Outcome = Literal["placed", "best_effort", "refused", "unavailable"]


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
        rejected_by: Name of the filter that dropped it; "" while it is in the running.
        score: Weighted score from the scorers (higher is better); NaN if not scored.
    """

    instance: InstanceView
    prediction: Prediction | None = None
    feasible: bool = False
    objective: float = math.nan
    rejected_by: str = ""
    score: float = math.nan

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
                e2e_ms=round(p.e2e_ms, 3),
                rtt_ms=round(p.rtt_ms, 3),
                queue_wait_ms=round(p.queue_wait_ms, 3),
                prefill_ms=round(p.prefill_ms, 3),
                cached_prefix_tokens=p.cached_prefix_tokens,
                cost_usd=p.cost_usd,
            )
        return out


@dataclass(slots=True)
class PlacementContext:
    """What plugins may look at besides the candidates.

    Attributes:
        request: The validated request.
        view: The cluster view.
        now_unix_ns: Time of the decision.
        slo_margin: Fraction of each SLO target a feasible prediction may use.
    """

    request: ValidatedRequest
    view: ClusterView
    now_unix_ns: int
    slo_margin: float


@dataclass(slots=True)
class PlacementDecision:
    """The outcome of placing one request.

    Attributes:
        request: The request.
        policy: Name of the policy that decided.
        outcome: ``placed`` (on a candidate; SLO-feasible unless the policy has no admission
            step), ``best_effort`` (no candidate feasible; placed anyway for a best-effort
            class), ``refused`` (no candidate feasible; gRPC RESOURCE_EXHAUSTED with
            `retry_after_ms`), ``unavailable`` (no candidate passed the filters; gRPC
            UNAVAILABLE).
        chosen: The chosen candidate (``None`` when refused or unavailable).
        candidates: Every candidate with its prediction and verdicts, for audit.
        retry_after_ms: For ``refused``: when a retry may succeed, in ms.
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
            predicted_cost_usd=p.cost_usd,
            objective=chosen.objective,
            policy=self.policy,
            origin_region=self.request.origin_region,
            slo_class=self.request.slo_class,
            slo_feasible=chosen.feasible,
        )


# -- interfaces ---------------------------------------------------------------------------------


class Filter(abc.ABC):
    """Drops candidates that must not (or should not) serve the request."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        """Whether `candidate` stays in the running."""


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
    """Keeps instances serving the request's model with room for its prompt and max_tokens."""

    name = "serves-model"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        inst = candidate.instance
        req = ctx.request
        if inst.model != req.model:
            return False
        return not inst.max_model_len or req.prompt_tokens + req.max_tokens <= inst.max_model_len


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
    """Keeps candidates whose predicted TPOT (the shared decode step with the request added)
    stays within the margin of the tightest TPOT target of the requests already running there.

    DESIGN.md section 2: a placement must not push already-admitted requests on the instance
    past their SLO. The targets come from `ClusterView.track_inflight` (requests this scheduler
    placed).
    """

    name = "protect-inflight"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        p = candidate.prediction
        limit = candidate.instance.tightest_inflight_tpot_ms
        return p is None or math.isinf(limit) or p.tpot_ms <= ctx.slo_margin * limit


class SloFeasibleFilter(Filter):
    """Keeps candidates predicted to meet the request's SLO with the profile's margin."""

    name = "slo-feasible"

    def keep(self, ctx: PlacementContext, candidate: Candidate) -> bool:
        return candidate.feasible


# -- scorers ------------------------------------------------------------------------------------


class ObjectiveScorer(Scorer):
    """Lowest objective ``E_q`` (predicted E2E plus alpha-weighted cost) scores highest."""

    name = "objective"
    category = "objective"

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        return lower_is_better([c.objective for c in candidates])


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
        admission: SLO filters; when they leave nothing the SLO class's ``on_infeasible``
            applies.
        scorers: Weighted scorers over the admitted candidates (may be empty for pickers that
            ignore scores, such as round-robin).
        picker: Chooses among the scored candidates.
        fallback_scorers: Scorers for best-effort placement when admission leaves nothing.
        slo_margin: Fraction of each SLO target a prediction may use to count as feasible.
        alpha_s_per_usd: Seconds of latency one USD of cost is worth in ``E_q``.
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
    slo_margin: float = Field(default=0.9, gt=0, le=1)
    alpha_s_per_usd: float = Field(default=1000.0, ge=0, allow_inf_nan=False)
    min_retry_after_ms: float = Field(default=100.0, ge=0)
    max_retry_after_ms: float = Field(default=30_000.0, gt=0)
    predictor: dict[str, Any] = Field(default_factory=dict)

    @field_validator("filters", "admission", "scorers", "fallback_scorers", mode="before")
    @classmethod
    def _plugin_lists(cls, v: Any) -> Any:
        return _specs(v)

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
            self.picker: Picker = PICKERS.make(profile.picker.name, **profile.picker.params)
            self.predictor_config = PredictorConfig(**profile.predictor)
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
    ) -> PlacementDecision:
        """Decides where `request` runs.

        Args:
            request: The validated request.
            view: The cluster view (not modified; the caller records the placement).
            now_unix_ns: Decision time; default the view's clock.
            exclude_regions: Regions not to consider (e.g. one that just failed the request);
                their candidates are marked ``rejected_by="excluded"``.

        Returns:
            The decision (see `PlacementDecision.outcome` for the four outcomes).
        """
        t0 = time.perf_counter()
        now = view.clock_ns() if now_unix_ns is None else now_unix_ns
        ctx = PlacementContext(request, view, now, self.profile.slo_margin)
        candidates = [Candidate(inst) for inst in view.instances(now_unix_ns=now)]
        alive = candidates
        if exclude_regions:
            alive = []
            for cand in candidates:
                if cand.region in exclude_regions:
                    cand.rejected_by = "excluded"
                else:
                    alive.append(cand)

        alive = self._apply_filters(ctx, alive, self.filters)
        if not alive:
            reason = (
                "no region has published state"
                if not candidates
                else f"no healthy instance with fresh state serves model {request.model!r}"
            )
            return self._decision(ctx, "unavailable", None, candidates, t0, reason=reason)

        self._predict(ctx, alive)

        admitted = self._apply_filters(ctx, alive, self.admission)
        if not admitted:
            if request.slo.on_infeasible == "best_effort":
                chosen = self._choose(ctx, alive, self.fallback_scorers, self._best_effort_pick)
                return self._decision(ctx, "best_effort", chosen, candidates, t0)
            retry = self._retry_after_ms(ctx, alive)
            best = min(alive, key=lambda c: c.prediction.ttft_ms if c.prediction else math.inf)
            p = best.prediction
            target_ms = request.slo.ttft_target_ms(request.prompt_tokens)
            reason = (
                f"no placement meets SLO class {request.slo_class!r}: best predicted TTFT "
                f"{p.ttft_ms:.0f} ms (target {target_ms:.0f} ms), TPOT {p.tpot_ms:.1f} ms "
                f"(target {request.slo.tpot_target_ms():.0f} ms) at {best.instance_id}"
                if p is not None
                else "no feasible placement"
            )
            return self._decision(
                ctx, "refused", None, candidates, t0, reason=reason, retry_after_ms=retry
            )
        chosen = self._choose(ctx, admitted, self.scorers, self.picker.pick)
        return self._decision(ctx, "placed", chosen, candidates, t0)

    # -- steps --------------------------------------------------------------------------------

    @staticmethod
    def _apply_filters(
        ctx: PlacementContext, candidates: list[Candidate], filters: Sequence[Filter]
    ) -> list[Candidate]:
        alive = candidates
        for flt in filters:
            kept = []
            for cand in alive:
                if flt.keep(ctx, cand):
                    kept.append(cand)
                else:
                    cand.rejected_by = flt.name
            alive = kept
        return alive

    def _predict(self, ctx: PlacementContext, candidates: list[Candidate]) -> None:
        req = ctx.request
        view = ctx.view
        cached: dict[str, int] = {}
        if len(req.prompt_token_ids):
            cached = view.cached_prefix_tokens(
                [c.instance_id for c in candidates], req.prompt_token_ids
            )
        n_out = pred.predicted_output_tokens(
            req.slo, req.max_tokens, req.expected_output_tokens, req.ignore_eos
        )
        alpha = self.profile.alpha_s_per_usd
        margin = ctx.slo_margin
        config = self.predictor_config
        rtts: dict[str, float] = {}
        for cand in candidates:
            region = cand.region
            rtt = rtts.get(region)
            if rtt is None:
                rtt = rtts[region] = view.rtt_ms(req.origin_region, region)
            p = pred.predict(
                cand.instance,
                rtt_ms=rtt,
                prompt_tokens=req.prompt_tokens,
                cached_prefix_tokens=cached.get(cand.instance_id, 0),
                output_tokens=n_out,
                config=config,
            )
            cand.prediction = p
            cand.feasible = p.meets(req.slo, req.prompt_tokens, margin)
            cand.objective = p.e2e_ms / 1000.0 + alpha * p.cost_usd

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
        is over target (the request's own, or that of requests running there), the current
        decode work must finish (queued decode tokens / decode
        throughput). A candidate no wait can fix (RTT and prefill alone too slow) contributes
        the cap. The result is clamped to [min_retry_after_ms, max_retry_after_ms].
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
            if p.tpot_ms > min(tpot_target, margin * inst.tightest_inflight_tpot_ms):
                if inst.queued_decode_tokens <= 0:
                    continue
                drain_ms = (
                    inst.queued_decode_tokens
                    / pred.decode_throughput_tokens_per_s(inst, self.predictor_config)
                    * 1000.0
                )
                need = max(need, drain_ms)
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
        source: ``"slomesh"``, ``"round-robin"``, ``"least-load"``, a path to a YAML profile,
            or a mapping with the profile's fields.
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
):
    FILTERS.add(_cls.name, _cls)
for _cls in (ObjectiveScorer, LowestTtftScorer, LeastOutstandingScorer):
    SCORERS.add(_cls.name, _cls)
for _cls in (MaxScorePicker, RoundRobinPicker):
    PICKERS.add(_cls.name, _cls)

#: Built-in profiles; ``configs/policies/<name>.yaml`` spell them out (a test keeps them equal).
BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "slomesh": {
        "name": "slomesh",
        "description": (
            "SLO-feasible placements (with margin) at the lowest objective "
            "E_q = predicted e2e seconds + alpha_s_per_usd * predicted cost; when none is "
            "feasible: refuse with a retry hint, or best effort (lowest TTFT) for best-effort "
            "SLO classes."
        ),
        "filters": ["healthy", "fresh", "serves-model"],
        "admission": ["slo-feasible", "protect-inflight"],
        "scorers": [{"name": "objective", "weight": 1.0}],
        "picker": "max-score",
        "fallback_scorers": [{"name": "lowest-ttft", "weight": 1.0}],
        "slo_margin": 0.9,
        "alpha_s_per_usd": 1000.0,
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
}

for _name, _profile in BUILTIN_PROFILES.items():
    PROFILES.add(_name, lambda _p=_profile: dict(_p))
