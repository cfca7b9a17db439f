"""Validation of `AgentGenerateRequest`s and the choice of an instance to serve one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.region_agent.state import InstanceRuntime
from slomesh.kv.index import PrefixIndex
from slomesh.v1 import region_agent_pb2


class RequestValidationError(ValueError):
    """A Generate request is invalid (gRPC INVALID_ARGUMENT); `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NoInstanceError(RuntimeError):
    """No healthy instance can serve the request (gRPC UNAVAILABLE)."""


def validate_request(
    request: region_agent_pb2.AgentGenerateRequest, known_instance_ids: Sequence[str] | Mapping
) -> None:
    """Checks a Generate request.

    Args:
        request: the request.
        known_instance_ids: ids of the instances of this region.

    Raises:
        RequestValidationError: the prompt is empty or given both as ids and as text;
            `max_tokens` is 0; `instance_id` names an instance this agent does not serve.
    """
    has_ids = len(request.prompt_token_ids) > 0
    has_text = bool(request.prompt_text)
    if has_ids and has_text:
        raise RequestValidationError(
            "prompt_token_ids", "give either prompt_token_ids or prompt_text, not both"
        )
    if not has_ids and not has_text:
        raise RequestValidationError(
            "prompt_token_ids", "empty prompt: give prompt_token_ids or prompt_text"
        )
    if request.max_tokens == 0:
        raise RequestValidationError("max_tokens", "must be >= 1")
    if request.instance_id and request.instance_id not in known_instance_ids:
        raise RequestValidationError(
            "instance_id",
            f"unknown instance {request.instance_id!r} (this region serves {sorted(known_instance_ids)})",
        )


def pick_instance(
    request: region_agent_pb2.AgentGenerateRequest,
    runtimes: Mapping[str, InstanceRuntime],
    index: PrefixIndex,
) -> tuple[InstanceRuntime, int]:
    """Chooses the instance for a (validated) request.

    Order: the requested `instance_id` when it is healthy and serves the requested model (or
    is loading it, `InstanceRuntime.serving_model`), or can switch models
    (`InstanceRuntime.switch_capable`: the scheduler placed a model switch there; the
    forwarder starts it, `services.region_agent.model_switch`); else among healthy instances
    (of the requested model, when the request names one and the instance's model is known)
    the longest indexed prefix hit, then the fewest outstanding forwarded requests, then the
    lowest KV cache usage, then configuration order.

    Args:
        request: the request.
        runtimes: the region's instances by id, in configuration order.
        index: the agent's prefix index.

    Returns:
        (instance, cached prefix tokens the index reports for the prompt on it; 0 for an
        instance that must switch models first).

    Raises:
        NoInstanceError: no healthy instance (of the requested model).
    """
    model = request.model
    healthy = [
        rt
        for rt in runtimes.values()
        if rt.healthy and (not model or not rt.serving_model or rt.serving_model == model)
    ]
    tokens = request.prompt_token_ids
    if request.instance_id:
        chosen = runtimes.get(request.instance_id)
        if chosen is not None and chosen in healthy:
            hit = index.match(tokens, [chosen.instance_id])[chosen.instance_id] if tokens else 0
            return chosen, hit
        if chosen is not None and chosen.healthy and model and chosen.switch_capable:
            return chosen, 0
    if not healthy:
        raise NoInstanceError(
            f"no healthy instance serves model {model!r}" if model else "no healthy instance"
        )
    hits = index.match(tokens, [rt.instance_id for rt in healthy]) if tokens else {}
    order = {iid: n for n, iid in enumerate(runtimes)}

    def rank(rt: InstanceRuntime) -> tuple:
        return (
            -hits.get(rt.instance_id, 0),
            len(rt.outstanding),
            rt.scraped.kv_cache_usage,
            order[rt.instance_id],
        )

    best = min(healthy, key=rank)
    return best, hits.get(best.instance_id, 0)
