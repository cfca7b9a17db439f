"""Property tests of placement (hypothesis): over random clusters and requests, no policy picks
an instance a hard constraint excludes; the admission-controlled policies never place a
request on a candidate they predicted infeasible (with its priority's margin), place a
best-effort request only where the requests running keep their TPOT (else queue it), and never
admit a less urgent request where a more urgent one with the same prediction is not."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slomesh.scheduler.policy import BUILTIN_PROFILES, make_policy
from slomesh.scheduler.predictor import kv_capacity_blocks
from slomesh.scheduler.validation import validate_request
from slomesh.scheduler.view import ClusterView
from slomesh.slo import TenantPolicy
from slomesh.v1 import scheduler_pb2
from tests.unit.scheduler.factories import (
    MODEL,
    SLO,
    default_topology,
    make_instance,
    make_request,
    make_state,
    prompt,
)
from tests.unit.scheduler.test_policy import REPO, T0, cache

REGIONS = ("washington-dc", "frankfurt", "tokyo")
GPU_TYPES = ("H100", "A100", "L40S", "A10G", "L4")
ADMISSION_POLICIES = ("slomesh", "oracle")


@st.composite
def instances(draw, region: str) -> list:
    out = []
    for i in range(draw(st.integers(1, 4))):
        running = draw(st.integers(0, 64))
        out.append(make_instance(
            f"{region}-{i}",
            draw(st.sampled_from(GPU_TYPES)),
            healthy=draw(st.booleans() | st.just(True)),
            running=running,
            waiting=draw(st.integers(0, 16)),
            outstanding=running,
            kv_cache_usage=draw(st.floats(0.0, 1.0)),
            queued_prefill_tokens=draw(st.integers(0, 200_000)),
            queued_decode_tokens=draw(st.integers(0, 100_000)),
            price_usd_per_hour=draw(st.floats(0.5, 12.0)),
            model=draw(st.sampled_from((MODEL, MODEL, "other/model"))),
        ))
    return out


@st.composite
def clusters(draw) -> tuple[ClusterView, list[int]]:
    """A view of 1-3 regions with 1-4 random instances each, some holding a prompt's prefix."""
    regions = draw(st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3, unique=True))
    view = ClusterView(default_topology(), clock_ns=lambda: T0)
    tokens = prompt(draw(st.integers(1, 20_000)))
    for region in regions:
        insts = draw(instances(region))
        view.apply_state(make_state(region, insts), received_unix_ns=T0)
        for inst in insts:
            if draw(st.booleans()):  # runs a request this scheduler admitted, with its TPOT
                view.track_inflight(region, inst.instance_id, "running", draw(st.floats(5, 200)))
        cached = {
            inst.instance_id: tokens[: draw(st.integers(0, len(tokens)))]
            for inst in insts
            if draw(st.booleans())
        }
        if cached:
            cache(view, region, cached)
    return view, tokens


requests = st.fixed_dictionaries({
    "origin": st.sampled_from(REGIONS),
    "slo_class": st.sampled_from(sorted(SLO.classes)),
    "max_tokens": st.integers(1, 2048),
    "expected_output_tokens": st.integers(0, 2048),
    "ignore_eos": st.booleans(),
    "priority": st.integers(-2, 4),
})

PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _with_allowlist(name: str, allowed: list[str]) -> dict:
    profile = dict(BUILTIN_PROFILES[name])
    filters = list(profile.get("filters", []))
    filters.append({"name": "region-allowlist", "params": {"regions": allowed}})
    return {**profile, "name": f"{name}-residency", "filters": filters}


def _tenant_request(tokens, tenant_regions, **req):
    """A request of a tenant whose data may only be served in `tenant_regions`."""
    msg = scheduler_pb2.GenerateRequest(
        request_id="r", model=MODEL, prompt_token_ids=tokens, max_tokens=req["max_tokens"],
        slo_class=req["slo_class"], origin_region=req["origin"], tenant="t",
        expected_output_tokens=req["expected_output_tokens"], ignore_eos=req["ignore_eos"],
        priority=req["priority"],
    )
    tenants = {"t": TenantPolicy(name="t", allowed_regions=frozenset(tenant_regions))}
    return validate_request(msg, models={MODEL: 32768}, slo_classes=SLO.classes,
                            default_slo_class=SLO.default_class, regions=set(REGIONS),
                            tenants=tenants)


@PROPERTY_SETTINGS
@given(
    cluster=clusters(),
    req=requests,
    policy=st.sampled_from(sorted(BUILTIN_PROFILES)),
    allowed=st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3, unique=True),
    tenant_regions=st.lists(st.sampled_from(REGIONS), min_size=0, max_size=3, unique=True),
)
def test_no_policy_places_outside_its_hard_constraints(
    cluster, req, policy, allowed, tenant_regions
):
    view, tokens = cluster
    request = _tenant_request(tokens, tenant_regions, **req)
    decision = make_policy(_with_allowlist(policy, allowed)).place(request, view)
    if decision.chosen is None:
        assert decision.outcome in ("refused", "unavailable", "queued")
        return
    chosen = decision.chosen
    assert chosen.region in allowed
    assert not tenant_regions or chosen.region in tenant_regions
    assert chosen.instance.healthy
    assert chosen.instance.model == MODEL
    # Placed: passed every filter. Best effort: only the SLO admission turned it down.
    assert chosen.rejected_by == "" if decision.outcome == "placed" else (
        chosen.rejected_by in ("", "slo-feasible", "protect-inflight", "kv-room")
    )
    assert any(c is chosen for c in decision.candidates)


def _kv_capacity(candidate) -> int:
    """KV tokens of a candidate (the factories' instances report no block count: its GPU's)."""
    inst = candidate.instance
    return kv_capacity_blocks(inst) * inst.block_size


def _kv_demand(candidate, request, policy) -> float:
    """The kv-room filter's demand: what runs there, what waits, every request's predicted
    output and this prompt, in tokens."""
    inst = candidate.instance
    n_out = candidate.prediction.output_tokens
    return (
        inst.kv_cache_usage * _kv_capacity(candidate)
        + inst.queued_prefill_tokens
        + (inst.num_requests_outstanding + 1) * n_out
        + request.prompt_tokens
    )


def _tiered_request(tokens, best_effort_tenant: bool, **req):
    """A request whose tenant's tier is best effort (whatever its class), or of no tenant."""
    if not best_effort_tenant:
        return make_request(tokens, **req)
    msg = scheduler_pb2.GenerateRequest(
        request_id="r", model=MODEL, prompt_token_ids=tokens, max_tokens=req["max_tokens"],
        slo_class=req["slo_class"], origin_region=req["origin"], tenant="bulk",
        expected_output_tokens=req["expected_output_tokens"], ignore_eos=req["ignore_eos"],
        priority=req["priority"],
    )
    tenants = {"bulk": TenantPolicy(name="bulk", on_infeasible="best_effort")}
    return validate_request(msg, models={MODEL: 32768}, slo_classes=SLO.classes,
                            default_slo_class=SLO.default_class, regions=set(REGIONS),
                            tenants=tenants)


@PROPERTY_SETTINGS
@given(
    cluster=clusters(),
    req=requests,
    policy=st.sampled_from(ADMISSION_POLICIES),
    best_effort_tenant=st.booleans(),
)
def test_admission_never_places_on_a_candidate_it_predicted_infeasible(
    cluster, req, policy, best_effort_tenant
):
    view, tokens = cluster
    request = _tiered_request(tokens, best_effort_tenant, **req)
    pol = make_policy(policy)
    decision = pol.place(request, view)
    margin = pol.profile.slo_margin_for(request.priority)
    assert margin <= pol.profile.slo_margin
    predicted = [c for c in decision.candidates if c.prediction is not None]
    if decision.outcome == "placed":
        chosen = decision.chosen
        assert chosen is not None and chosen.feasible
        assert chosen.prediction.meets(request.slo, request.prompt_tokens, margin)
    elif decision.outcome == "best_effort":
        # Only a best-effort tier is placed without a feasible candidate, and only where the
        # requests running keep their TPOT (protect-inflight with the request's margin) and
        # the KV cache holds them all (kv-room).
        assert request.on_infeasible == "best_effort"
        assert not any(c.feasible for c in decision.candidates if not c.rejected_by)
        chosen = decision.chosen
        assert chosen.rejected_by == "slo-feasible"
        limit = chosen.instance.tightest_inflight_tpot_ms
        assert math.isinf(limit) or chosen.prediction.inflight_tpot_ms <= margin * limit
        assert _kv_demand(chosen, request, pol) <= _kv_capacity(chosen)
    elif decision.outcome == "queued":
        # A best-effort request that would slow every candidate's running requests too much,
        # or that their KV caches cannot hold beside them.
        assert request.on_infeasible == "best_effort"
        assert decision.chosen is None and decision.retry_after_ms is not None
        assert predicted
        for c in predicted:
            assert c.rejected_by in ("protect-inflight", "kv-room")
            if c.rejected_by == "protect-inflight":
                limit = margin * c.instance.tightest_inflight_tpot_ms
                assert c.prediction.inflight_tpot_ms > limit
            else:
                assert _kv_demand(c, request, pol) > _kv_capacity(c)
    elif decision.outcome == "refused":
        assert decision.chosen is None and decision.retry_after_ms is not None
        assert request.on_infeasible == "refuse"
        assert not any(c.feasible and not c.rejected_by for c in predicted)


@PROPERTY_SETTINGS
@given(
    cluster=clusters(),
    req=requests,
    policy=st.sampled_from(ADMISSION_POLICIES),
    less_urgent_by=st.integers(1, 4),
    best_effort_tenant=st.booleans(),
)
def test_a_less_urgent_request_is_admitted_only_where_a_more_urgent_one_is(
    cluster, req, policy, less_urgent_by, best_effort_tenant
):
    view, tokens = cluster
    pol = make_policy(policy)
    urgent = pol.place(_tiered_request(tokens, best_effort_tenant, **req), view)
    lax_req = {**req, "priority": req["priority"] + less_urgent_by}
    lax = pol.place(_tiered_request(tokens, best_effort_tenant, **lax_req), view)
    def feasible(decision):
        return {c.instance_id for c in decision.candidates if c.feasible}

    assert feasible(lax) <= feasible(urgent)
    if lax.outcome == "placed":
        assert urgent.outcome == "placed"
    if urgent.outcome in ("refused", "queued"):
        assert lax.outcome == urgent.outcome


def test_builtin_profiles_match_their_yaml_files():
    """The property tests build on BUILTIN_PROFILES; the YAML files users copy say the same."""
    for name, profile in BUILTIN_PROFILES.items():
        path = REPO / "configs" / "policies" / f"{name}.yaml"
        assert yaml.safe_load(path.read_text())["filters"] == profile["filters"], name
