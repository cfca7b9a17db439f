"""Plain factories for scheduler tests: region states, KV deltas, requests."""

from __future__ import annotations

from collections.abc import Sequence

from slomesh.kv.hashing import compute_block_keys
from slomesh.scheduler.validation import ValidatedRequest, validate_request
from slomesh.slo import load_slo_config
from slomesh.topology import Topology
from slomesh.v1 import scheduler_pb2, state_pb2

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SLO = load_slo_config()


def make_instance(
    instance_id: str,
    gpu_type: str = "H100",
    *,
    healthy: bool = True,
    running: int = 0,
    waiting: int = 0,
    outstanding: int = 0,
    kv_cache_usage: float = 0.0,
    queued_prefill_tokens: int = 0,
    queued_decode_tokens: int = 0,
    prefill_tokens_per_s: float = 0.0,
    decode_tokens_per_s: float = 0.0,
    price_usd_per_hour: float = 0.0,
    block_size: int = 16,
    max_model_len: int = 32768,
    model: str = MODEL,
) -> state_pb2.InstanceState:
    return state_pb2.InstanceState(
        instance_id=instance_id,
        url=f"http://127.0.0.1/{instance_id}",
        gpu_type=gpu_type,
        model=model,
        healthy=healthy,
        num_requests_running=running,
        num_requests_waiting=waiting,
        num_requests_outstanding=outstanding,
        kv_cache_usage=kv_cache_usage,
        queued_prefill_tokens=queued_prefill_tokens,
        queued_decode_tokens=queued_decode_tokens,
        prefill_tokens_per_s=prefill_tokens_per_s,
        decode_tokens_per_s=decode_tokens_per_s,
        block_size=block_size,
        max_model_len=max_model_len,
        price_usd_per_hour=price_usd_per_hour,
    )


def make_state(
    region: str,
    instances: Sequence[state_pb2.InstanceState],
    *,
    seq: int = 1,
    timestamp_unix_ns: int = 0,
    incarnation: str = "inc-1",
    agent_endpoint: str = "",
) -> state_pb2.RegionState:
    return state_pb2.RegionState(
        region=region,
        seq=seq,
        timestamp_unix_ns=timestamp_unix_ns,
        agent_endpoint=agent_endpoint or f"{region}.agent:50051",
        instances=list(instances),
        agent_incarnation=incarnation,
        egress_usd_per_gb=0.02,
    )


def make_kv_delta(
    region: str,
    seq: int,
    stored: dict[str, Sequence[int]],
    *,
    incarnation: str = "inc-1",
    block_size: int = 16,
) -> state_pb2.KvIndexDelta:
    return state_pb2.KvIndexDelta(
        region=region,
        seq=seq,
        agent_incarnation=incarnation,
        instances=[
            state_pb2.InstanceBlockDelta(
                instance_id=iid, stored_keys=list(keys), block_size=block_size
            )
            for iid, keys in stored.items()
        ],
    )


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def keys_of(tokens: Sequence[int], block_size: int = 16) -> list[int]:
    return compute_block_keys(tokens, block_size)


def make_request(
    tokens: Sequence[int] | None = None,
    *,
    origin: str = "washington-dc",
    slo_class: str = "chat",
    max_tokens: int = 64,
    expected_output_tokens: int = 0,
    request_id: str = "req-1",
    regions: Sequence[str] = ("washington-dc", "frankfurt", "tokyo"),
    ignore_eos: bool = False,
    priority: int | None = None,
) -> ValidatedRequest:
    req = scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=list(tokens if tokens is not None else prompt(100)),
        max_tokens=max_tokens,
        slo_class=slo_class,
        origin_region=origin,
        expected_output_tokens=expected_output_tokens,
        ignore_eos=ignore_eos,
    )
    if priority is not None:
        req.priority = priority
    return validate_request(
        req,
        models={MODEL: 32768},
        slo_classes=SLO.classes,
        default_slo_class=SLO.default_class,
        regions=set(regions),
    )


def default_topology() -> Topology:
    return Topology.default()
