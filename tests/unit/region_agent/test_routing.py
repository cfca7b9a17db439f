"""Tests of request validation and instance picking."""

from __future__ import annotations

import pytest

from services.region_agent.config import InstanceConfig
from services.region_agent.routing import (
    NoInstanceError,
    RequestValidationError,
    pick_instance,
    validate_request,
)
from services.region_agent.scraper import EngineInfo
from services.region_agent.state import InstanceRuntime
from slomesh.kv.hashing import compute_block_keys
from slomesh.kv.index import InstanceKvTracker, PrefixIndex
from slomesh.v1 import region_agent_pb2

Req = region_agent_pb2.AgentGenerateRequest
PROMPT = list(range(1000, 1064))  # 4 blocks of 16


def make_runtimes(*ids, healthy=True, model="m"):
    out = {}
    for iid in ids:
        rt = InstanceRuntime(
            config=InstanceConfig(iid, f"http://{iid}:1"),
            gpu_type="H100",
            tracker=InstanceKvTracker(iid),
        )
        rt.healthy = healthy
        rt.info = EngineInfo(model=model)
        out[iid] = rt
    return out


def index_with(**blocks_per_instance):
    index = PrefixIndex()
    keys = compute_block_keys(PROMPT, 16)
    for iid, n in blocks_per_instance.items():
        index.replace_instance(iid, keys[:n], 16)
    return index


@pytest.mark.parametrize(
    "request_, field",
    [
        (Req(max_tokens=4), "prompt_token_ids"),
        (Req(prompt_token_ids=[1], prompt_text="x", max_tokens=4), "prompt_token_ids"),
        (Req(prompt_token_ids=[1], max_tokens=0), "max_tokens"),
        (Req(prompt_text="x", max_tokens=2, instance_id="zzz"), "instance_id"),
    ],
)
def test_validation_names_the_field(request_, field):
    with pytest.raises(RequestValidationError) as err:
        validate_request(request_, ["a", "b"])
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_valid_requests_pass():
    validate_request(Req(prompt_token_ids=[1, 2], max_tokens=1), ["a"])
    validate_request(Req(prompt_text="hi", max_tokens=1, instance_id="a"), ["a"])


def test_longest_prefix_wins_then_fewest_outstanding():
    rts = make_runtimes("a", "b", "c")
    rts["a"].start_request("x", 10, 0, 5)
    chosen, hit = pick_instance(
        Req(prompt_token_ids=PROMPT, max_tokens=4), rts, index_with(a=3, b=1)
    )
    assert (chosen.instance_id, hit) == ("a", 48)
    # Equal hits: the one with fewer outstanding forwarded requests.
    chosen, hit = pick_instance(
        Req(prompt_token_ids=PROMPT, max_tokens=4), rts, index_with(a=2, b=2)
    )
    assert (chosen.instance_id, hit) == ("b", 32)
    # No hits anywhere: least outstanding, then KV usage, then order.
    rts["b"].scraped.kv_cache_usage = 0.9
    chosen, hit = pick_instance(Req(prompt_token_ids=PROMPT, max_tokens=4), rts, PrefixIndex())
    assert (chosen.instance_id, hit) == ("c", 0)


def test_requested_instance_is_used_when_healthy():
    rts = make_runtimes("a", "b")
    chosen, hit = pick_instance(
        Req(prompt_token_ids=PROMPT, max_tokens=4, instance_id="b"), rts, index_with(a=4, b=1)
    )
    assert (chosen.instance_id, hit) == ("b", 16)


def test_unhealthy_requested_instance_falls_back():
    rts = make_runtimes("a", "b")
    rts["b"].healthy = False
    chosen, _ = pick_instance(
        Req(prompt_text="x", max_tokens=4, instance_id="b"), rts, PrefixIndex()
    )
    assert chosen.instance_id == "a"


def test_unhealthy_instances_are_never_picked():
    rts = make_runtimes("a", "b")
    rts["a"].healthy = False
    chosen, hit = pick_instance(Req(prompt_token_ids=PROMPT, max_tokens=4), rts, index_with(a=4))
    assert (chosen.instance_id, hit) == ("b", 0)
    rts["b"].healthy = False
    with pytest.raises(NoInstanceError):
        pick_instance(Req(prompt_token_ids=PROMPT, max_tokens=4), rts, PrefixIndex())


def test_model_filter():
    rts = make_runtimes("a", model="llama")
    rts.update(make_runtimes("b", model="qwen"))
    chosen, _ = pick_instance(Req(prompt_text="x", max_tokens=1, model="qwen"), rts, PrefixIndex())
    assert chosen.instance_id == "b"
    with pytest.raises(NoInstanceError, match="mistral"):
        pick_instance(Req(prompt_text="x", max_tokens=1, model="mistral"), rts, PrefixIndex())
