"""Predicted latency and cost of a request on a candidate instance (DESIGN.md section 2).

For a request ``q`` from origin region ``o`` on instance ``i`` (GPU type ``k``) in region ``j``::

    ttft_ms = rtt_ms(o, j) + queue_wait_ms + prefill_ms (+ transfer_ms, 0 for now)
    e2e_ms  = ttft_ms + decode_ms
    decode_ms = (N_out - 1) * tpot_ms

- ``rtt_ms``: the full round trip: the request travels ``rtt/2`` to the serving region and the
  first token ``rtt/2`` back (0 within one region). Later tokens stream behind the first, so
  the RTT is paid once per request, not per token.
- ``queue_wait_ms`` (``W_q``): the RWT estimator -- work queued ahead of ``q`` divided by the
  instance's measured throughputs (see `queue_wait_ms`).
- ``prefill_ms`` (``P_q``): prefill of the *uncached* prompt tokens only, ``N_p - h_i(q)``
  where ``h_i(q)`` is the instance's cached prefix, from the GPU profile's roofline with the
  instance's running decodes sharing each step (chunked prefill).
- ``tpot_ms``: one decode step at the batch the instance will run with ``q`` added.
- ``N_out``: the predicted output length, from
  `slomesh.scheduler.output_length.OutputLengthPredictor.predict`: the client's hint if
  given, else a quantile (`PredictorConfig.output_length_quantile`) of the output lengths of
  the request's model and SLO class learned from completed requests, else the SLO class's
  `default_output_tokens`. A real client does not know its output length and ``max_tokens``
  is only an upper bound; with ``ignore_eos`` (how benchmark replays make an engine emit a
  trace's exact output length) ``max_tokens`` *is* the true length, so the honest predictor
  does not read it at all. Only `PredictorConfig.use_true_output_length` (the ``oracle``
  policy) uses it. The first output token comes out of the prefill step, so decoding takes
  ``N_out - 1`` steps, matching the ``Timings.tpot_ms`` definition
  ``(e2e - ttft) / (completion_tokens - 1)``.
- GPU seconds: prefill time plus ``q``'s share of each decode step (step time / batch);
  ``cost_usd = gpu_seconds * price_usd_per_hour / 3600``. No KV or weights move yet, so
  ``bytes_moved = 0`` and no egress cost.

Source: QLM (Patke et al., SoCC 2024), request waiting time (RWT) estimator: waiting time =
queued work / throughput. SLOs-Serve (Chen et al., 2025) and DistServe (Zhong et al., OSDI
2024): roofline prefill/decode step times and TTFT/TPOT SLOs. Step times come from
`slomesh.engine.profiles.step_time_s`, the same model the emulator and simulator run.
"""

from __future__ import annotations

from dataclasses import dataclass

from slomesh.engine.profiles import (
    DEFAULT_MODEL,
    MODELS,
    PROFILES,
    GpuProfile,
    ModelSpec,
    step_time_s,
)
from slomesh.scheduler.view import InstanceView
from slomesh.slo import SloClass
from slomesh.v1 import common_pb2

__all__ = [
    "Prediction",
    "PredictorConfig",
    "decode_throughput_tokens_per_s",
    "kv_capacity_blocks",
    "predict",
    "prefill_ms",
    "prefill_throughput_tokens_per_s",
    "queue_wait_ms",
    "tpot_ms",
]


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """Knobs of the predictor.

    Attributes:
        prefill_chunk_tokens: Prompt tokens per engine step (vLLM's
            ``--max-num-batched-tokens``; chunked prefill splits longer prompts over steps).
        max_num_seqs: Largest decode batch an instance runs (vLLM's ``--max-num-seqs``).
        fallback_gpu_type: Profile used for instances whose GPU type has none (e.g. "CPU")
            and no measured throughput.
        default_block_size: Tokens per KV block when an instance reports none.
        use_true_output_length: Take ``max_tokens`` of an ``ignore_eos`` request as its output
            length ``N_out``. Such a request generates exactly ``max_tokens`` tokens, so this
            is knowing the true output length in advance -- what only an oracle can do (trace
            replays and the simulator send every request with ``ignore_eos`` and
            ``max_tokens`` = the trace's output length). False (the default, and the
            ``slomesh`` policy): ``N_out`` comes from the client's hint, the learned output
            lengths or the SLO class default, as for a real client whose ``max_tokens`` is
            only an upper bound.
        output_length_quantile: Quantile of the learned output lengths of the request's
            model and SLO class taken as ``N_out`` when the client gives no hint, in (0, 1]
            (0.5 = the median; higher predicts longer outputs: safer TPOT/E2E admission, fewer
            requests admitted). See `slomesh.scheduler.output_length`.
        output_length_min_samples: Completed requests of a (model, SLO class) needed before
            the learned quantile replaces the class's ``default_output_tokens``, >= 1.

    Raises:
        ValueError: a number is out of range or the fallback GPU type has no profile (the
            message names the field).
        TypeError: ``use_true_output_length`` is not a bool, ``output_length_quantile`` not a
            number or ``output_length_min_samples`` not an integer.
    """

    prefill_chunk_tokens: int = 8192
    max_num_seqs: int = 256
    fallback_gpu_type: str = "L4"
    default_block_size: int = 16
    use_true_output_length: bool = False
    output_length_quantile: float = 0.5
    output_length_min_samples: int = 20

    def __post_init__(self) -> None:
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {self.prefill_chunk_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.fallback_gpu_type not in PROFILES:
            raise ValueError(
                f"fallback_gpu_type: {self.fallback_gpu_type!r} has no profile "
                f"(known: {sorted(PROFILES)})"
            )
        if self.default_block_size < 1:
            raise ValueError(f"default_block_size: must be >= 1, got {self.default_block_size}")
        if not isinstance(self.use_true_output_length, bool):
            value = self.use_true_output_length
            raise TypeError(f"use_true_output_length: must be true or false, got {value!r}")
        q = self.output_length_quantile
        if isinstance(q, bool) or not isinstance(q, int | float):
            raise TypeError(f"output_length_quantile: must be a number, got {q!r}")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"output_length_quantile: must be in (0, 1], got {q}")
        n = self.output_length_min_samples
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"output_length_min_samples: must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"output_length_min_samples: must be >= 1, got {n}")


@dataclass(slots=True)
class Prediction:
    """What the scheduler expects if it places a request on one instance.

    All latencies in milliseconds, as the client sees them.

    Attributes:
        rtt_ms: Origin <-> serving region round trip (0 in the same region).
        queue_wait_ms: Wait before the request's prefill starts (RWT).
        prefill_ms: Prefill time of the uncached prompt tokens.
        transfer_ms: Time to bring KV or weights first (0: no moves yet).
        tpot_ms: Time per output token after the first.
        decode_ms: ``(output_tokens - 1) * tpot_ms``.
        ttft_ms: ``rtt_ms + queue_wait_ms + transfer_ms + prefill_ms``.
        e2e_ms: ``ttft_ms + decode_ms``.
        cached_prefix_tokens: Prompt tokens the instance holds in its prefix cache.
        uncached_prompt_tokens: Prompt tokens to prefill.
        output_tokens: Predicted output length ``N_out``.
        batch_size: Decode batch assumed for ``tpot_ms`` (with the request added).
        gpu_seconds: GPU time charged to the request (prefill + share of decode steps).
        cost_usd: ``gpu_seconds * price_usd_per_hour / 3600`` (no egress while no bytes move).
        bytes_moved: Bytes of KV/weights moved across regions for the placement (0 for now).
    """

    rtt_ms: float
    queue_wait_ms: float
    prefill_ms: float
    transfer_ms: float
    tpot_ms: float
    decode_ms: float
    ttft_ms: float
    e2e_ms: float
    cached_prefix_tokens: int
    uncached_prompt_tokens: int
    output_tokens: int
    batch_size: int
    gpu_seconds: float
    cost_usd: float
    bytes_moved: int = 0

    def meets(self, slo: SloClass, prompt_tokens: int, margin: float = 1.0) -> bool:
        """Whether the predicted timings meet `slo` with a safety margin.

        Args:
            slo: The request's SLO class.
            prompt_tokens: Prompt length in tokens (sets the TTFT target).
            margin: Fraction of each target the prediction may use, in (0, 1]; 0.9 keeps 10 %
                of every target as headroom for prediction error.

        Returns:
            True when TTFT, TPOT and E2E are within ``margin`` times their targets (targets the
            class does not set always pass).
        """
        return (
            self.ttft_ms <= margin * slo.ttft_target_ms(prompt_tokens)
            and self.tpot_ms <= margin * slo.tpot_target_ms()
            and self.e2e_ms <= margin * slo.e2e_target_ms()
        )

    def to_pb(self) -> common_pb2.PredictedTimings:
        """The `PredictedTimings` message of this prediction."""
        return common_pb2.PredictedTimings(
            ttft_ms=self.ttft_ms,
            tpot_ms=self.tpot_ms,
            e2e_ms=self.e2e_ms,
            queue_wait_ms=self.queue_wait_ms,
            prefill_ms=self.prefill_ms,
            decode_ms=self.decode_ms,
            rtt_ms=self.rtt_ms,
            transfer_ms=self.transfer_ms,
        )


def _profile(inst: InstanceView, config: PredictorConfig) -> GpuProfile:
    profile = PROFILES.get(inst.gpu_type)
    return profile if profile is not None else PROFILES[config.fallback_gpu_type]


def _model(inst: InstanceView) -> ModelSpec:
    return MODELS.get(inst.model, DEFAULT_MODEL)


def _kv_capacity_tokens(
    inst: InstanceView, profile: GpuProfile, model: ModelSpec, config: PredictorConfig
) -> int:
    block_size = inst.block_size or config.default_block_size
    blocks = inst.num_gpu_blocks or profile.num_gpu_blocks(model, block_size)
    return blocks * block_size


def kv_capacity_blocks(inst: InstanceView, config: PredictorConfig = PredictorConfig()) -> int:
    """KV blocks of an instance: the reported ``num_gpu_blocks``, else its GPU profile's.

    Args:
        inst: The instance.
        config: Predictor knobs (fallback GPU profile and block size).

    Returns:
        Number of KV blocks of ``inst.block_size`` (or ``config.default_block_size``) tokens.
    """
    if inst.num_gpu_blocks:
        return inst.num_gpu_blocks
    block_size = inst.block_size or config.default_block_size
    return _profile(inst, config).num_gpu_blocks(_model(inst), block_size)


def prefill_throughput_tokens_per_s(
    inst: InstanceView, config: PredictorConfig = PredictorConfig()
) -> float:
    """Prefill throughput of an instance in prompt tokens per second.

    The measured value from the agent when it is known (> 0); else the GPU profile's rate for
    one full chunk (`prefill_chunk_tokens`) sharing the step with the running decodes.
    """
    if inst.prefill_tokens_per_s > 0:
        return inst.prefill_tokens_per_s
    profile, model = _profile(inst, config), _model(inst)
    chunk = config.prefill_chunk_tokens
    running = inst.num_requests_running
    context = int(inst.kv_cache_usage * _kv_capacity_tokens(inst, profile, model, config))
    step_s = step_time_s(profile, model, chunk, running, context + chunk)
    return chunk / step_s


def decode_throughput_tokens_per_s(
    inst: InstanceView, config: PredictorConfig = PredictorConfig()
) -> float:
    """Decode throughput of an instance in output tokens per second (all sequences).

    The measured value when known (> 0); else the profile's rate at the current running batch
    (at least 1 sequence) and KV context.
    """
    if inst.decode_tokens_per_s > 0:
        return inst.decode_tokens_per_s
    profile, model = _profile(inst, config), _model(inst)
    batch = max(1, min(inst.num_requests_running, config.max_num_seqs))
    context = int(inst.kv_cache_usage * _kv_capacity_tokens(inst, profile, model, config))
    step_s = step_time_s(profile, model, 0, batch, context, attention_pairs=float(context))
    return batch / step_s


def queue_wait_ms(
    inst: InstanceView,
    new_kv_tokens: int,
    config: PredictorConfig = PredictorConfig(),
) -> float:
    """Predicted wait of a new request before its prefill starts (RWT), in milliseconds.

    ::

        W = queued_prefill_tokens / prefill_tokens_per_s
          + f * queued_decode_tokens / decode_tokens_per_s
        f = clamp(deficit / (kv_used + queued_prefill + queued_decode), 0, 1)
        deficit = kv_used + queued_prefill + queued_decode + new_kv_tokens - kv_capacity

    The first term is the prefill work ahead (vLLM runs waiting prefills first-come
    first-served). The second is the share of the decode work ahead that must finish before
    the KV cache has room for the requests ahead and this one: zero while everything fits,
    all of it when the cache is oversubscribed by the whole work ahead.

    Source: QLM (Patke et al., SoCC 2024), section 4: request waiting time = work ahead in the
    queue / the instance's token throughput; vLLM admits a waiting request only when its KV
    blocks fit.

    Args:
        inst: The instance (queued tokens include the scheduler's pending placements).
        new_kv_tokens: KV tokens the new request will add (uncached prompt + output).
        config: Predictor knobs.

    Returns:
        Wait in milliseconds, >= 0.
    """
    wait_s = 0.0
    if inst.queued_prefill_tokens > 0:
        wait_s += inst.queued_prefill_tokens / prefill_throughput_tokens_per_s(inst, config)
    if inst.queued_decode_tokens > 0:
        profile, model = _profile(inst, config), _model(inst)
        capacity = _kv_capacity_tokens(inst, profile, model, config)
        used = inst.kv_cache_usage * capacity
        ahead = used + inst.queued_prefill_tokens + inst.queued_decode_tokens
        deficit = ahead + new_kv_tokens - capacity
        if deficit > 0 and ahead > 0:
            share = min(1.0, deficit / ahead)
            wait_s += (
                share * inst.queued_decode_tokens / decode_throughput_tokens_per_s(inst, config)
            )
    return wait_s * 1000.0


def prefill_ms(
    inst: InstanceView,
    uncached_tokens: int,
    cached_tokens: int,
    config: PredictorConfig = PredictorConfig(),
) -> float:
    """Time to prefill `uncached_tokens` after a cached prefix of `cached_tokens`, in ms.

    The uncached tokens are split into chunks of `prefill_chunk_tokens`; each chunk is one
    engine step (GPU profile roofline) that also carries the instance's running decodes.
    Instances without a profile use their measured prefill throughput when known.

    Args:
        inst: The instance.
        uncached_tokens: Prompt tokens to compute (>= 0).
        cached_tokens: Prompt tokens already in the prefix cache (>= 0).
        config: Predictor knobs.

    Returns:
        Milliseconds, 0 when nothing is to be computed.
    """
    if uncached_tokens <= 0:
        return 0.0
    if inst.gpu_type not in PROFILES and inst.prefill_tokens_per_s > 0:
        return uncached_tokens / inst.prefill_tokens_per_s * 1000.0
    profile, model = _profile(inst, config), _model(inst)
    running = min(inst.num_requests_running, config.max_num_seqs)
    decode_context = int(inst.kv_cache_usage * _kv_capacity_tokens(inst, profile, model, config))
    chunk = config.prefill_chunk_tokens
    total_s = 0.0
    done = 0
    while done < uncached_tokens:
        n = min(chunk, uncached_tokens - done)
        prior = cached_tokens + done
        pairs = decode_context + n * prior + n * (n + 1) / 2.0
        total_s += step_time_s(
            profile, model, n, running, decode_context + prior + n, attention_pairs=pairs
        )
        done += n
    return total_s * 1000.0


def tpot_ms(
    inst: InstanceView,
    prompt_tokens: int,
    output_tokens: int,
    config: PredictorConfig = PredictorConfig(),
) -> tuple[float, int]:
    """Predicted time per output token on `inst` with the request added, in ms.

    One decode step at batch ``B = running + waiting + 1`` (the requests ahead decode beside
    this one; capped at `max_num_seqs`) over the KV context in use, the queued prompts, and this
    request's mean context (prompt + half its output). Instances without a profile use
    ``B / decode_tokens_per_s`` when measured.

    Source: SLOs-Serve (Chen et al., 2025), section 4: decode step time from a roofline over
    batch size and context; DESIGN.md section 2 ``TPOT_i(batch)``.

    Returns:
        (tpot_ms, B).
    """
    batch = min(inst.num_requests_running + inst.num_requests_waiting + 1, config.max_num_seqs)
    if inst.gpu_type not in PROFILES and inst.decode_tokens_per_s > 0:
        return batch / inst.decode_tokens_per_s * 1000.0, batch
    profile, model = _profile(inst, config), _model(inst)
    capacity = _kv_capacity_tokens(inst, profile, model, config)
    context = int(
        inst.kv_cache_usage * capacity
        + inst.queued_prefill_tokens
        + prompt_tokens
        + output_tokens / 2
    )
    step_s = step_time_s(profile, model, 0, batch, context, attention_pairs=float(context))
    return step_s * 1000.0, batch


def predict(
    inst: InstanceView,
    *,
    rtt_ms: float,
    prompt_tokens: int,
    cached_prefix_tokens: int,
    output_tokens: int,
    config: PredictorConfig = PredictorConfig(),
) -> Prediction:
    """Predicted timings and cost of one request on one instance (module docstring).

    Args:
        inst: The candidate instance.
        rtt_ms: Round trip between the request's origin and the instance's region, ms.
        prompt_tokens: Prompt length ``N_p`` in tokens.
        cached_prefix_tokens: ``h_i(q)``: prompt tokens the instance holds (clipped to
            ``prompt_tokens - 1``: the last prompt token is always computed, as in vLLM).
        output_tokens: Predicted output length ``N_out`` (>= 1).
        config: Predictor knobs.

    Returns:
        The prediction.
    """
    cached = max(0, min(cached_prefix_tokens, prompt_tokens - 1))
    uncached = prompt_tokens - cached
    n_out = max(1, output_tokens)
    wait = queue_wait_ms(inst, uncached + n_out, config)
    prefill = prefill_ms(inst, uncached, cached, config)
    tpot, batch = tpot_ms(inst, prompt_tokens, n_out, config)
    decode = (n_out - 1) * tpot
    ttft = rtt_ms + wait + prefill
    gpu_s = prefill / 1000.0 + (n_out - 1) * tpot / 1000.0 / batch
    cost = gpu_s * inst.price_usd_per_hour / 3600.0
    return Prediction(
        rtt_ms=rtt_ms,
        queue_wait_ms=wait,
        prefill_ms=prefill,
        transfer_ms=0.0,
        tpot_ms=tpot,
        decode_ms=decode,
        ttft_ms=ttft,
        e2e_ms=ttft + decode,
        cached_prefix_tokens=cached,
        uncached_prompt_tokens=uncached,
        output_tokens=n_out,
        batch_size=batch,
        gpu_seconds=gpu_s,
        cost_usd=cost,
    )
