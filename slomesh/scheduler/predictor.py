"""Predicted latency and cost of a request on a candidate instance (DESIGN.md section 2).

For a request ``q`` from origin region ``o`` on instance ``i`` (GPU type ``k``) in region ``j``::

    ttft_ms = rtt_ms(o, j) + model_load_ms + transfer_ms + queue_wait_ms + prefill_ms
    e2e_ms  = ttft_ms + decode_ms
    decode_ms = (N_out - 1) * tpot_ms

- ``model_load_ms`` (``M_q`` of a model switch): time for the instance to load the request's
  model first, 0 when it serves it (`slomesh.scheduler.model_load`); the GPU seconds of a
  switch count in the cost.
- ``rtt_ms``: the full round trip: the request travels ``rtt/2`` to the serving region and the
  first token ``rtt/2`` back (0 within one region). Later tokens stream behind the first, so
  the RTT is paid once per request, not per token.
- ``queue_wait_ms`` (``W_q``): the RWT estimator -- work queued ahead of ``q`` divided by the
  instance's measured throughputs (see `queue_wait_ms`).
- ``prefill_ms`` (``P_q``): prefill of the *uncached* prompt tokens only, ``N_p - h_i(q)``
  where ``h_i(q)`` is the instance's cached prefix, in chunks of
  `PredictorConfig.prefill_chunk_tokens`, the instance's running decodes sharing each step
  (chunked prefill).
- ``tpot_ms``: one decode step at the batch the instance will run with ``q`` added, stretched
  by the share of the instance's time the prompts arriving there take (chunked prefill runs
  them inside the decode steps).
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
- ``transfer_ms`` (the ``M_q`` of a KV move, "move the prefix, then run here"): 0 unless the
  prediction carries a `KvMove` (`plan_kv_move`): the prefix ``h_k`` that an instance of
  another region ``s`` holds is copied to the instance before the request is forwarded, so
  ``transfer_ms = 2 * RTT(s, j) + bytes / spare bandwidth(s -> j)`` (the control round trips,
  then the bytes), and the prefill covers ``N_p - h_k`` only. The request waits for the move, so
  the terms add up (what the live scheduler does: it forwards once the move is done).
- GPU seconds: prefill time plus ``q``'s share of each decode step (step time / batch), the
  decode step *not* stretched by the prefills sharing it (``tpot_ms`` is): the engine charges
  a mixed step's time to its requests by the tokens each brings (`slomesh.engine.model`), so
  the prompt tokens of others pay for their own chunk. With the stretched TPOT the predicted
  GPU cost of slomesh's placements exceeded the measured one by 28-29 % (whole Mooncake
  trace, 0.6x and 0.65x load); without, by 6-7 % (0.65x, 0.8x; docs/results/2026-11-22);
  ``cost_usd = gpu_seconds * price_usd_per_hour / 3600`` plus, for a KV move,
  ``bytes_moved / 1e9 * egress_usd_per_gb`` of the source region (as `slomesh.report` prices
  egress); a model switch adds its load time to the GPU seconds, but the weights it reads are
  not counted as bytes moved (their source -- an object store or another region -- and its
  egress price are not modelled).

**Step times.** An engine step (a prefill chunk with the running decodes beside it, or a decode
step) is timed by one of, in this order:

0. the instance's *online fit* (`InstanceView.online_fit`: the same linear models, refined by
   its region agent from the measured step times, `slomesh.online_fit`) once it rests on
   `PredictorConfig.online_fit_min_observations` observations: a side (decode or prefill) with
   fewer takes the fitted profile's coefficients when there is one (else the online fit waits
   for both sides), and a side with enough that predicts its recent observations worse than
   the static model (the agent's profile or the roofline; ``OnlineLatencyFit.static_rmse_ms``
   against ``prediction_rmse_ms``) discards the fit
   (`slomesh.online_fit.PublishedStepTimeFit.step_model`);
1. the instance's *fitted latency profile* (`PredictorConfig.latency_profiles`, written by
   ``slomesh profile``; see `slomesh.profiling.LatencyProfile`) when one is configured for its
   GPU type and was measured on the model the instance serves (see `fitted_step_ms`);
2. the instance's measured throughputs, for a GPU type without a roofline profile (e.g. "CPU");
3. the roofline of `slomesh.engine.profiles.step_time_s` for its GPU type (else
   `PredictorConfig.fallback_gpu_type`), the same model the emulator and simulator run.

Source: QLM (Patke et al., SoCC 2024), request waiting time (RWT) estimator: waiting time =
queued work / throughput. SLOs-Serve (Chen et al., 2025) and DistServe (Zhong et al., OSDI
2024): roofline prefill/decode step times and TTFT/TPOT SLOs.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from slomesh.engine.profiles import (
    DEFAULT_MODEL,
    MODELS,
    PROFILES,
    GpuProfile,
    ModelSpec,
    Roofline,
    roofline,
)
from slomesh.scheduler.view import InstanceView
from slomesh.slo import SloClass
from slomesh.v1 import common_pb2

if TYPE_CHECKING:
    from slomesh.online_fit import StepTimeModel
    from slomesh.profiling import LatencyProfile

__all__ = [
    "KvMove",
    "Prediction",
    "PredictorConfig",
    "decode_throughput_tokens_per_s",
    "fitted_step_ms",
    "kv_bytes_per_token",
    "kv_capacity_blocks",
    "load_latency_profile",
    "plan_kv_move",
    "predict",
    "prefill_ms",
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
        prefill_interference_max: Largest share of an instance's time, in [0, 1), that the
            prompts arriving there may be predicted to take from its decodes (`tpot_ms`:
            ``TPOT = decode step / (1 - rho)``, ``rho`` capped here; 0 turns the term off).
        latency_profiles: GPU type (as instances report it, `InstanceView.gpu_type`) -> path
            of a latency profile YAML written by ``slomesh profile``
            (`slomesh.profiling.LatencyProfile`); a relative path is taken from the working
            directory. Instances of such a GPU type are timed by the fitted profile instead
            of the roofline (`fitted_step_ms`), provided the profile's ``model`` is the model
            the instance serves; an instance serving another model keeps the roofline (or its
            measured throughputs). Given as a mapping (e.g. from a policy YAML's
            ``predictor.latency_profiles``) or as (GPU type, path) pairs; stored as a tuple of
            pairs sorted by GPU type, so that the config stays immutable and hashable. Every
            file is read and validated once, when the config is built
            (`load_latency_profile`); placement then only does a dict lookup.
        online_fit_min_observations: Observations (scrape intervals) an instance's online
            fit (`InstanceView.online_fit`, from its agent) needs per side (decode, prefill)
            before it times the instance's steps over the fitted profile and the roofline,
            >= 0; 0 never uses it.

    Raises:
        ValueError: a number is out of range, the fallback GPU type has no profile, or a
            latency profile cannot be read or is invalid (the message names the field, e.g.
            ``latency_profiles.H100: cannot read latency profile ...``).
        TypeError: ``use_true_output_length`` is not a bool, ``output_length_quantile`` or
            ``prefill_interference_max`` not a number, ``output_length_min_samples`` or
            ``online_fit_min_observations`` not an integer, or ``latency_profiles`` not a
            mapping of GPU type names to paths.
    """

    prefill_chunk_tokens: int = 8192
    max_num_seqs: int = 256
    fallback_gpu_type: str = "L4"
    default_block_size: int = 16
    use_true_output_length: bool = False
    output_length_quantile: float = 0.5
    output_length_min_samples: int = 20
    prefill_interference_max: float = 0.9
    latency_profiles: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    online_fit_min_observations: int = 30
    _fitted_profiles: Mapping[str, LatencyProfile] = field(
        init=False, repr=False, compare=False, hash=False
    )

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
        rho = self.prefill_interference_max
        if isinstance(rho, bool) or not isinstance(rho, int | float):
            raise TypeError(f"prefill_interference_max: must be a number, got {rho!r}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"prefill_interference_max: must be in [0, 1), got {rho}")
        m = self.online_fit_min_observations
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"online_fit_min_observations: must be an integer, got {m!r}")
        if m < 0:
            raise ValueError(f"online_fit_min_observations: must be >= 0, got {m}")
        pairs = _latency_profile_paths(self.latency_profiles)
        fitted: dict[str, LatencyProfile] = {}
        for gpu_type, path in pairs:
            try:
                fitted[gpu_type] = load_latency_profile(path)
            except ValueError as err:
                raise ValueError(f"latency_profiles.{gpu_type}: {err}") from None
        object.__setattr__(self, "latency_profiles", pairs)
        object.__setattr__(
            self, "_fitted_profiles", MappingProxyType(fitted) if fitted else _NO_PROFILES
        )

    def __reduce__(self) -> tuple[type[PredictorConfig], tuple[object, ...]]:
        # Pickle and copy by the init fields: the copy loads its latency profiles again (from
        # `load_latency_profile`'s cache within one process).
        return type(self), tuple(getattr(self, f.name) for f in fields(self) if f.init)


_NO_PROFILES: Mapping[str, LatencyProfile] = MappingProxyType({})

_LOADED_PROFILES: dict[tuple[Path, int], LatencyProfile] = {}
"""Latency profiles read so far, by (resolved path, modification time in ns)."""


def _latency_profile_paths(value: object) -> tuple[tuple[str, str], ...]:
    """``PredictorConfig.latency_profiles`` as (GPU type, path) pairs sorted by GPU type."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, tuple | list) and all(
        isinstance(item, tuple | list) and len(item) == 2 for item in value
    ):
        items = [tuple(item) for item in value]
    else:
        raise TypeError(
            f"latency_profiles: must be a mapping of GPU type to profile path, got {value!r}"
        )
    pairs = {}
    for gpu_type, path in items:
        if not isinstance(gpu_type, str) or not gpu_type:
            raise TypeError(
                f"latency_profiles: GPU type must be a non-empty string, got {gpu_type!r}"
            )
        if gpu_type in pairs:
            raise ValueError(f"latency_profiles.{gpu_type}: given twice")
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise TypeError(f"latency_profiles.{gpu_type}: must be a file path, got {path!r}")
        pairs[gpu_type] = os.fspath(path)
    return tuple(sorted(pairs.items()))


def load_latency_profile(path: str | os.PathLike[str]) -> LatencyProfile:
    """The latency profile at ``path``, read and validated once per process and file version.

    Profiles are cached by resolved path and modification time, so configs naming the same
    file share one object and a rewritten file is read again.

    Raises:
        slomesh.profiling.LatencyProfileError: (a ``ValueError``) the file cannot be read, is
            not YAML, or holds an invalid value (see `slomesh.profiling.LatencyProfile.load`).
    """
    # Imported here: the profiler pulls in aiohttp, which placement without profiles never needs.
    from slomesh.profiling import LatencyProfile, LatencyProfileError

    resolved = Path(path).expanduser().resolve()
    try:
        key = (resolved, resolved.stat().st_mtime_ns)
    except OSError as err:
        raise LatencyProfileError(f"cannot read latency profile {path}: {err}") from None
    profile = _LOADED_PROFILES.get(key)
    if profile is None:
        profile = _LOADED_PROFILES[key] = LatencyProfile.load(resolved)
    return profile


@dataclass(slots=True)
class Prediction:
    """What the scheduler expects if it places a request on one instance.

    All latencies in milliseconds, as the client sees them.

    Attributes:
        rtt_ms: Origin <-> serving region round trip (0 in the same region).
        queue_wait_ms: Wait before the request's prefill starts (RWT).
        prefill_ms: Prefill time of the uncached prompt tokens.
        transfer_ms: Time to bring prefix KV from another region first (0: no move).
        tpot_ms: Time per output token after the first.
        inflight_tpot_ms: Time per output token of the decodes already running on the
            instance once the request is placed there: ``tpot_ms``'s decode step, stretched
            by the prefill arrival rate with this request's uncached prompt counted in it
            (`tpot_ms`); what the ``protect-inflight`` filter holds to their targets.
        decode_ms: ``(output_tokens - 1) * tpot_ms``.
        ttft_ms: ``rtt_ms + model_load_ms + queue_wait_ms + transfer_ms + prefill_ms``.
        e2e_ms: ``ttft_ms + decode_ms``.
        cached_prefix_tokens: Prompt tokens the instance holds in its prefix cache.
        uncached_prompt_tokens: Prompt tokens to prefill.
        output_tokens: Predicted output length ``N_out``.
        batch_size: Decode batch assumed for ``tpot_ms`` (with the request added).
        gpu_seconds: GPU time charged to the request (prefill + share of decode steps).
        cost_usd: ``gpu_seconds * price_usd_per_hour / 3600``, plus the egress of the KV
            moved (``bytes_moved / 1e9 * egress_usd_per_gb`` of the source region).
        bytes_moved: KV bytes moved across regions for the placement (0: no move).
        model_load_ms: Time for the instance to load the request's model before serving it
            (``M_q`` of a model switch, or what is left of one under way); 0 when it serves
            the model already.
        transfer_source_region: Region of the instance the prefix KV is moved from ("" when
            nothing moves).
        transfer_source_instance: That instance ("" when nothing moves).
        transfer_prefix_tokens: ``h_k``: the prompt prefix the instance will hold once the
            move is done, tokens (0 when nothing moves).
        egress_cost_usd: The KV move's egress, USD, included in ``cost_usd`` (0: no move).
    """

    rtt_ms: float
    queue_wait_ms: float
    prefill_ms: float
    transfer_ms: float
    tpot_ms: float
    inflight_tpot_ms: float
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
    model_load_ms: float = 0.0
    transfer_source_region: str = ""
    transfer_source_instance: str = ""
    transfer_prefix_tokens: int = 0
    egress_cost_usd: float = 0.0

    @property
    def gpu_cost_usd(self) -> float:
        """``cost_usd`` without the KV move's egress: the GPU cost alone
        (`Placement.predicted_cost_usd`; reports price the moved bytes' egress themselves)."""
        return self.cost_usd - self.egress_cost_usd

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

    def slo_usage(self, slo: SloClass, prompt_tokens: int) -> float:
        """The largest fraction of an SLO target the predicted timings use.

        Args:
            slo: The request's SLO class.
            prompt_tokens: Prompt length in tokens (sets the TTFT target).

        Returns:
            ``max(ttft_ms / TTFT target, tpot_ms / TPOT target, e2e_ms / E2E target)`` over the
            targets the class sets (>= 0; 0 when it sets none): `meets` with ``margin`` holds
            when this is ``<= margin``.
        """
        usage = 0.0
        for value_ms, target_ms in (
            (self.ttft_ms, slo.ttft_target_ms(prompt_tokens)),
            (self.tpot_ms, slo.tpot_target_ms()),
            (self.e2e_ms, slo.e2e_target_ms()),
        ):
            if math.isfinite(target_ms) and target_ms > 0:
                usage = max(usage, value_ms / target_ms)
        return usage

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
            model_load_ms=self.model_load_ms,
        )


def _fitted(inst: InstanceView, config: PredictorConfig) -> StepTimeModel | None:
    """The step-time model of ``inst``: its online fit once it rests on enough observations
    and predicts them better than the static model
    (`slomesh.online_fit.PublishedStepTimeFit.step_model`), else the fitted latency profile of
    its GPU type if there is one for its model."""
    fitted = config._fitted_profiles.get(inst.gpu_type)
    if fitted is not None and fitted.model != inst.model:
        fitted = None
    online = inst.online_fit
    if online is not None and config.online_fit_min_observations:
        model = online.step_model(config.online_fit_min_observations, fitted)
        if model is not None:
            return model
    return fitted


def fitted_step_ms(
    profile: StepTimeModel,
    prefill_tokens: int,
    prefill_attention_pairs: float,
    prefill_context_tokens: int,
    decode_seqs: int,
    decode_context_tokens: float,
) -> float:
    """Duration of one engine step timed by a fitted latency profile, in ms.

    The step computes a chunk of ``prefill_tokens`` uncached tokens of one sequence beside
    ``decode_seqs`` sequences that decode one token each::

        compute_ms = profile.prefill_step_ms(prefill_tokens + decode_seqs,
                                             prefill_attention_pairs + decode_context_tokens)
        memory_ms  = profile.decode_step_ms(decode_seqs + (1 if prefill_tokens else 0),
                                            decode_context_tokens + prefill_context_tokens)
        step_ms    = max(compute_ms, memory_ms)

    Why this composition: the roofline (`slomesh.engine.profiles.step_time_s`) is
    ``max(compute, memory) + overhead``, and both sides are additive over the step's
    sequences (FLOPs per new token and per causal (query, key) pair; bytes for the weights,
    read once, and per KV token read). A prefill is compute-bound, so the fitted prefill model
    ``c0 + c1 * batch_tokens + c2 * attention_pairs`` is the roofline's compute side; a decode
    step is memory-bound, so the fitted decode model ``d0 + d1 * batch_size + d2 *
    context_tokens`` is its memory side. By additivity a decode sequence adds one token and
    one pair per context token to the compute side (vLLM runs a decode as a one-token chunk),
    and the prefilling sequence adds one sequence reading its ``prefill_context_tokens`` of KV
    to the memory side; each side's intercept is the step's fixed cost, paid once. The max
    picks the bound side as the roofline does: a long chunk beside a few decodes is
    compute-bound, a short last chunk beside a large decode batch memory-bound. (Adding the
    decode model's marginal cost to the prefill model's step instead counts the decodes' KV
    reads on top of a compute-bound step and misses their GEMM tokens: about 30 % over the
    roofline for a 1000-token chunk beside 256 decodes of 2000 tokens, where this composition,
    fitted to roofline points, is within about 1 %.)

    Source: the roofline of `slomesh.engine.profiles.step_time_s` (SLOs-Serve,
    arXiv:2504.08784, section 4; Vidur, arXiv:2405.05465), whose two sides the models of
    `slomesh.profiling` fit.

    Args:
        profile: The fitted latency profile (or an online fit, `slomesh.online_fit`).
        prefill_tokens: Uncached tokens of the chunk, >= 0 (0: a decode-only step).
        prefill_attention_pairs: The chunk's causal (query, key) pairs,
            ``n * prior + n * (n + 1) / 2`` for a chunk of ``n`` after ``prior`` tokens.
        prefill_context_tokens: KV tokens the chunk attends to, ``prior + n``.
        decode_seqs: Sequences decoding in the step, >= 0.
        decode_context_tokens: KV tokens those sequences attend to in all.

    Returns:
        Milliseconds; 0 for an empty step.

    Raises:
        ValueError: a count is negative.
    """
    seqs = decode_seqs + (1 if prefill_tokens > 0 else 0)
    if seqs == 0:
        return 0.0
    compute_ms = profile.prefill_step_ms(
        prefill_tokens + decode_seqs, prefill_attention_pairs + decode_context_tokens
    )
    memory_ms = profile.decode_step_ms(seqs, decode_context_tokens + prefill_context_tokens)
    return max(compute_ms, memory_ms)


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


class _Steps(NamedTuple):
    """How one instance's engine steps are timed, resolved once per prediction (`predict`
    needs them in its queue wait, prefill and TPOT alike; resolving them there once instead of
    in each is most of what a prediction saves on a decision's 12 candidates).

    Attributes:
        profile: GPU profile of the roofline (`_profile`).
        model: Model shape (`_model`).
        fitted: Online fit or fitted latency profile (`_fitted`); None: the roofline.
        kv_capacity_tokens: KV cache size in tokens (`_kv_capacity_tokens`).
        roofline: ``profile``'s roofline for ``model`` (`slomesh.engine.profiles.roofline`).
    """

    profile: GpuProfile
    model: ModelSpec
    fitted: StepTimeModel | None
    kv_capacity_tokens: int
    roofline: Roofline


_STEPS: dict[tuple[int, str, str, int, int], tuple[PredictorConfig, _Steps]] = {}


def _steps(inst: InstanceView, config: PredictorConfig) -> _Steps:
    # Without an online fit the result depends only on the config and these fields: kept,
    # as a decision resolves the same few (GPU, model) pairs for every candidate.
    key = (id(config), inst.gpu_type, inst.model, inst.block_size, inst.num_gpu_blocks)
    if inst.online_fit is None:
        got = _STEPS.get(key)
        if got is not None and got[0] is config:
            return got[1]
    profile, model = _profile(inst, config), _model(inst)
    steps = _Steps(
        profile,
        model,
        _fitted(inst, config),
        _kv_capacity_tokens(inst, profile, model, config),
        roofline(profile, model),
    )
    if inst.online_fit is None:
        if len(_STEPS) >= 1024:  # configs built on the fly (tests, sweeps): stay bounded
            _STEPS.clear()
        _STEPS[key] = (config, steps)
    return steps


def kv_bytes_per_token(inst: InstanceView) -> int:
    """KV bytes one token of the instance's model occupies (all layers, K and V), the size a
    KV move carries per token (`slomesh.engine.profiles.ModelSpec.kv_bytes_per_token`; an
    unknown model counts as the default model)."""
    return _model(inst).kv_bytes_per_token


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


def decode_throughput_tokens_per_s(
    inst: InstanceView, config: PredictorConfig = PredictorConfig()
) -> float:
    """Decode throughput of an instance in output tokens per second (all sequences).

    The measured value when known (> 0); else the rate of one decode step at the current
    running batch (at least 1 sequence) and KV context, timed by the fitted latency profile
    (`fitted_step_ms`) or the GPU profile's roofline.
    """
    if inst.decode_tokens_per_s > 0:
        return inst.decode_tokens_per_s
    return _decode_throughput_tokens_per_s(inst, config, _steps(inst, config))


def _decode_throughput_tokens_per_s(
    inst: InstanceView, config: PredictorConfig, steps: _Steps
) -> float:
    if inst.decode_tokens_per_s > 0:
        return inst.decode_tokens_per_s
    batch = max(1, min(inst.num_requests_running, config.max_num_seqs))
    context = int(inst.kv_cache_usage * steps.kv_capacity_tokens)
    if steps.fitted is not None:
        step_ms = fitted_step_ms(steps.fitted, 0, 0.0, 0, batch, context)
        # A fit whose decode step costs nothing (all coefficients 0) drains at once.
        return batch / step_ms * 1000.0 if step_ms > 0 else math.inf
    return batch / steps.roofline.step_s(batch, context, context)


def queue_wait_ms(
    inst: InstanceView,
    new_kv_tokens: int,
    config: PredictorConfig = PredictorConfig(),
    arrival_ms: float = 0.0,
) -> float:
    """Predicted wait of a new request before its prefill starts (RWT), in milliseconds.

    vLLM's chunked-prefill scheduler fills each step's token budget
    (``max_num_batched_tokens`` = `PredictorConfig.prefill_chunk_tokens`) first with one token
    per running decode, then with the prompt tokens of the waiting requests in arrival order.
    A new request therefore starts in the first step whose leftover budget reaches past the
    prompt tokens ahead of it.

    **Timeline of the scheduler's own placements.** The scheduler knows when each of its
    placements reaches the instance (`InstanceView.prefill_arrivals_ms`: placement time plus
    RTT/2) and so times the instance's prefill steps itself: a placement that finds no prefill
    step in flight starts one after the decode step in flight (half of one, expected); one
    that finds a step in flight waits for the next, which carries every prompt waiting then
    (up to ``budget`` tokens). The new request, reaching the instance ``arrival_ms`` from now,
    waits for the rest of the step then in flight plus ``floor(waiting / budget)`` full steps
    (placements reaching the instance after it are behind it: FCFS; at the same time, ahead). Prompt tokens the state
    reports beyond what this timeline holds at the state's timestamp (placed by other
    schedulers, or older than its horizon) are ``Q`` below, timed with an unknown phase::

        R         = running decodes (<= max_num_seqs)
        budget    = max(1, max_num_batched_tokens - R)        # prompt tokens per step
        W_known   = rest of the step in flight at arrival + floor(waiting / budget) * step(budget)
                    (half a decode step when no prefill is in flight and R > 0)
        Q         = max(0, state prompt tokens - timeline's tokens at the state's stamp)
                    (without a timeline: queued_prefill_tokens, pending placements included)
        W_unknown = step(min(Q, budget)) / 2 + floor(Q / budget) * step(budget)
        W_prefill = max(W_known, W_unknown)
        W_kv      = f * queued_decode_tokens / decode_tokens_per_s
        f         = clamp(deficit / (kv_used + Q' + queued_decode), 0, 1)
        deficit   = kv_used + Q' + queued_decode + new_kv_tokens - kv_capacity
        W         = W_prefill + W_kv                         # Q' = queued_prefill_tokens

    ``step(n)`` is one step of ``n`` fresh prompt tokens beside the ``R`` decodes (fitted
    latency profile, else the GPU's roofline). ``W_kv`` is the share of the decode work ahead
    that must finish before the KV cache has room for the requests ahead and this one (vLLM
    admits a waiting request only when its KV blocks fit). An instance with neither a fitted
    profile nor a GPU profile (e.g. "CPU") uses its measured prefill throughput for
    ``W_prefill = Q' / prefill_tokens_per_s``. `predict` also charges the request's first
    prefill step for the prompts it shares: those waiting ahead of it at arrival and those
    placed later that reach the instance before the step starts
    (``prefill_arrival_tokens_per_s * W``), up to the step's budget.

    Why a timeline: the formula alone on ``Q`` (state plus pending placements, half of the
    step in flight) erred by 43 % MdAPE at 6x load on the first 5000 Azure requests (40 % at
    1x): every request that waited >= 50 ms there found fewer than ``budget`` tokens ahead,
    so its wait was the rest of the one step in flight, whose size and phase ``Q`` does not
    tell. Knowing the exact step in flight but not its phase still leaves 34 %; the timeline
    knows the phase from the placements' arrival times (12-18 % at 6-7x, 3 % at 1x).

    Source: QLM (Patke et al., SoCC 2024), section 4: request waiting time = work ahead in
    the queue / the instance's token throughput; vLLM v1's scheduler
    (``vllm/v1/core/sched/scheduler.py``) schedules running requests first, then waiting ones,
    within ``max_num_batched_tokens``. An earlier form divided ``Q`` by the agent's measured
    prefill throughput (uncached tokens / TTFT, which counts waits and the path, not the
    engine's capacity): 3x over the observed waits (MdAPE 280 % at 6x load on Azure).

    Args:
        inst: The instance (queued tokens include the scheduler's pending placements).
        new_kv_tokens: KV tokens the new request will add (uncached prompt + output).
        config: Predictor knobs.
        arrival_ms: When the request reaches the instance, ms from now (RTT/2 of its origin,
            after a KV move if any); 0 = now.

    Returns:
        Wait in milliseconds, >= 0.
    """
    return _queue_wait_ms(inst, new_kv_tokens, config, _steps(inst, config), arrival_ms)[0]


def _queue_wait_ms(
    inst: InstanceView,
    new_kv_tokens: int,
    config: PredictorConfig,
    steps: _Steps,
    arrival_ms: float = 0.0,
    uncached_tokens: int = 0,
) -> tuple[float, float]:
    """(`queue_wait_ms`, the time its first prefill step takes longer for the prompt tokens
    ahead of it in that step, ms) of a request with ``uncached_tokens`` to prefill."""
    wait_ms = shared_ms = 0.0
    queued = inst.queued_prefill_tokens
    capacity = steps.kv_capacity_tokens
    used = inst.kv_cache_usage * capacity
    if steps.fitted is None and inst.gpu_type not in PROFILES and inst.prefill_tokens_per_s > 0:
        if queued > 0:
            wait_ms += queued / inst.prefill_tokens_per_s * 1000.0
    elif queued > 0 or inst.prefill_arrivals_ms or inst.num_requests_running > 0:
        running = min(inst.num_requests_running, config.max_num_seqs)
        budget = max(1, config.prefill_chunk_tokens - running)
        context = int(used)
        half_decode_ms = _mixed_step_ms(steps, 0, running, context) / 2.0 if running else 0.0
        ahead = 0
        if inst.prefill_arrivals_ms:
            known_ms, ahead, unknown = _timeline_wait_ms(
                inst, arrival_ms, steps, running, context, budget, half_decode_ms
            )
        else:
            known_ms, unknown = half_decode_ms, queued
        if uncached_tokens > 0 and known_ms > 0:
            own = min(uncached_tokens, max(1, budget - ahead))
            # Prompts placed later that reach the instance before the step starts join it.
            behind = int(inst.prefill_arrival_tokens_per_s * known_ms / 1000.0)
            shared = min(budget - own, ahead + behind)
            if shared > 0:
                shared_ms = _mixed_step_ms(
                    steps, shared + own, running, context
                ) - _mixed_step_ms(steps, own, running, context)
        unknown_ms = 0.0
        if unknown > 0:
            full_ms = _mixed_step_ms(steps, budget, running, context)
            first = min(unknown, budget)
            first_ms = full_ms if first == budget else _mixed_step_ms(steps, first, running, context)
            unknown_ms = first_ms / 2.0 + (unknown // budget) * full_ms
        wait_ms += max(known_ms, unknown_ms)
    if inst.queued_decode_tokens > 0:
        ahead = used + queued + inst.queued_decode_tokens
        deficit = ahead + new_kv_tokens - capacity
        if deficit > 0 and ahead > 0:
            share = min(1.0, deficit / ahead)
            decode_s = inst.queued_decode_tokens / _decode_throughput_tokens_per_s(
                inst, config, steps
            )
            wait_ms += share * decode_s * 1000.0
    return wait_ms, shared_ms


def _timeline_wait_ms(
    inst: InstanceView,
    arrival_ms: float,
    steps: _Steps,
    running: int,
    context: int,
    budget: int,
    half_decode_ms: float,
) -> tuple[float, int, int]:
    """The wait of a request reaching ``inst`` ``arrival_ms`` from now behind the scheduler's
    own placements (`InstanceView.prefill_arrivals_ms`), the prompt tokens ahead of it in its
    first step, and the prompt tokens the state reports beyond those placements, as
    ``(wait ms, tokens ahead, unknown tokens)`` (`queue_wait_ms`).

    The placements' prompts are run through the instance's chunked-prefill steps first come,
    first served, each chunk priced with the prompt's tokens before it (its cached prefix and
    its earlier chunks) as attention context: the later chunks of a long prompt cost far more
    than its first. The state counts a prompt as queued until its first token, whole, so the
    timeline's share of the state is the whole prompts it has not finished by the state's
    stamp."""
    stamp = min(-inst.state_stamp_age_ms, arrival_ms)
    # Placements not finished: [tokens not yet in a step, tokens before the next chunk (cached
    # prefix + chunks done), whole prompt, end of the step with its last chunk (inf before)].
    queue: deque[list[float]] = deque()
    clock = [-math.inf]  # end of the prefill step in flight
    known = -1  # whole prompt tokens of the placements unfinished at the state's stamp
    batch = (budget, running, context)
    for t, tokens, cached in inst.prefill_arrivals_ms:
        if t > arrival_ms:  # behind the request (placed before it, so ahead on a tie)
            break
        if known < 0 and t > stamp:
            _run_prefill_steps(steps, queue, clock, stamp, *batch)
            known = _unfinished_tokens(queue, stamp)
        _run_prefill_steps(steps, queue, clock, t, *batch)
        queue.append([tokens, cached, tokens, math.inf])
        if clock[0] <= t:
            # No prefill in flight: a step of its own after the decode step in flight.
            clock[0] = t + half_decode_ms
            _start_prefill_step(steps, queue, clock, *batch)
    if known < 0:
        _run_prefill_steps(steps, queue, clock, stamp, *batch)
        known = _unfinished_tokens(queue, stamp)
    unknown = max(0, inst.state_prefill_tokens - known)
    _run_prefill_steps(steps, queue, clock, arrival_ms, *batch)
    if clock[0] <= arrival_ms:
        return half_decode_ms, 0, unknown
    wait_ms = clock[0] - arrival_ms
    # The steps that still take only prompts ahead of the request: every full one.
    while (ahead := int(sum(entry[0] for entry in queue))) >= budget:
        before = clock[0]
        _start_prefill_step(steps, queue, clock, *batch)
        wait_ms += clock[0] - before
    return wait_ms, ahead, unknown


def _unfinished_tokens(queue: deque[list[float]], at_ms: float) -> int:
    """Whole prompt tokens of the queued placements whose last chunk has not ended by
    ``at_ms``."""
    return int(sum(entry[2] for entry in queue if entry[3] > at_ms))


def _run_prefill_steps(
    steps: _Steps,
    queue: deque[list[float]],
    clock: list[float],
    until_ms: float,
    budget: int,
    running: int,
    context: int,
) -> None:
    """Starts the prefill steps of the queued prompt tokens that start by ``until_ms``, each at
    the previous one's end (``clock[0]``), and forgets the placements finished by then."""
    while clock[0] <= until_ms and any(entry[0] > 0 for entry in queue):
        _start_prefill_step(steps, queue, clock, budget, running, context)
    while queue and queue[0][3] <= until_ms:
        queue.popleft()


def _start_prefill_step(
    steps: _Steps,
    queue: deque[list[float]],
    clock: list[float],
    budget: int,
    running: int,
    context: int,
) -> None:
    """One step at ``clock[0]``: up to ``budget`` queued prompt tokens, first come first
    served, beside ``running`` decodes; ``clock[0]`` becomes its end."""
    tokens = 0
    pairs = 0.0
    prefill_context = 0.0
    last: list[list[float]] = []
    for entry in queue:
        if tokens >= budget:
            break
        n = min(entry[0], budget - tokens)
        if n <= 0:
            continue
        prior = entry[1]
        pairs += n * prior + n * (n + 1) / 2.0
        prefill_context += prior + n
        entry[0] -= n
        entry[1] = prior + n
        tokens += n
        if entry[0] <= 0:
            last.append(entry)
    clock[0] += _step_ms(steps, int(tokens), pairs, int(prefill_context), running, context)
    for entry in last:
        entry[3] = clock[0]


def _step_ms(
    steps: _Steps,
    prefill_tokens: int,
    prefill_attention_pairs: float,
    prefill_context_tokens: int,
    decode_seqs: int,
    decode_context_tokens: int,
) -> float:
    """One engine step of ``prefill_tokens`` prompt tokens (``prefill_attention_pairs``
    attended (query, key) pairs over ``prefill_context_tokens`` of their sequences' KV) beside
    ``decode_seqs`` decodes over ``decode_context_tokens`` of KV, in ms: the fitted latency
    profile (`fitted_step_ms`) if the instance has one, else the roofline of its GPU."""
    if steps.fitted is not None:
        return fitted_step_ms(
            steps.fitted,
            prefill_tokens,
            prefill_attention_pairs,
            prefill_context_tokens,
            decode_seqs,
            decode_context_tokens,
        )
    new_tokens = prefill_tokens + decode_seqs
    if new_tokens == 0:
        return 0.0
    return 1000.0 * steps.roofline.step_s(
        new_tokens,
        decode_context_tokens + prefill_context_tokens,
        decode_context_tokens + prefill_attention_pairs,
    )


def _mixed_step_ms(
    steps: _Steps,
    prefill_tokens: int,
    decode_seqs: int,
    decode_context_tokens: int,
) -> float:
    """One engine step of ``prefill_tokens`` fresh prompt tokens (no cached prefix) beside
    ``decode_seqs`` decodes over ``decode_context_tokens`` of KV, in ms (`_step_ms`)."""
    pairs = prefill_tokens * (prefill_tokens + 1) / 2.0
    return _step_ms(steps, prefill_tokens, pairs, prefill_tokens, decode_seqs, decode_context_tokens)


def prefill_ms(
    inst: InstanceView,
    uncached_tokens: int,
    cached_tokens: int,
    config: PredictorConfig = PredictorConfig(),
) -> float:
    """Time to prefill `uncached_tokens` after a cached prefix of `cached_tokens`, in ms.

    The uncached tokens are split into chunks of `prefill_chunk_tokens`; each chunk is one
    engine step that also carries the instance's running decodes, timed by the fitted latency
    profile of the instance's GPU type and model (`fitted_step_ms`), else the GPU profile's
    roofline. Instances with neither use their measured prefill throughput when known.

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
    return _prefill_ms(inst, uncached_tokens, cached_tokens, config, _steps(inst, config))


def _prefill_ms(
    inst: InstanceView,
    uncached_tokens: int,
    cached_tokens: int,
    config: PredictorConfig,
    steps: _Steps,
) -> float:
    if uncached_tokens <= 0:
        return 0.0
    fitted = steps.fitted
    if fitted is None and inst.gpu_type not in PROFILES and inst.prefill_tokens_per_s > 0:
        return uncached_tokens / inst.prefill_tokens_per_s * 1000.0
    line = steps.roofline
    running = min(inst.num_requests_running, config.max_num_seqs)
    decode_context = int(inst.kv_cache_usage * steps.kv_capacity_tokens)
    chunk = config.prefill_chunk_tokens
    total_s = 0.0
    done = 0
    while done < uncached_tokens:
        n = min(chunk, uncached_tokens - done)
        prior = cached_tokens + done
        pairs = n * prior + n * (n + 1) / 2.0
        if fitted is not None:
            total_s += fitted_step_ms(fitted, n, pairs, prior + n, running, decode_context) / 1e3
        else:
            total_s += line.step_s(n + running, decode_context + prior + n, decode_context + pairs)
        done += n
    return total_s * 1000.0


def tpot_ms(
    inst: InstanceView,
    prompt_tokens: int,
    output_tokens: int,
    config: PredictorConfig = PredictorConfig(),
    uncached_prompt_tokens: int = 0,
) -> tuple[float, int, float]:
    """Predicted time per output token on `inst` with the request added, in ms.

    One decode step at batch ``B = running + waiting + 1`` (the requests ahead decode beside
    this one; capped at `max_num_seqs`) over the KV context in use, the queued prompts, and this
    request's mean context (prompt + half its output), timed by the fitted latency profile of
    the instance's GPU type and model (`fitted_step_ms`: the fitted ``decode_step_ms(B,
    context)`` unless so large a batch is compute-bound), else the GPU profile's roofline,
    stretched by the prefills that will share the decode's steps::

        rho  = min(prefill_interference_max, prefill_arrival_tokens_per_s * t_prefill_token)
        TPOT = t_decode_step(B, context) / (1 - rho)

    ``t_prefill_token`` is the time of one prompt token in a full prefill step
    (``step(prefill_chunk_tokens) / prefill_chunk_tokens``), so ``rho`` is the share of the
    instance's time the prompts arriving there take; with chunked prefill they run inside the
    decodes' steps and lengthen them, and over a decode lifetime of seconds the arrivals after
    this request count as much as those before it. Without this term a scheduler that sees a
    short decode step keeps admitting prompts to the fastest GPU until its decodes miss their
    TPOT and its queue their TTFT (first 5000 requests of the Azure conversation trace at 6x
    load: 120 TPOT and 238 TTFT misses among the 2295 requests on the H100, SLO attainment
    89.0 %; with it 1 and 1 among 2401, attainment 98.3 %). Instances with neither a fitted
    nor a GPU profile use ``B / decode_tokens_per_s`` when measured (the measurement already
    includes the interference).

    **The decodes already running there** see the same step, stretched by the arrival rate
    *with this request's prefill counted*: the placement raises the instance's rate by
    ``uncached_prompt_tokens / prefill_rate_window_s`` (`InstanceView.prefill_rate_window_s`,
    as the view counts it once the placement is recorded), and its prompt is prefilled in
    their steps, not in its own decode::

        rho_inflight  = min(prefill_interference_max,
                            (prefill_arrival_tokens_per_s
                             + uncached_prompt_tokens / prefill_rate_window_s) * t_prefill_token)
        TPOT_inflight = t_decode_step(B, context) / (1 - rho_inflight)

    Holding ``TPOT_inflight`` (not ``TPOT``) to the running requests' targets is what keeps
    the scheduler from placing a long prompt beside decodes that the rate before it left
    just within their TPOT: on the Mooncake conversation trace (50-90k-token prompts, each
    seconds of chunked prefill) at 0.65x load, slomesh without the ``kv-room`` filter attains
    its SLOs for 83.2 % of the 5606 requests with ``TPOT`` (478 TPOT misses), 94.0 % with
    ``TPOT_inflight`` (docs/results/2026-11-22).

    Source: SLOs-Serve (Chen et al., 2025), section 4: decode step time from a roofline over
    batch size and context, and prefill/decode co-scheduling within a step's token budget;
    DESIGN.md section 2 ``TPOT_i(batch)``. The ``1 / (1 - rho)`` stretch is the time share of
    a server also busy with a load ``rho`` (processor sharing; Kleinrock, Queueing Systems
    vol. 2, 1976, section 4.4).

    Args:
        inst: The instance.
        prompt_tokens: The request's prompt length ``N_p``, tokens.
        output_tokens: Its predicted output length ``N_out``, tokens.
        config: Predictor knobs.
        uncached_prompt_tokens: Prompt tokens it will prefill there (for ``TPOT_inflight``).

    Returns:
        (tpot_ms, B, tpot_inflight_ms).
    """
    tpot, batch, inflight, _ = _tpot_ms(
        inst, prompt_tokens, output_tokens, config, _steps(inst, config), uncached_prompt_tokens
    )
    return tpot, batch, inflight


def _tpot_ms(
    inst: InstanceView,
    prompt_tokens: int,
    output_tokens: int,
    config: PredictorConfig,
    steps: _Steps,
    uncached_prompt_tokens: int = 0,
) -> tuple[float, int, float, float]:
    """(`tpot_ms`'s three values, the decode step alone -- not stretched by the prefills --,
    ms)."""
    batch = min(inst.num_requests_running + inst.num_requests_waiting + 1, config.max_num_seqs)
    fitted = steps.fitted
    if fitted is None and inst.gpu_type not in PROFILES and inst.decode_tokens_per_s > 0:
        # Measured: the running decodes' throughput already includes the prefills' share.
        measured_ms = batch / inst.decode_tokens_per_s * 1000.0
        return measured_ms, batch, measured_ms, measured_ms
    capacity = steps.kv_capacity_tokens
    context = int(
        inst.kv_cache_usage * capacity
        + inst.queued_prefill_tokens
        + prompt_tokens
        + output_tokens / 2
    )
    if fitted is not None:
        step_ms = fitted_step_ms(fitted, 0, 0.0, 0, batch, context)
    else:
        step_ms = 1000.0 * steps.roofline.step_s(batch, context, context)
    rate = inst.prefill_arrival_tokens_per_s
    with_own = rate + uncached_prompt_tokens / inst.prefill_rate_window_s
    if with_own <= 0:
        return step_ms, batch, step_ms, step_ms
    chunk = config.prefill_chunk_tokens
    per_token_s = _mixed_step_ms(steps, chunk, 0, 0) / 1000.0 / chunk
    rho_max = config.prefill_interference_max
    rho = min(rho_max, rate * per_token_s)
    rho_inflight = min(rho_max, with_own * per_token_s)
    return step_ms / (1.0 - rho), batch, step_ms / (1.0 - rho_inflight), step_ms


class KvMove(NamedTuple):
    """A prefix KV move from an instance of another region to the candidate instance.

    Attributes:
        source_region: Region of the instance holding the prefix.
        source_instance: That instance.
        prefix_tokens: ``h_k``: prompt tokens the destination holds once the move is done.
        bytes: KV bytes sent over the WAN: the blocks the destination lacks.
        transfer_ms: Control round trip plus the bytes at the link's spare bandwidth, ms.
        egress_cost_usd: ``bytes / 1e9 * egress_usd_per_gb`` of the source region.
    """

    source_region: str
    source_instance: str
    prefix_tokens: int
    bytes: int
    transfer_ms: float
    egress_cost_usd: float


KV_MOVE_CONTROL_ROUND_TRIPS = 2
"""Round trips between a move's destination and source before its bytes flow: the
destination's KV transfer service asks the source for the object's manifest
(``DescribeObject``), then opens the chunk stream (``FetchChunks``), whose first chunk arrives
one more round trip later (`services.kv_transfer.server`)."""


def plan_kv_move(
    *,
    source_region: str,
    source_instance: str,
    source_prefix_tokens: int,
    cached_prefix_tokens: int,
    block_size: int,
    kv_bytes_per_token: int,
    control_rtt_ms: float,
    spare_bytes_per_s: float | None,
    egress_usd_per_gb: float,
    link_queue_ms: float = 0.0,
) -> KvMove | None:
    """The move of the blocks ``[h_i, h_k)`` of a prompt from a source instance, or None.

    ::

        bytes       = (h_k - h_i) / block_size * block_size * kv_bytes_per_token
        transfer_ms = 2 * RTT(s, j) + link_queue_ms + bytes / spare_bytes_per_s(s -> j) * 1000
        egress_usd  = bytes / 1e9 * egress_usd_per_gb(s)

    The control round trips are the destination's KV transfer service asking the source for
    the object's manifest and then for its chunks (`KV_MOVE_CONTROL_ROUND_TRIPS`); the bytes
    then flow at the link's spare bandwidth (`ClusterView.link_spare_bytes_per_s`: capacity
    less the foreground transfers already on it, as the link's bandwidth scheduler publishes
    it), after the moves this scheduler already ordered on the link (``link_queue_ms``,
    `ClusterView.link_queue_ms`: foreground moves are served first in, first out). Source:
    DESIGN.md section 2 (``M_q``); egress priced as `slomesh.report` does.

    Args:
        source_region: Region ``s`` of the source instance.
        source_instance: The source instance (it holds ``h_k``).
        source_prefix_tokens: ``h_k``, tokens (a multiple of ``block_size``).
        cached_prefix_tokens: ``h_i``: what the destination holds already, tokens.
        block_size: Tokens per KV block of both ends (>= 1).
        kv_bytes_per_token: KV bytes of one token of the model
            (`slomesh.engine.profiles.ModelSpec.kv_bytes_per_token`).
        control_rtt_ms: ``RTT(s, j)``, ms.
        spare_bytes_per_s: Spare bandwidth of the link ``s -> j``, bytes/s; None (unknown),
            0 or not finite: no move.
        egress_usd_per_gb: Egress price of the source region, USD per GB.
        link_queue_ms: Time until the link is done with the foreground moves ahead, ms.

    Returns:
        The move, or None when it would carry no whole block or the link has no spare
        bandwidth.

    Raises:
        ValueError: ``block_size`` < 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    blocks = (source_prefix_tokens - cached_prefix_tokens) // block_size
    if (
        blocks <= 0
        or spare_bytes_per_s is None
        or not (0.0 < spare_bytes_per_s < math.inf)
    ):
        return None
    nbytes = blocks * block_size * kv_bytes_per_token
    return KvMove(
        source_region=source_region,
        source_instance=source_instance,
        prefix_tokens=cached_prefix_tokens + blocks * block_size,
        bytes=nbytes,
        transfer_ms=KV_MOVE_CONTROL_ROUND_TRIPS * control_rtt_ms
        + link_queue_ms
        + nbytes / spare_bytes_per_s * 1000.0,
        egress_cost_usd=nbytes / 1e9 * egress_usd_per_gb,
    )


def predict(
    inst: InstanceView,
    *,
    rtt_ms: float,
    prompt_tokens: int,
    cached_prefix_tokens: int,
    output_tokens: int,
    config: PredictorConfig = PredictorConfig(),
    model_load_ms: float = 0.0,
    charge_model_load: bool = True,
    kv_move: KvMove | None = None,
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
        model_load_ms: ``M_q``: time before the instance serves the request's model, ms
            (>= 0); ``inst`` is then the instance as it will be once loaded
            (`slomesh.scheduler.model_load.ModelLoad.instance`).
        charge_model_load: Count the load's GPU seconds in the cost (a switch this placement
            starts); False for a load already under way, which another placement paid for.
        kv_move: Move the prefix ``kv_move.prefix_tokens`` from another region first
            (`plan_kv_move`): its ``transfer_ms`` precedes the queue wait, the prefill covers
            the prompt past that prefix, and its egress adds to the cost.

    Returns:
        The prediction.
    """
    if kv_move is not None:
        cached_prefix_tokens = max(cached_prefix_tokens, kv_move.prefix_tokens)
    cached = max(0, min(cached_prefix_tokens, prompt_tokens - 1))
    uncached = prompt_tokens - cached
    n_out = max(1, output_tokens)
    steps = _steps(inst, config)
    transfer = kv_move.transfer_ms if kv_move is not None else 0.0
    # The request reaches the instance RTT/2 from now, after its KV move if any.
    wait, shared_ms = _queue_wait_ms(
        inst, uncached + n_out, config, steps, rtt_ms / 2.0 + transfer, uncached
    )
    prefill = _prefill_ms(inst, uncached, cached, config, steps) + shared_ms
    tpot, batch, inflight_tpot, step = _tpot_ms(
        inst, prompt_tokens, n_out, config, steps, uncached
    )
    decode = (n_out - 1) * tpot
    ttft = rtt_ms + model_load_ms + transfer + wait + prefill
    gpu_s = prefill / 1000.0 + (n_out - 1) * step / 1000.0 / batch
    if charge_model_load:
        gpu_s += model_load_ms / 1000.0
    cost = gpu_s * inst.price_usd_per_hour / 3600.0
    if kv_move is not None:
        cost += kv_move.egress_cost_usd
    return Prediction(
        rtt_ms=rtt_ms,
        queue_wait_ms=wait,
        prefill_ms=prefill,
        transfer_ms=transfer,
        tpot_ms=tpot,
        inflight_tpot_ms=inflight_tpot,
        decode_ms=decode,
        ttft_ms=ttft,
        e2e_ms=ttft + decode,
        cached_prefix_tokens=cached,
        uncached_prompt_tokens=uncached,
        output_tokens=n_out,
        batch_size=batch,
        gpu_seconds=gpu_s,
        cost_usd=cost,
        model_load_ms=model_load_ms,
        bytes_moved=kv_move.bytes if kv_move is not None else 0,
        transfer_source_region=kv_move.source_region if kv_move is not None else "",
        transfer_source_instance=kv_move.source_instance if kv_move is not None else "",
        transfer_prefix_tokens=kv_move.prefix_tokens if kv_move is not None else 0,
        egress_cost_usd=kv_move.egress_cost_usd if kv_move is not None else 0.0,
    )
