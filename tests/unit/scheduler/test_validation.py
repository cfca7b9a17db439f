"""Request validation: every invalid case is rejected naming its field."""

from __future__ import annotations

import pytest

from slomesh.scheduler.validation import (
    MAX_TOKEN_ID,
    RequestValidationError,
    estimate_text_tokens,
    validate_request,
)
from slomesh.slo import TenantPolicy, load_slo_config
from slomesh.v1 import scheduler_pb2

MODEL = "m"
SLO = load_slo_config()
REGIONS = {"washington-dc", "tokyo"}


def validate(default_origin: str | None = None, **kw):
    fields = {
        "request_id": "r-1",
        "model": MODEL,
        "prompt_token_ids": [1, 2, 3],
        "max_tokens": 10,
        "origin_region": "tokyo",
    }
    fields.update(kw)
    return validate_request(
        scheduler_pb2.GenerateRequest(**fields),
        models={MODEL: 1000},
        slo_classes=SLO.classes,
        default_slo_class=SLO.default_class,
        regions=REGIONS,
        default_origin_region=default_origin,
    )


def test_tenant_policy_sets_regions_and_tier():
    tenants = {"eu": TenantPolicy(name="eu", allowed_regions={"frankfurt"},
                                  on_infeasible="best_effort")}
    msg = scheduler_pb2.GenerateRequest(request_id="r", model=MODEL, prompt_token_ids=[1, 2],
                                        max_tokens=5, origin_region="tokyo", tenant="eu")
    kw = {"models": {MODEL: 1000}, "slo_classes": SLO.classes, "default_slo_class": "chat",
              "regions": REGIONS}
    v = validate_request(msg, tenants=tenants, **kw)
    assert v.allowed_regions == {"frankfurt"} and v.on_infeasible == "best_effort"
    msg.tenant = "other"
    v = validate_request(msg, tenants=tenants, **kw)
    assert v.allowed_regions == frozenset() and v.on_infeasible == "refuse"  # chat's
    msg.tenant = "x" * 129
    with pytest.raises(RequestValidationError, match="tenant"):
        validate_request(msg, tenants=tenants, **kw)


def test_valid_request():
    v = validate(slo_class="coding", expected_output_tokens=7, tenant="t")
    assert v.request_id == "r-1" and v.prompt_tokens == 3 and not v.prompt_tokens_estimated
    assert list(v.prompt_token_ids) == [1, 2, 3]
    assert v.slo.name == "coding" and v.slo_class == "coding"
    assert v.origin_region == "tokyo" and v.expected_output_tokens == 7


def test_defaults_request_id_slo_class_and_origin():
    v = validate(default_origin="washington-dc", request_id="", origin_region="")
    assert len(v.request_id) == 32 and v.request_id != validate(request_id="").request_id
    assert v.slo_class == "chat"
    assert v.origin_region == "washington-dc"


def test_text_prompt_is_estimated():
    v = validate(prompt_token_ids=[], prompt_text="one two three four five six")
    assert v.prompt_tokens_estimated
    assert v.prompt_tokens == 8  # ceil(6 words * 4/3)
    assert estimate_text_tokens("x" * 400) == 100  # no spaces: 4 chars per token
    assert estimate_text_tokens("") == 0


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"request_id": "has space"}, "request_id", "must match"),
        ({"request_id": "x" * 129}, "request_id", "must match"),
        ({"request_id": "naïve"}, "request_id", "must match"),
        ({"model": ""}, "model", "required"),
        ({"model": "other"}, "model", "unknown model"),
        ({"prompt_token_ids": []}, "prompt_token_ids", "empty prompt"),
        ({"prompt_text": "hello"}, "prompt_token_ids", "not both"),
        ({"prompt_token_ids": [], "prompt_text": "   "}, "prompt_text", "empty"),
        ({"prompt_token_ids": [1, MAX_TOKEN_ID + 1]}, "prompt_token_ids", "position 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_tokens": 998}, "max_tokens", "exceeds max_model_len 1000"),
        ({"prompt_token_ids": list(range(1000))}, "prompt_token_ids", "does not fit"),
        ({"slo_class": "gold"}, "slo_class", "unknown SLO class"),
        ({"origin_region": "mars"}, "origin_region", "unknown region"),
        ({"origin_region": ""}, "origin_region", "required"),
    ],
)
def test_invalid_requests_name_the_field(fields, field, fragment):
    with pytest.raises(RequestValidationError) as info:
        validate(**fields)
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert fragment in err.message


def test_largest_allowed_token_id_passes():
    assert validate(prompt_token_ids=[MAX_TOKEN_ID]).prompt_tokens == 1


def test_prompt_plus_max_tokens_at_the_limit_passes():
    assert validate(prompt_token_ids=list(range(990)), max_tokens=10).max_tokens == 10


def test_priority_is_the_requests_own_then_the_tenants_then_the_classes():
    from slomesh.slo import SloConfig

    classes = {**SLO.classes, "batch": SLO.classes["batch"].model_copy(update={"priority": 3})}
    slo = SloConfig(classes=classes, default_class="chat")
    tenants = {
        "nightly": TenantPolicy(name="nightly", priority=5),
        "plain": TenantPolicy(name="plain"),
    }

    def priority(**kw):
        fields = {"request_id": "r", "model": MODEL, "prompt_token_ids": [1, 2],
                  "max_tokens": 5, "origin_region": "tokyo"}
        fields.update(kw)
        return validate_request(
            scheduler_pb2.GenerateRequest(**fields), models={MODEL: 1000},
            slo_classes=slo.classes, default_slo_class="chat", regions=REGIONS, tenants=tenants,
        ).priority

    assert priority() == 0  # chat's default
    assert priority(slo_class="batch") == 3  # the class's
    assert priority(slo_class="batch", tenant="plain") == 3  # a tenant without one
    assert priority(slo_class="batch", tenant="nightly") == 5  # the tenant's over the class's
    assert priority(slo_class="batch", tenant="nightly", priority=-2) == -2  # the request's
    # An explicit 0 is the request's own (proto3 presence), not "unset".
    assert priority(slo_class="batch", tenant="nightly", priority=0) == 0
