"""Model switches as a placement option: an idle instance loads the request's model first.

A mesh may serve several models (`slomesh.topology`: ``models:``), each instance one at a time.
A request for model ``m`` can run on

(a) an instance serving ``m`` (``M_q = 0``; while that instance is still loading ``m``, the
    rest of its load, `remaining_load_ms`), or
(b) an idle, *swappable* instance serving another model, which first loads ``m``:
    ``M_q = model_load_time_s(weights_bytes(m), bandwidth, overhead)``
    (`slomesh.engine.profiles.model_load_time_s`), the bandwidth being its region's weight
    cache's when the cache holds ``m``, else the remote store's (`plan_model_switch`).

``M_q`` adds to TTFT (and E2E) in the prediction (`slomesh.scheduler.predictor.predict`,
``model_load_ms``) and, for a switch, the GPU seconds of the load count in its cost: the GPU
does nothing else meanwhile. The chosen placement carries the switch (`Candidate.model_load`,
``Placement.loads_model``); the serving region's agent asks the instance to load and then
forwards the request.

Which instances may switch (`plan_model_switch`): swappable ones that are idle -- nothing
running, waiting, outstanding or queued, no placement of this scheduler still on its way, no
load under way -- for which the region has published its load bandwidths, whose GPU holds the
model with room for the request, and whose model some other instance still serves (the
`ServesModelFilter` checks that last part mesh-wide, so that a switch never takes the last
server of a model away).

Source: DESIGN.md section 2, ``C_q = L/2 + W_q + P_q + D_q + L/2 (+ M_q)``; model swapping on
demand as in serverless LLM serving (ServerlessLLM, Fu et al., OSDI 2024: loading from a local
checkpoint cache beats a remote download; the placement weighs the load time against queueing
elsewhere).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slomesh.engine.profiles import (
    MODELS,
    PROFILES,
    model_load_time_s,
    switched_max_model_len,
)
from slomesh.scheduler.view import InstanceView

__all__ = [
    "ModelLoad",
    "is_idle",
    "plan_model_switch",
    "remaining_load_ms",
]

#: Tokens per KV block assumed for an instance that reports none (vLLM on GPU).
_DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """A model switch a placement needs before the instance can serve the request.

    Attributes:
        model: The model to load (the request's).
        from_model: The model the instance serves now.
        weights_bytes: Bytes of weights to load.
        from_cache: The region's local weight cache holds the model (else the remote store).
        load_gb_per_s: Bandwidth the weights load at, GB/s (1 GB = 1e9 bytes).
        overhead_s: Engine start-up time besides the weights, seconds.
        load_ms: ``M_q``: the whole switch, ms.
        instance: The instance as it will be once switched: serving ``model``, empty KV cache
            sized for ``model`` (``num_gpu_blocks`` 0 = from the GPU profile), its context limit
            for ``model``, no measured throughputs or online step-time fit (those were of the
            old model).
    """

    model: str
    from_model: str
    weights_bytes: int
    from_cache: bool
    load_gb_per_s: float
    overhead_s: float
    load_ms: float
    instance: InstanceView

    @property
    def load_s(self) -> float:
        """``M_q`` in seconds."""
        return self.load_ms / 1000.0


def is_idle(inst: InstanceView) -> bool:
    """Whether nothing runs, waits or is on its way to ``inst`` and it is not loading a model.

    Counts the engine's gauges, the agent's outstanding requests and queued tokens, and this
    scheduler's placements not yet in the state.
    """
    return (
        inst.num_requests_running == 0
        and inst.num_requests_waiting == 0
        and inst.num_requests_outstanding == 0
        and inst.queued_prefill_tokens == 0
        and inst.queued_decode_tokens == 0
        and inst.pending_placements == 0
        and inst.model_load_remaining_s <= 0
    )


def plan_model_switch(
    inst: InstanceView, model: str, weights_bytes: int | None, model_max_len: int
) -> ModelLoad | None:
    """The switch that lets ``inst`` serve ``model``, or None when it cannot switch.

    ::

        bandwidth = weight_cache_gb_per_s    if model in the region's weight cache
                    remote_weights_gb_per_s  otherwise
        M_q       = model_load_overhead_s + weights_bytes / (bandwidth * 1e9)

    Args:
        inst: The candidate, as the view shows it.
        model: The request's model.
        weights_bytes: Bytes of the model's weights (`ClusterView.model_weights_bytes`); None
            when unknown (then no switch).
        model_max_len: The model's context limit, tokens (capped here at what the
            instance's GPU holds, `slomesh.engine.profiles.switched_max_model_len`).

    Returns:
        The switch, or None: ``inst`` serves ``model`` already, is not swappable or not idle
        (`is_idle`), its region published no load bandwidth, the model's size is unknown, or
        its GPU has no KV-cache memory left for the model.

    Source: `slomesh.engine.profiles.model_load_time_s` (module docstring there).
    """
    if inst.model == model or not inst.swappable or weights_bytes is None:
        return None
    if not is_idle(inst):
        return None
    from_cache = model in inst.weight_cache_models
    bandwidth = inst.weight_cache_gb_per_s if from_cache else inst.remote_weights_gb_per_s
    if bandwidth <= 0:
        return None
    block_size = inst.block_size or _DEFAULT_BLOCK_SIZE
    max_len = switched_max_model_len(
        PROFILES.get(inst.gpu_type), MODELS.get(model), model_max_len, block_size
    )
    if max_len <= 0:
        return None
    overhead_s = max(0.0, inst.model_load_overhead_s)
    load_s = model_load_time_s(weights_bytes, load_gb_per_s=bandwidth, overhead_s=overhead_s)
    switched = dataclasses.replace(
        inst,
        model=model,
        kv_cache_usage=0.0,
        num_gpu_blocks=0,
        max_model_len=max_len,
        prefill_tokens_per_s=0.0,
        decode_tokens_per_s=0.0,
        online_fit=None,
        model_load_remaining_s=load_s,
    )
    return ModelLoad(
        model=model,
        from_model=inst.model,
        weights_bytes=weights_bytes,
        from_cache=from_cache,
        load_gb_per_s=bandwidth,
        overhead_s=overhead_s,
        load_ms=load_s * 1000.0,
        instance=switched,
    )


def remaining_load_ms(inst: InstanceView, rtt_ms: float) -> float:
    """Extra wait of a request sent to an instance still loading its model, ms.

    The load ends ``model_load_remaining_s`` after the state was stamped, which is
    ``state_age_ms`` ago; the request reaches the instance ``rtt_ms / 2`` from now and waits
    for what is left then::

        max(0, model_load_remaining_s * 1000 - state_age_ms - rtt_ms / 2)

    Args:
        inst: The instance (its ``model`` is the one being loaded).
        rtt_ms: Round trip between the request's origin and the instance's region, ms.

    Returns:
        Milliseconds, 0 when the instance serves its model already.
    """
    if inst.model_load_remaining_s <= 0:
        return 0.0
    return max(0.0, inst.model_load_remaining_s * 1000.0 - inst.state_age_ms - rtt_ms / 2.0)
