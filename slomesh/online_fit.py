"""Online refinement of an instance's latency model from its measured step times (issue 4).

The offline profile (``slomesh profile``, `slomesh.profiling`) fits, per model and GPU type::

    prefill_ms     = c0 + c1 * batch_tokens + c2 * attention_pairs
    decode_step_ms = d0 + d1 * batch_size   + d2 * context_tokens

A region agent refines both models on line, per instance, from what the instance's
``/metrics`` show between two scrapes, and publishes the coefficients in its
``InstanceState`` (``decode_fit``, ``prefill_fit``), which the scheduler's predictor prefers to
the static profile once they rest on enough observations
(`slomesh.scheduler.predictor.PredictorConfig.online_fit_min_observations`) and predict them
better than it does (*the guard*, below).

**The estimator** (`OnlineLinearFit`) is recursive least squares with exponential forgetting,
in information form, with a prior and non-negative coefficients. After observations
``(x_i, y_i, w_i)``, ``i = 1..n`` (newest last), it returns::

    argmin_{θ >= 0}  Σ_i λ^(n-i) w_i (y_i - x_i·θ)²  +  Σ_a ω_a (ŷ_a - x_a·θ)²

The first sum is the data with forgetting factor ``λ`` (memory ``1 / (1 - λ)`` observations).
The second is the prior: anchor points ``x_a`` spanning the instance's operating range, with
the times ``ŷ_a`` that the offline profile, or the GPU's roofline, gives there
(`StepTimePrior`), of total weight ``prior_weight`` observations, never forgotten. Where the
observations are many they decide; in directions they do not excite (a batch size never run)
the prior does, and the information matrix cannot decay to singular -- the covariance wind-up
of plain RLS with forgetting when the input is not persistently exciting. The sufficient
statistics ``S = Σ λ^(n-i) w_i x_i x_iᵀ`` and ``b = Σ λ^(n-i) w_i x_i y_i`` are updated
recursively (``S <- λ S + w x xᵀ``: O(p²) per observation, the information form of the RLS
recursion); the non-negative minimiser is then exact, found over the ``2^p`` supports of the
``p = 3`` coefficients, as `slomesh.profiling.nonnegative_lstsq` does for the offline fit.

Source: RLS with exponential forgetting: L. Ljung, *System Identification: Theory for the
User*, 2nd ed., 1999, section 11.2; a regulariser (prior) that does not forget, against
wind-up: S. Gunnarsson, "Combining tracking and regularization in recursive least squares
identification", Proc. 35th IEEE CDC, 1996; NNLS optimality by support (KKT): C. Lawson and
R. Hanson, *Solving Least Squares Problems*, 1974, ch. 23. Model terms: SLOs-Serve (Chen et al.,
2025, arXiv:2504.08784) section 4 and Vidur (Agrawal et al., MLSys 2024).

**The observations** (`step_time_observations`) come from the deltas of vLLM's cumulative
counters and histograms between two scrapes (names of vLLM 0.32,
``vllm/v1/metrics/loggers.py``; the emulator exports the same):

- *decode*: the mean inter-token latency (``vllm:inter_token_latency_seconds``, sum / count
  over the interval) is the mean decode step time, paired with the mean decode batch (ITL
  samples / engine steps, ``vllm:iteration_tokens_total``'s count) and the KV context in use
  (``vllm:kv_cache_usage_perc`` times the KV capacity in tokens, mean of the two scrapes -- the
  same context measure the predictor feeds the model). An ITL is the time between two tokens
  of one sequence, i.e. the period of the engine step that produced the second one. Only
  intervals **without prefill work** count: no first token (``vllm:time_to_first_token_seconds``
  count unchanged), no prompt tokens (``vllm:prompt_tokens_total`` unchanged), no request
  waiting at either scrape, and no request forwarded by the agent still waiting for its first
  token at either scrape (a chunked prefill in progress emits no counter until it completes).
  An interval with prefill mixed in is skipped for the decode model: its ITLs are the times of
  mixed prefill+decode steps, and the predictor charges the prefills' share of the decodes'
  steps separately (`slomesh.scheduler.predictor.tpot_ms`'s interference term), so fitting
  them here would count it twice.
- *prefill*: requests finished in the interval give their mean prefill time
  (``vllm:request_prefill_time_seconds``: first scheduled to first token, all chunks of the
  prompt), paired with their mean uncached and cached prompt tokens
  (``vllm:request_prefill_kv_computed_tokens`` and ``vllm:request_prompt_tokens``; without the
  former, the prompt tokens times the interval's prefix-cache miss ratio) and the decode batch
  and KV context around the interval (running gauge and KV usage, mean of the two scrapes),
  which share the prompt's steps. Features follow the predictor's composition
  (`slomesh.scheduler.predictor.fitted_step_ms`, compute side): ``k`` chunks of at most
  ``chunk_tokens`` each carry the running decodes, so ``x = [k, n + k·B, pairs(n, c) + k·C]``.
  Only intervals whose finished requests were all *prefilled alone* count: prompts prefilled
  together in one step each see the whole step, so their times carry the other prompts'
  tokens (in the simulator, Azure conversations at 6x load, the steps of a request's prefill
  held 1.6 to 3.5 times its own tokens on average by GPU, and fitting them made the prefill
  intercept 35 to 186 ms instead of the roofline's 1 to 2, which, as the compute side of every
  step, timed decode steps too slow by a median factor of 1.03 (L4) to 5.7 (A10G)). The
  agent knows which: a request is alone when no other request it forwarded to the instance
  waited for its first token at any time between the request's forwarding and its first
  token (any prompt sharing a step did); it passes the number of such requests finished
  since the last scrape (``solo_prefills``), and the interval counts when that is the
  histogram's count. A prefill no longer than the memory
  side of its steps (`MEMORY_BOUND_MARGIN`) is not fitted either: its time is the weights'
  and KV's read, not the prompt's FLOPs. Approximations, stated: the means over several
  requests use the pairs of the mean prompt (``pairs`` is convex in ``n``: a mix of short and
  long prompts is under-counted); the batch and context are those around the request's
  *end*, not its prefill; the solo prefills are those of quiet moments (no other request
  waiting), a sample of the instance's operating points tilted to small batches.

**The guard.** The scheduler should use the online fit only where it predicts better than the
static model it replaces (the agent's offline profile, else the GPU's roofline, which the
simulator's engine *is*). Each observation is therefore predicted, before it is folded in, by
the current fit and by the static model, each timed as the predictor times it
(`composed_step_ms`: a decode step, or the prefill's chunks beside the running decodes, as the
max of the compute and memory sides), and the forgetting-weighted RMSE of both is published
with the fit (``prediction_rmse_ms``, ``static_rmse_ms``); `PublishedStepTimeFit.step_model`
takes the fit only when each side with enough observations has the lower one. One-step-ahead
(prequential) errors, not the fit's in-sample residuals: they measure what the scheduler gets
from the published coefficients, and they see the composition (the decode model alone fitted
the decode steps to 0.1 % while the composed prediction was up to 5.7 times too slow). Source:
prequential model assessment, A. P. Dawid, "Present position and potential developments: some
personal views. Statistical theory: the prequential approach", J. R. Stat. Soc. A 147, 1984.

All times are divided by the server's ``time_scale`` (the emulator's wall seconds per
modelled second, 1 for vLLM), so the coefficients are the modelled device's, as a profile's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Protocol, Self

import numpy as np

from slomesh.engine.profiles import (
    DEFAULT_MODEL,
    PROFILES,
    ModelSpec,
    decode_step_time_s,
    prefill_time_s,
)
from slomesh.v1 import state_pb2
from slomesh.vllm_metrics import ScrapedMetrics

if TYPE_CHECKING:
    from slomesh.profiling import LatencyProfile

__all__ = [
    "DECODE_TERMS",
    "PREFILL_TERMS",
    "DecodeObservation",
    "InstanceStepTimeFit",
    "LinearStepModel",
    "OnlineFitConfig",
    "OnlineLinearFit",
    "PredictionErrors",
    "PrefillObservation",
    "PublishedStepTimeFit",
    "StepTimeModel",
    "StepTimePrior",
    "composed_step_ms",
    "step_time_observations",
]

DECODE_TERMS = ("intercept_ms", "per_sequence_ms", "per_context_token_ms")
"""Coefficients of the decode model, in order (as `slomesh.profiling.DecodeCoefficients`)."""
PREFILL_TERMS = ("intercept_ms", "per_batch_token_ms", "per_attention_pair_ms")
"""Coefficients of the prefill model, in order (as `slomesh.profiling.PrefillCoefficients`)."""

DEFAULT_FORGETTING_FACTOR = 0.995
"""Weight an observation keeps per newer one: memory ``1 / (1 - 0.995)`` = 200 observations,
about 20 s of decode-only scrape intervals at the agent's 10 Hz."""
DEFAULT_PRIOR_WEIGHT = 0.05
"""Total weight of the prior's anchor points, in observations. Small on purpose: a scrape
interval's mean step time is an accurate measurement (the mean of many ITLs) and the prior an
extrapolation, so the prior should decide only the directions the observations do not excite
(e.g. batch and context grow together under most loads, leaving their split to the prior), not
pull against them where they are. Against the emulator with a prior twice too slow, 5 (the
weight of five observations) left 8-30 % errors and an R² of -21 on the observations, 0.05
left under 1 % and an R² of 0.95."""
MEMORY_BOUND_MARGIN = 0.02
"""A prefill observation no longer than ``1 + MEMORY_BOUND_MARGIN`` times the memory side of
its steps (by the current decode model) was memory-bound, and is not fitted by the prefill
(compute-side) model: its time is the weights' and KV's read, not its FLOPs (a short prompt
beside a large decode batch). Fitted anyway, such times raise the prefill intercept towards the
memory side's (simulator, Azure conversations at 6x load, solo prefills only: 2.6 ms instead of
the roofline's 1.0 on an H100, 5.8 instead of 1.5 on an L40S; 1.2 and 2.8 without them)."""

_DECODE_ANCHOR_BATCHES = (1, 4, 16, 64, 256)
_DECODE_ANCHOR_CONTEXTS = (256, 2048, 8192)  # KV tokens per sequence
_PREFILL_ANCHOR_TOKENS = (128, 512, 2048, 8192)
_PREFILL_ANCHOR_CACHED = (0, 4096)


# ---------------------------------------------------------------------------------- models


class StepTimeModel(Protocol):
    """What the predictor asks of a latency model (`slomesh.profiling.LatencyProfile` and
    `LinearStepModel` both answer)."""

    def prefill_step_ms(self, batch_tokens: float, attention_pairs: float) -> float: ...

    def decode_step_ms(self, batch_size: int, context_tokens: float) -> float: ...


@dataclass(frozen=True, slots=True)
class LinearStepModel:
    """Prefill and decode step times linear in the roofline features (module docstring).

    Attributes:
        prefill: ``(intercept_ms, per_batch_token_ms, per_attention_pair_ms)``, each >= 0.
        decode: ``(intercept_ms, per_sequence_ms, per_context_token_ms)``, each >= 0.

    Raises:
        ValueError: not three finite non-negative numbers each.
    """

    prefill: tuple[float, float, float]
    decode: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            value = getattr(self, name)
            if len(value) != 3 or not all(math.isfinite(v) and v >= 0 for v in value):
                raise ValueError(f"{name}: must be 3 finite coefficients >= 0, got {value!r}")

    @classmethod
    def from_profile(cls, profile: LatencyProfile) -> Self:
        """The coefficients of an offline latency profile."""
        p, d = profile.prefill.coefficients, profile.decode.coefficients
        return cls(
            prefill=(p.intercept_ms, p.per_batch_token_ms, p.per_attention_pair_ms),
            decode=(d.intercept_ms, d.per_sequence_ms, d.per_context_token_ms),
        )

    @classmethod
    def from_roofline(cls, gpu_type: str, model: ModelSpec = DEFAULT_MODEL) -> Self:
        """The roofline of `slomesh.engine.profiles.step_time_s` as the two linear sides::

            prefill = (overhead, 2 N / F, 4 L d / F)            # compute side, ms
            decode  = (overhead + W / BW, kv / BW, kv / BW)      # memory side, ms

        with ``F = peak_flops * compute_efficiency``, ``BW = mem_bandwidth * memory_efficiency``,
        ``N`` parameters, ``L`` layers of width ``d``, ``W`` weight bytes and ``kv`` KV bytes
        per token. Composed as the predictor composes a step (`composed_step_ms`: the max of
        the two) it is ``step_time_s`` exactly for a decode step, and up to the KV write of the
        chunk's own tokens (``kv * (n - 1) / BW``) for a step carrying an ``n``-token chunk.

        Source: `slomesh.engine.profiles.step_time_s` (SLOs-Serve, arXiv:2504.08784, section 4;
        Kaplan et al. 2020, arXiv:2001.08361, table 1 for the FLOP counts).

        Raises:
            ValueError: ``gpu_type`` has no GPU profile.
        """
        gpu = PROFILES.get(gpu_type)
        if gpu is None:
            raise ValueError(f"gpu_type: {gpu_type!r} has no roofline profile")
        flops_per_ms = gpu.peak_flops * gpu.compute_efficiency / 1e3
        bytes_per_ms = gpu.mem_bandwidth_bytes_per_s * gpu.memory_efficiency / 1e3
        overhead_ms = gpu.step_overhead_s * 1e3
        kv_ms = model.kv_bytes_per_token / bytes_per_ms
        return cls(
            prefill=(
                overhead_ms,
                2.0 * model.num_params / flops_per_ms,
                4.0 * model.num_layers * model.hidden_size / flops_per_ms,
            ),
            decode=(overhead_ms + model.weight_bytes / bytes_per_ms, kv_ms, kv_ms),
        )

    def prefill_step_ms(self, batch_tokens: float, attention_pairs: float) -> float:
        """Time of a prefill step of ``batch_tokens`` uncached tokens evaluating
        ``attention_pairs`` causal pairs, ms; 0 for an empty batch (as
        `slomesh.profiling.LatencyProfile.prefill_step_ms`).

        Raises:
            ValueError: a count is negative.
        """
        if batch_tokens < 0 or attention_pairs < 0:
            raise ValueError(
                f"batch_tokens and attention_pairs must be >= 0, got {batch_tokens}, "
                f"{attention_pairs}"
            )
        if batch_tokens == 0:
            return 0.0
        c0, c1, c2 = self.prefill
        return c0 + c1 * batch_tokens + c2 * attention_pairs

    def decode_step_ms(self, batch_size: int, context_tokens: float) -> float:
        """Time of one decode step of ``batch_size`` sequences attending to
        ``context_tokens`` KV tokens in all, ms (as
        `slomesh.profiling.LatencyProfile.decode_step_ms`).

        Raises:
            ValueError: ``batch_size`` < 1 or ``context_tokens`` < 0.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
        d0, d1, d2 = self.decode
        return d0 + d1 * batch_size + d2 * context_tokens


def composed_step_ms(
    model: StepTimeModel,
    prefill_tokens: float,
    prefill_attention_pairs: float,
    prefill_context_tokens: float,
    decode_seqs: float,
    decode_context_tokens: float,
) -> float:
    """One engine step timed by a linear model's two sides, as the predictor times it, ms::

        compute_ms = model.prefill_step_ms(prefill_tokens + decode_seqs,
                                           prefill_attention_pairs + decode_context_tokens)
        memory_ms  = model.decode_step_ms(decode_seqs + (1 if prefill_tokens else 0),
                                          decode_context_tokens + prefill_context_tokens)
        step_ms    = max(compute_ms, memory_ms)

    The same formula as `slomesh.scheduler.predictor.fitted_step_ms` (which explains it; a
    unit test holds the two equal), here so that the agent can time its observations as the
    scheduler will time the steps (`InstanceStepTimeFit`'s comparison with the static model)
    without importing the scheduler. Counts may be fractional (the means an observation holds).

    Source: the roofline of `slomesh.engine.profiles.step_time_s` (SLOs-Serve,
    arXiv:2504.08784, section 4), whose compute and memory sides the two models fit.

    Args:
        model: Step-time model (a `LinearStepModel` or an offline
            `slomesh.profiling.LatencyProfile`).
        prefill_tokens: Uncached tokens of the step's prompt chunk, >= 0 (0: a decode step).
        prefill_attention_pairs: The chunk's causal (query, key) pairs.
        prefill_context_tokens: KV tokens the chunk attends to (its prior tokens plus itself).
        decode_seqs: Sequences decoding in the step, >= 0.
        decode_context_tokens: KV tokens those sequences attend to in all.

    Returns:
        Milliseconds; 0 for an empty step.

    Raises:
        ValueError: a count is negative.
    """
    seqs = decode_seqs + (1 if prefill_tokens > 0 else 0)
    if seqs <= 0:
        return 0.0
    compute_ms = model.prefill_step_ms(
        prefill_tokens + decode_seqs, prefill_attention_pairs + decode_context_tokens
    )
    memory_ms = model.decode_step_ms(seqs, decode_context_tokens + prefill_context_tokens)
    return max(compute_ms, memory_ms)


# ---------------------------------------------------------------------------------- estimator


@dataclass(frozen=True, slots=True)
class OnlineFitConfig:
    """Knobs of the online fit.

    Attributes:
        forgetting_factor: ``λ`` in (0, 1]: the weight an observation keeps per newer one
            (1 = never forget).
        prior_weight: Total weight of the prior's anchor points, in observations, >= 0
            (0 = no prior: the data alone).
        min_decode_steps: Fewest engine steps an interval must hold to be a decode
            observation, >= 1.

    Raises:
        ValueError: a value is out of range (the message names the field).
    """

    forgetting_factor: float = DEFAULT_FORGETTING_FACTOR
    prior_weight: float = DEFAULT_PRIOR_WEIGHT
    min_decode_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.forgetting_factor <= 1.0:
            raise ValueError(f"forgetting_factor: must be in (0, 1], got {self.forgetting_factor}")
        if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
            raise ValueError(f"prior_weight: must be >= 0, got {self.prior_weight}")
        if self.min_decode_steps < 1:
            raise ValueError(f"min_decode_steps: must be >= 1, got {self.min_decode_steps}")


class OnlineLinearFit:
    """Recursive least squares with exponential forgetting, a prior, and ``θ >= 0``.

    See the module docstring for the objective and its sources.

    Args:
        terms: Names of the ``p`` coefficients, in feature order (e.g. `DECODE_TERMS`).
        forgetting_factor: ``λ`` in (0, 1].
        prior_features: ``(m, p)`` anchor points of the prior, or ``None`` for no prior.
        prior_targets: ``(m,)`` times the prior gives at them, ms.
        prior_weight: Total weight of the anchors, in observations (each gets
            ``prior_weight / m``), >= 0.

    Raises:
        ValueError: a shape does not match ``terms``, a value is not finite, or a number is
            out of range.
    """

    def __init__(
        self,
        terms: Sequence[str],
        *,
        forgetting_factor: float = DEFAULT_FORGETTING_FACTOR,
        prior_features: np.ndarray | None = None,
        prior_targets: np.ndarray | None = None,
        prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    ) -> None:
        p = len(terms)
        if p < 1:
            raise ValueError("terms: at least one coefficient")
        if not 0.0 < forgetting_factor <= 1.0:
            raise ValueError(f"forgetting_factor: must be in (0, 1], got {forgetting_factor}")
        if not (math.isfinite(prior_weight) and prior_weight >= 0):
            raise ValueError(f"prior_weight: must be >= 0, got {prior_weight}")
        self.terms = tuple(terms)
        self.forgetting_factor = float(forgetting_factor)
        self._s_data = np.zeros((p, p))
        self._b_data = np.zeros(p)
        self._sw = 0.0  # Σ λ^age w
        self._swy = 0.0  # Σ λ^age w y
        self._swyy = 0.0  # Σ λ^age w y²
        self._s_prior = np.zeros((p, p))
        self._b_prior = np.zeros(p)
        self.num_observations = 0
        """Observations folded in since construction (not decayed)."""
        if prior_features is not None or prior_targets is not None:
            a = np.asarray(prior_features, dtype=float)
            y = np.asarray(prior_targets, dtype=float)
            if a.ndim != 2 or a.shape[1] != p or y.shape != (a.shape[0],) or a.shape[0] == 0:
                raise ValueError(
                    f"prior_features must be (m, {p}) and prior_targets (m,), m >= 1, got "
                    f"{a.shape}, {y.shape}"
                )
            if not (np.isfinite(a).all() and np.isfinite(y).all()):
                raise ValueError("prior_features and prior_targets must be finite")
            omega = prior_weight / a.shape[0]
            self._s_prior = omega * (a.T @ a)
            self._b_prior = omega * (a.T @ y)
        self._coefficients: np.ndarray | None = None
        self._ss_res: float | None = None
        self._support: tuple[int, ...] = ()  # of the last solution: tried first next time

    def observe(self, features: Sequence[float], target: float, weight: float = 1.0) -> None:
        """Folds in one observation ``target ≈ features · θ`` (all older ones decay by ``λ``).

        Args:
            features: ``(p,)`` feature values.
            target: Observed value (ms).
            weight: Weight of this observation, > 0.

        Raises:
            ValueError: a wrong length, a value that is not finite, or ``weight`` <= 0; the
                fit is left unchanged.
        """
        x = np.asarray(features, dtype=float)
        if x.shape != (len(self.terms),):
            raise ValueError(f"features must have {len(self.terms)} values, got {x.shape}")
        if not (np.isfinite(x).all() and math.isfinite(target)):
            raise ValueError(f"features and target must be finite, got {x.tolist()}, {target}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be > 0, got {weight}")
        lam = self.forgetting_factor
        wx = weight * x
        self._s_data *= lam
        self._s_data += np.outer(wx, x)
        self._b_data *= lam
        self._b_data += wx * target
        self._sw = lam * self._sw + weight
        self._swy = lam * self._swy + weight * target
        self._swyy = lam * self._swyy + weight * target * target
        self.num_observations += 1
        self._coefficients = None
        self._ss_res = None

    @property
    def effective_observations(self) -> float:
        """The data's total weight after forgetting, ``Σ λ^age w`` (at most ``1 / (1 - λ)``
        for unit weights)."""
        return self._sw

    @property
    def coefficients(self) -> np.ndarray:
        """``(p,)`` current non-negative coefficients (all 0 with neither data nor prior).

        Exact: every support (subset of coefficients) is solved from the normal equations
        ``A θ_s = g`` (``A = S_data + S_prior``, diagonally scaled) and kept when non-negative;
        the one of least objective ``-gᵀθ`` (the quadratic's value at its stationary point,
        up to a constant) is the optimum (Lawson & Hanson 1974, ch. 23).
        """
        if self._coefficients is None:
            self._coefficients, self._support = _nonnegative_quadratic_min(
                self._s_data + self._s_prior, self._b_data + self._b_prior, self._support
            )
        return self._coefficients.copy()

    def predict(self, features: Sequence[float]) -> float:
        """``features · θ`` with the current coefficients.

        Raises:
            ValueError: ``features`` has the wrong length.
        """
        x = np.asarray(features, dtype=float)
        if x.shape != (len(self.terms),):
            raise ValueError(f"features must have {len(self.terms)} values, got {x.shape}")
        theta = self._coefficients if self._coefficients is not None else self.coefficients
        return float(x @ theta)

    def _weighted_ss_res(self) -> float:
        if self._ss_res is None:
            theta = self._coefficients if self._coefficients is not None else self.coefficients
            b, s = self._b_data, self._s_data
            ss = self._swyy - 2.0 * float(theta @ b) + float(theta @ s @ theta)
            self._ss_res = max(0.0, ss)
        return self._ss_res

    @property
    def r2(self) -> float | None:
        """Forgetting-weighted R² of the current coefficients on the observations,
        ``1 - SS_res / SS_tot`` with ``SS_res = Σ λ^age w (y - x·θ)²`` and ``SS_tot`` around
        the weighted mean of ``y``: how much of the recent observations' variation the model
        explains (``None`` with fewer than 2 observations or when they are all equal; it can
        be negative, and it is small when the observations vary little, e.g. one batch size
        only -- then see `rmse_ms`)."""
        if self.num_observations < 2 or self._sw <= 0:
            return None
        ss_tot = self._swyy - self._swy * self._swy / self._sw
        if ss_tot <= 1e-12 * max(self._swyy, 1e-300):
            return None
        return 1.0 - self._weighted_ss_res() / ss_tot

    @property
    def rmse_ms(self) -> float | None:
        """Forgetting-weighted root-mean-square residual on the observations,
        ``sqrt(SS_res / Σ λ^age w)``, in the targets' unit (``None`` before any)."""
        if self.num_observations == 0 or self._sw <= 0:
            return None
        return math.sqrt(self._weighted_ss_res() / self._sw)


def _nonnegative_quadratic_min(
    a: np.ndarray, g: np.ndarray, hint: tuple[int, ...] = ()
) -> tuple[np.ndarray, tuple[int, ...]]:
    """``argmin_{θ >= 0} θᵀ a θ - 2 gᵀ θ`` for a symmetric positive semi-definite ``a``
    (the normal equations of a least-squares problem), and its support.

    The problem is convex, so a candidate is optimal when it satisfies the KKT conditions:
    ``θ_s`` solves the system on its support ``s`` and is >= 0, and the gradient
    ``a θ - g`` is >= 0 off the support. The supports ``hint`` (the last solution's: a fit
    that moved a little keeps its support) and all coefficients are tried first; otherwise
    every support is enumerated and the feasible one of least objective (``-gᵀθ`` at a
    stationary point) kept, which is exact too (Lawson & Hanson 1974, ch. 23). Systems are
    solved after scaling ``a`` to unit diagonal, by Gaussian elimination with partial pivoting
    in plain floats (microseconds for p = 3, where numpy's per-call overhead would dominate);
    a singular support (collinear columns) is skipped, a smaller one reaching the same minimum.
    """
    p = len(g)
    diag = [float(a[j, j]) for j in range(p)]
    usable = tuple(j for j in range(p) if diag[j] > 0)
    if not usable:
        return np.zeros(p), ()
    scale = [1.0 / math.sqrt(d) if d > 0 else 0.0 for d in diag]
    m = [[float(a[i, j]) * scale[i] * scale[j] for j in range(p)] for i in range(p)]
    h = [float(g[i]) * scale[i] for i in range(p)]
    tol = 1e-9 * max(1e-300, max(abs(v) for v in h))

    def solve(cols: tuple[int, ...]) -> list[float] | None:
        z = _solve_small([[m[i][j] for j in cols] for i in cols], [h[i] for i in cols])
        if z is None or any(v < 0 for v in z):
            return None
        return z

    def theta(cols: tuple[int, ...], z: list[float]) -> tuple[np.ndarray, tuple[int, ...]]:
        best = [0.0] * p
        for i, v in zip(cols, z, strict=True):
            best[i] = v * scale[i]
        return np.array(best), cols

    for cols in dict.fromkeys((hint, usable)):
        if not cols or any(j not in usable for j in cols):
            continue
        z = solve(cols)
        if z is None:
            continue
        full = dict(zip(cols, z, strict=True))
        if all(
            sum(m[j][i] * v for i, v in full.items()) - h[j] >= -tol
            for j in usable
            if j not in full
        ):
            return theta(cols, z)
    best: tuple[np.ndarray, tuple[int, ...]] = (np.zeros(p), ())
    best_obj = 0.0  # the objective at θ = 0
    for size in range(1, len(usable) + 1):
        for cols in combinations(usable, size):
            z = solve(cols)
            if z is None:
                continue
            obj = -sum(h[i] * v for i, v in zip(cols, z, strict=True))
            if obj < best_obj:
                best_obj = obj
                best = theta(cols, z)
    return best


def _solve_small(m: list[list[float]], h: list[float]) -> list[float] | None:
    """Solves ``m z = h`` (``m`` scaled to unit diagonal) by Gaussian elimination with
    partial pivoting; ``None`` when ``m`` is numerically singular or the result not finite."""
    n = len(h)
    rows = [row[:] + [h[i]] for i, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-12:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        lead = rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / lead[col]
            if factor:
                row = rows[r]
                for k in range(col, n + 1):
                    row[k] -= factor * lead[k]
    z = [0.0] * n
    for i in range(n - 1, -1, -1):
        row = rows[i]
        z[i] = (row[n] - sum(row[k] * z[k] for k in range(i + 1, n))) / row[i]
    return z if all(math.isfinite(v) for v in z) else None


# ---------------------------------------------------------------------------------- prior


@dataclass(frozen=True)
class StepTimePrior:
    """Anchor points of the prior: where the offline profile (or roofline) is trusted.

    Attributes:
        source: What the times come from (``"roofline:H100"``, ``"profile:PATH"``, ...).
        decode_features: ``(m, 3)`` rows ``[1, batch_size, context_tokens]``.
        decode_targets_ms: ``(m,)`` decode step times there, ms.
        prefill_features: ``(k, 3)`` rows ``[1, batch_tokens, attention_pairs]``.
        prefill_targets_ms: ``(k,)`` prefill times there, ms.
        static_model: The model the times come from, as the scheduler's predictor uses it
            without an online fit (the offline profile, or the roofline as a
            `LinearStepModel`), ``None`` if not known: the fit then cannot be compared with
            it (`InstanceStepTimeFit`).
    """

    source: str
    decode_features: np.ndarray
    decode_targets_ms: np.ndarray
    prefill_features: np.ndarray
    prefill_targets_ms: np.ndarray
    static_model: StepTimeModel | None = None

    @classmethod
    def from_step_times(
        cls,
        source: str,
        decode_step_ms: Callable[[int, float], float],
        prefill_ms: Callable[[int, int], float],
        *,
        max_batch_size: int = 256,
        max_context_tokens: int | None = None,
        static_model: StepTimeModel | None = None,
    ) -> Self:
        """Anchors on a grid of the operating range, timed by the given functions.

        Decode: batch sizes 1, 4, 16, 64, 256 (up to ``max_batch_size``) by 256, 2048 and 8192
        KV tokens per sequence (the total capped at ``max_context_tokens``). Prefill: one
        sequence of 128, 512, 2048 or 8192 uncached tokens after 0 or 4096 cached ones.

        Args:
            source: Label of the times.
            decode_step_ms: ``(batch_size, context_tokens) -> ms``.
            prefill_ms: ``(uncached_tokens, cached_tokens) -> ms`` of one sequence alone.
            max_batch_size: Largest decode batch of the instance (vLLM's ``max_num_seqs``).
            max_context_tokens: KV capacity of the instance in tokens, ``None`` if unknown.
            static_model: The model behind the two functions, if there is one (see the
                attribute).

        Raises:
            ValueError: ``max_batch_size`` < 1, or a time is not finite and >= 0.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        batches = sorted({min(b, max_batch_size) for b in _DECODE_ANCHOR_BATCHES})
        decode_rows: list[tuple[float, float, float]] = []
        for b in batches:
            for per_seq in _DECODE_ANCHOR_CONTEXTS:
                context = b * per_seq
                if max_context_tokens is not None:
                    context = min(context, max(max_context_tokens, b))
                row = (1.0, float(b), float(context))
                if row not in decode_rows:
                    decode_rows.append(row)
        prefill_rows = []
        for n in _PREFILL_ANCHOR_TOKENS:
            for cached in _PREFILL_ANCHOR_CACHED:
                prefill_rows.append((1.0, float(n), n * (cached + (n + 1) / 2.0), n, cached))
        decode_y = np.array([decode_step_ms(int(b), c) for _, b, c in decode_rows])
        prefill_y = np.array([prefill_ms(n, c) for *_, n, c in prefill_rows])
        for name, y in (("decode", decode_y), ("prefill", prefill_y)):
            if not (np.isfinite(y).all() and (y >= 0).all()):
                raise ValueError(f"{source}: {name} times must be finite and >= 0")
        return cls(
            source=source,
            decode_features=np.array(decode_rows, dtype=float),
            decode_targets_ms=decode_y,
            prefill_features=np.array([r[:3] for r in prefill_rows], dtype=float),
            prefill_targets_ms=prefill_y,
            static_model=static_model,
        )

    @classmethod
    def roofline(
        cls,
        gpu_type: str,
        model: ModelSpec = DEFAULT_MODEL,
        *,
        max_batch_size: int = 256,
        max_context_tokens: int | None = None,
    ) -> Self:
        """Anchors timed by the roofline of `slomesh.engine.profiles` (what the emulator and
        the simulator run, and what the predictor uses without a profile); the static model is
        the roofline as a `LinearStepModel` (`LinearStepModel.from_roofline`).

        Raises:
            ValueError: ``gpu_type`` has no GPU profile.
        """
        gpu = PROFILES.get(gpu_type)
        if gpu is None:
            raise ValueError(f"gpu_type: {gpu_type!r} has no roofline profile")

        def decode_ms(batch: int, context: float) -> float:
            return decode_step_time_s(gpu, model, batch, context / batch) * 1e3

        def prefill(n: int, cached: int) -> float:
            return prefill_time_s(gpu, model, n, cached) * 1e3

        return cls.from_step_times(
            f"roofline:{gpu_type}",
            decode_ms,
            prefill,
            max_batch_size=max_batch_size,
            max_context_tokens=max_context_tokens,
            static_model=LinearStepModel.from_roofline(gpu_type, model),
        )

    @classmethod
    def from_model(
        cls,
        source: str,
        model: StepTimeModel,
        *,
        max_batch_size: int = 256,
        max_context_tokens: int | None = None,
    ) -> Self:
        """Anchors timed by a fitted model (an offline `slomesh.profiling.LatencyProfile`
        or a `LinearStepModel`), which is also the static model."""

        def prefill(n: int, cached: int) -> float:
            return model.prefill_step_ms(n, n * (cached + (n + 1) / 2.0))

        return cls.from_step_times(
            source,
            model.decode_step_ms,
            prefill,
            max_batch_size=max_batch_size,
            max_context_tokens=max_context_tokens,
            static_model=model,
        )


# ---------------------------------------------------------------------------------- observations


@dataclass(frozen=True, slots=True)
class DecodeObservation:
    """One scrape interval's decode step time and the batch it ran at.

    Attributes:
        batch_size: Mean decode sequences per engine step.
        context_tokens: KV tokens in use (KV usage times capacity, mean of the two scrapes).
        step_ms: Mean inter-token latency = decode step time, modelled ms.
        steps: Engine steps in the interval.
    """

    batch_size: float
    context_tokens: float
    step_ms: float
    steps: int

    @property
    def features(self) -> tuple[float, float, float]:
        """``(1, batch_size, context_tokens)``, the decode model's features."""
        return (1.0, self.batch_size, self.context_tokens)

    def predicted_ms(self, model: StepTimeModel) -> float:
        """The step time ``model`` gives this observation as the predictor times a decode
        step (`composed_step_ms`: the larger of its compute and memory sides), ms."""
        batch = max(1.0, self.batch_size)
        return composed_step_ms(model, 0, 0.0, 0, batch, self.context_tokens)


@dataclass(frozen=True, slots=True)
class PrefillObservation:
    """One scrape interval's mean prefill time of the requests that finished in it.

    Attributes:
        uncached_tokens: Mean prompt tokens computed per request.
        cached_tokens: Mean prompt tokens found in the prefix cache per request.
        decode_seqs: Running sequences around the interval (mean of the two scrapes).
        decode_context_tokens: KV tokens in use around the interval.
        prefill_ms: Mean prefill time (first scheduled to first token), modelled ms.
        requests: Requests it averages.
    """

    uncached_tokens: float
    cached_tokens: float
    decode_seqs: float
    decode_context_tokens: float
    prefill_ms: float
    requests: int

    def features(self, chunk_tokens: int | None = None) -> tuple[float, float, float]:
        """The prefill model's features ``(k, n + k·B, pairs(n, c) + k·C)`` for ``k`` chunks
        of at most ``chunk_tokens`` (``None``: one step) each carrying the running decodes
        (module docstring).

        Raises:
            ValueError: ``chunk_tokens`` < 1.
        """
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens}")
        n, c = self.uncached_tokens, self.cached_tokens
        k = 1 if chunk_tokens is None else max(1, math.ceil(n / chunk_tokens))
        pairs = n * (c + (n + 1) / 2.0)
        return (float(k), n + k * self.decode_seqs, pairs + k * self.decode_context_tokens)

    def _chunks(self, chunk_tokens: int | None) -> list[tuple[float, float]]:
        """``(tokens, prior tokens)`` of each chunk the prompt is prefilled in."""
        n, c = self.uncached_tokens, self.cached_tokens
        size = n if chunk_tokens is None else float(chunk_tokens)
        out, done = [], 0.0
        while done < n:
            step = min(size, n - done)
            out.append((step, c + done))
            done += step
        return out

    def predicted_ms(self, model: StepTimeModel, chunk_tokens: int | None = None) -> float:
        """The prefill time ``model`` gives this observation as the predictor times a
        prefill (`slomesh.scheduler.predictor.prefill_ms`): one `composed_step_ms` step per
        chunk of at most ``chunk_tokens`` (``None``: one step) beside the running decodes, ms.
        """
        total = 0.0
        for n, prior in self._chunks(chunk_tokens):
            pairs = n * prior + n * (n + 1) / 2.0
            total += composed_step_ms(
                model, n, pairs, prior + n, self.decode_seqs, self.decode_context_tokens
            )
        return total

    def memory_ms(self, model: StepTimeModel, chunk_tokens: int | None = None) -> float:
        """The memory side of the prefill's steps by ``model``'s decode model (the running
        decodes plus the prompt reading their KV, weights read once per chunk), ms: a prefill
        that took no longer was memory-bound."""
        return sum(
            model.decode_step_ms(
                self.decode_seqs + 1,
                self.decode_context_tokens + prior + n,
            )
            for n, prior in self._chunks(chunk_tokens)
        )


def step_time_observations(
    prev: ScrapedMetrics,
    cur: ScrapedMetrics,
    *,
    kv_capacity_tokens: int,
    time_scale: float = 1.0,
    prefill_in_flight: bool = False,
    min_decode_steps: int = 1,
    solo_prefills: int | None = None,
) -> tuple[DecodeObservation | None, PrefillObservation | None]:
    """The decode and prefill observations of the interval between two scrapes.

    See the module docstring for what is measured and which intervals count.

    Args:
        prev: The earlier scrape.
        cur: The later scrape of the same instance.
        kv_capacity_tokens: KV cache size of the instance in tokens (blocks times block
            size), >= 0 (0: unknown, the context is taken as 0).
        time_scale: Wall seconds per modelled second of the server (> 0; 1 for vLLM).
        prefill_in_flight: Whether a request was known (to the agent) to wait for its first
            token at either scrape: the interval then has no decode observation.
        min_decode_steps: Fewest engine steps a decode observation must hold, >= 1.
        solo_prefills: Requests the agent saw finish in the interval whose prefill ran alone
            (no other forwarded request waited for its first token at any time between the
            request's forwarding and its first token, so no other prompt shared its steps). A
            prefill observation needs every request the engine finished in the interval to be
            one (their count equal to the prefill histogram's); ``None``: not known, every
            finished request counts (prompts prefilled together then each see the whole
            step: a bias of up to several times the per-token cost under load).

    Returns:
        ``(decode, prefill)``; each ``None`` when the interval has none (too little data,
        prefill work mixed in, a finished request that shared its prefill steps, or a
        counter went back: the engine restarted).

    Raises:
        ValueError: ``time_scale`` <= 0, ``kv_capacity_tokens`` < 0 or ``min_decode_steps``
            < 1.
    """
    if not time_scale > 0:
        raise ValueError(f"time_scale: must be > 0, got {time_scale}")
    if kv_capacity_tokens < 0:
        raise ValueError(f"kv_capacity_tokens: must be >= 0, got {kv_capacity_tokens}")
    if min_decode_steps < 1:
        raise ValueError(f"min_decode_steps: must be >= 1, got {min_decode_steps}")
    deltas = {
        name: getattr(cur, name) - getattr(prev, name)
        for name in (
            "inter_token_latency_sum_s",
            "inter_token_latency_count",
            "time_to_first_token_count",
            "iteration_count",
            "prompt_tokens_total",
            "generation_tokens_total",
            "request_prefill_time_sum_s",
            "request_prefill_time_count",
            "request_prompt_tokens_sum",
            "request_prompt_tokens_count",
            "request_prefill_kv_computed_tokens_sum",
            "request_prefill_kv_computed_tokens_count",
            "prefix_cache_queries_total",
            "prefix_cache_hits_total",
        )
    }
    if any(v < 0 for v in deltas.values()):
        return None, None  # a counter went back: the engine restarted between the scrapes
    ms_per_s = 1000.0 / time_scale
    context = 0.5 * (prev.kv_cache_usage + cur.kv_cache_usage) * kv_capacity_tokens
    running = 0.5 * (prev.num_requests_running + cur.num_requests_running)

    decode = None
    itl_count = deltas["inter_token_latency_count"]
    steps = deltas["iteration_count"]
    no_prefill = (
        not prefill_in_flight
        and deltas["time_to_first_token_count"] == 0
        and deltas["prompt_tokens_total"] == 0
        and prev.num_requests_waiting == 0
        and cur.num_requests_waiting == 0
    )
    if no_prefill and itl_count > 0 and steps >= min_decode_steps:
        decode = DecodeObservation(
            batch_size=itl_count / steps,
            context_tokens=context,
            step_ms=deltas["inter_token_latency_sum_s"] / itl_count * ms_per_s,
            steps=int(steps),
        )

    prefill = None
    finished = deltas["request_prefill_time_count"]
    solo = solo_prefills is None or solo_prefills == finished
    if finished > 0 and solo and deltas["request_prompt_tokens_count"] == finished:
        prompt = deltas["request_prompt_tokens_sum"] / finished
        if deltas["request_prefill_kv_computed_tokens_count"] == finished:
            uncached = deltas["request_prefill_kv_computed_tokens_sum"] / finished
        else:
            queries = deltas["prefix_cache_queries_total"]
            hit_ratio = deltas["prefix_cache_hits_total"] / queries if queries > 0 else 0.0
            uncached = prompt * (1.0 - min(1.0, hit_ratio))
        uncached = min(uncached, prompt)
        if uncached >= 1.0:
            prefill = PrefillObservation(
                uncached_tokens=uncached,
                cached_tokens=prompt - uncached,
                decode_seqs=running,
                decode_context_tokens=context,
                prefill_ms=deltas["request_prefill_time_sum_s"] / finished * ms_per_s,
                requests=int(finished),
            )
    return decode, prefill


# ---------------------------------------------------------------------------------- per instance


class PredictionErrors:
    """Forgetting-weighted root-mean-square errors of two models predicting the same stream
    of observations: the online fit and the static model (module docstring, *the guard*).

    ``rmse = sqrt(Σ λ^age e² / Σ λ^age)`` for each model's errors ``e`` (ms), with the
    forgetting factor of the fit (Ljung 1999, section 11.2).

    Args:
        forgetting_factor: ``λ`` in (0, 1].

    Attributes:
        count: Observations added (not decayed).

    Raises:
        ValueError: ``forgetting_factor`` out of range.
    """

    def __init__(self, forgetting_factor: float = DEFAULT_FORGETTING_FACTOR) -> None:
        if not 0.0 < forgetting_factor <= 1.0:
            raise ValueError(f"forgetting_factor: must be in (0, 1], got {forgetting_factor}")
        self.forgetting_factor = float(forgetting_factor)
        self.count = 0
        self._sw = 0.0
        self._online_sse = 0.0
        self._static_sse: float | None = None

    def add(self, observed_ms: float, online_ms: float, static_ms: float | None) -> None:
        """Adds one observation and the two models' predictions of it (``static_ms`` is
        ``None`` when there is no static model; then none may be given later either).

        Raises:
            ValueError: a value is not finite, or ``static_ms`` is given after ``None`` was
                (or the reverse).
        """
        values = (observed_ms, online_ms) + (() if static_ms is None else (static_ms,))
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"observed and predicted times must be finite, got {values}")
        if self.count and (static_ms is None) != (self._static_sse is None):
            raise ValueError("static_ms must be given for every observation or for none")
        lam = self.forgetting_factor
        self._sw = lam * self._sw + 1.0
        self._online_sse = lam * self._online_sse + (online_ms - observed_ms) ** 2
        if static_ms is not None:
            self._static_sse = lam * (self._static_sse or 0.0) + (static_ms - observed_ms) ** 2
        self.count += 1

    @property
    def online_rmse_ms(self) -> float | None:
        """The online fit's RMSE, ms (``None`` before any observation)."""
        return math.sqrt(self._online_sse / self._sw) if self.count else None

    @property
    def static_rmse_ms(self) -> float | None:
        """The static model's RMSE, ms (``None`` before any observation or without one)."""
        if not self.count or self._static_sse is None:
            return None
        return math.sqrt(self._static_sse / self._sw)


class InstanceStepTimeFit:
    """The online decode and prefill fits of one instance, fed scrape by scrape.

    Besides the fits it keeps, per side, the errors with which the fit (before each
    observation is folded in) and the static model (``prior.static_model``) predict the
    observations, each timed as the scheduler's predictor times it (`composed_step_ms`):
    `decode_errors`, `prefill_errors`, published with the fits (module docstring, *the guard*).

    Args:
        prior: Anchors of the prior (`StepTimePrior`), ``None`` for none (the data alone:
            the coefficients mean little before many observations).
        config: Estimator knobs.
        chunk_tokens: The engine's token budget per step (``max_num_batched_tokens``), for the
            chunk count of a prefill observation; ``None`` if unknown (one step per prompt).

    Raises:
        ValueError: ``chunk_tokens`` < 1.
    """

    def __init__(
        self,
        prior: StepTimePrior | None = None,
        config: OnlineFitConfig = OnlineFitConfig(),
        chunk_tokens: int | None = None,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens}")
        self.prior = prior
        self.config = config
        self.chunk_tokens = chunk_tokens
        lam, weight = config.forgetting_factor, config.prior_weight
        self.decode = OnlineLinearFit(
            DECODE_TERMS,
            forgetting_factor=lam,
            prior_features=prior.decode_features if prior else None,
            prior_targets=prior.decode_targets_ms if prior else None,
            prior_weight=weight,
        )
        self.prefill = OnlineLinearFit(
            PREFILL_TERMS,
            forgetting_factor=lam,
            prior_features=prior.prefill_features if prior else None,
            prior_targets=prior.prefill_targets_ms if prior else None,
            prior_weight=weight,
        )
        self.static_model = prior.static_model if prior else None
        self.decode_errors = PredictionErrors(lam)
        self.prefill_errors = PredictionErrors(lam)
        self._last: ScrapedMetrics | None = None
        # Published messages by side, with the observation counts they were built at.
        self._published: dict[str, tuple[tuple[int, int], state_pb2.OnlineLatencyFit]] = {}

    def observe(
        self,
        scraped: ScrapedMetrics,
        *,
        kv_capacity_tokens: int,
        time_scale: float = 1.0,
        prefill_in_flight: bool = False,
        solo_prefills: int | None = None,
    ) -> tuple[DecodeObservation | None, PrefillObservation | None]:
        """Takes one scrape: the interval since the previous one becomes observations.

        The first scrape only sets the baseline. ``scraped`` is kept (not copied): pass a
        fresh object per scrape. Each observation is first predicted by the current fit and
        by the static model (`decode_errors`, `prefill_errors`), then folded in; a
        memory-bound prefill observation (`MEMORY_BOUND_MARGIN`) is predicted but not folded
        into the compute-side prefill model.

        Args:
            scraped: The instance's metrics now.
            kv_capacity_tokens: KV cache size in tokens (see `step_time_observations`).
            time_scale: Wall seconds per modelled second of the server.
            prefill_in_flight: A forwarded request waited for its first token at this or the
                previous scrape.
            solo_prefills: Requests that finished since the previous scrape and were
                prefilled alone (see `step_time_observations`), ``None`` if not tracked.

        Returns:
            The observations folded in (see `step_time_observations`).

        Raises:
            ValueError: see `step_time_observations`; the fit is left unchanged.
        """
        prev, self._last = self._last, scraped
        if prev is None:
            return None, None
        decode, prefill = step_time_observations(
            prev,
            scraped,
            kv_capacity_tokens=kv_capacity_tokens,
            time_scale=time_scale,
            prefill_in_flight=prefill_in_flight,
            min_decode_steps=self.config.min_decode_steps,
            solo_prefills=solo_prefills,
        )
        if decode is None and prefill is None:
            return None, None
        current, static = self.step_model(), self.static_model
        if decode is not None:
            self.decode_errors.add(
                decode.step_ms,
                decode.predicted_ms(current),
                None if static is None else decode.predicted_ms(static),
            )
            self.decode.observe(decode.features, decode.step_ms)
        if prefill is not None:
            chunk = self.chunk_tokens
            self.prefill_errors.add(
                prefill.prefill_ms,
                prefill.predicted_ms(current, chunk),
                None if static is None else prefill.predicted_ms(static, chunk),
            )
            memory_ms = prefill.memory_ms(current, chunk)
            if prefill.prefill_ms > (1.0 + MEMORY_BOUND_MARGIN) * memory_ms:
                self.prefill.observe(prefill.features(chunk), prefill.prefill_ms)
            else:
                prefill = None
        return decode, prefill

    def step_model(self) -> LinearStepModel:
        """The current coefficients as a model the predictor can time steps with."""
        return LinearStepModel(
            prefill=_triple(self.prefill.coefficients), decode=_triple(self.decode.coefficients)
        )

    def decode_fit_pb(self) -> state_pb2.OnlineLatencyFit:
        """The decode fit as published in ``InstanceState.decode_fit`` (built once per
        observation and shared: copy it, do not modify it)."""
        return self._fit_pb("decode", self.decode, self.decode_errors)

    def prefill_fit_pb(self) -> state_pb2.OnlineLatencyFit:
        """The prefill fit as published in ``InstanceState.prefill_fit`` (shared, as
        `decode_fit_pb`)."""
        return self._fit_pb("prefill", self.prefill, self.prefill_errors)

    def _fit_pb(
        self, side: str, fit: OnlineLinearFit, errors: PredictionErrors
    ) -> state_pb2.OnlineLatencyFit:
        key = (fit.num_observations, errors.count)
        cached = self._published.get(side)
        if cached is not None and cached[0] == key:
            return cached[1]
        pb = _fit_pb(fit, errors)
        self._published[side] = (key, pb)
        return pb


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    a, b, c = (max(0.0, float(v)) for v in values)
    return (a, b, c)


def _fit_pb(fit: OnlineLinearFit, errors: PredictionErrors) -> state_pb2.OnlineLatencyFit:
    r2, rmse = fit.r2, fit.rmse_ms
    online, static = errors.online_rmse_ms, errors.static_rmse_ms
    return state_pb2.OnlineLatencyFit(
        coefficients=[float(v) for v in fit.coefficients],
        observations=fit.num_observations,
        r2=math.nan if r2 is None else r2,
        rmse_ms=math.nan if rmse is None else rmse,
        static_rmse_ms=math.nan if static is None else static,
        prediction_rmse_ms=math.nan if online is None else online,
    )


# ---------------------------------------------------------------------------------- consumer


@dataclass(frozen=True, slots=True)
class PublishedStepTimeFit:
    """An instance's online fit as the scheduler reads it from ``InstanceState``.

    Attributes:
        model: Both sides' published coefficients.
        decode_observations: Observations behind the decode coefficients.
        prefill_observations: Observations behind the prefill coefficients.
        decode_r2: Forgetting-weighted R² of the decode fit (``None``: undefined).
        prefill_r2: Same for the prefill fit.
        decode_prediction_rmse_ms: RMSE of the fit predicting the recent decode observations
            as the predictor times them (``OnlineLatencyFit.prediction_rmse_ms``), ms;
            ``None``: none.
        decode_static_rmse_ms: Same for the static model (``static_rmse_ms``); ``None``: the
            agent has no static model (nothing to compare with).
        prefill_prediction_rmse_ms: As ``decode_prediction_rmse_ms``, prefill observations.
        prefill_static_rmse_ms: As ``decode_static_rmse_ms``, prefill observations.
    """

    model: LinearStepModel
    decode_observations: int
    prefill_observations: int
    decode_r2: float | None = None
    prefill_r2: float | None = None
    decode_prediction_rmse_ms: float | None = None
    decode_static_rmse_ms: float | None = None
    prefill_prediction_rmse_ms: float | None = None
    prefill_static_rmse_ms: float | None = None

    @classmethod
    def from_pb(cls, state: state_pb2.InstanceState) -> Self | None:
        """The fit an ``InstanceState`` carries; ``None`` when it carries none or a malformed
        one (not 3 finite non-negative coefficients per side)."""
        if not (state.HasField("decode_fit") and state.HasField("prefill_fit")):
            return None
        d, p = state.decode_fit, state.prefill_fit
        try:
            model = LinearStepModel(
                prefill=tuple(p.coefficients),  # type: ignore[arg-type]
                decode=tuple(d.coefficients),  # type: ignore[arg-type]
            )
        except ValueError:
            return None
        return cls(
            model=model,
            decode_observations=d.observations,
            prefill_observations=p.observations,
            decode_r2=_finite(d.r2),
            prefill_r2=_finite(p.r2),
            decode_prediction_rmse_ms=_finite(d.prediction_rmse_ms),
            decode_static_rmse_ms=_finite(d.static_rmse_ms),
            prefill_prediction_rmse_ms=_finite(p.prediction_rmse_ms),
            prefill_static_rmse_ms=_finite(p.static_rmse_ms),
        )

    def beats_static(self, side: str) -> bool:
        """Whether the ``side`` (``"decode"`` or ``"prefill"``) of the fit predicts its
        recent observations better than the static model: its RMSE strictly lower, or no
        static model to compare with (``static_rmse_ms`` NaN). A fit published without the
        comparison (``static_rmse_ms`` unset: 0) never does.

        Raises:
            ValueError: an unknown side.
        """
        if side not in ("decode", "prefill"):
            raise ValueError(f"side: must be 'decode' or 'prefill', got {side!r}")
        static = getattr(self, f"{side}_static_rmse_ms")
        if static is None:
            return True
        online = getattr(self, f"{side}_prediction_rmse_ms")
        return online is not None and online < static

    def step_model(
        self, min_observations: int, fallback: LatencyProfile | None = None
    ) -> StepTimeModel | None:
        """The model to time steps with: a side is ready when it rests on
        ``min_observations``.

        A ready side that predicts its recent observations no better than the static model
        (`beats_static`) disqualifies the whole fit: ``None``. The two sides compose every
        step (`composed_step_ms`), so the other side is not trusted alone either (a prefill
        intercept too high, for one, times every decode step too slow). Otherwise: both
        sides ready, the online model; one side ready and a ``fallback`` (the static
        profile), that side online and the other from the fallback; else ``None`` (the
        caller keeps its static profile or roofline).

        Raises:
            ValueError: ``min_observations`` < 1.
        """
        if min_observations < 1:
            raise ValueError(f"min_observations: must be >= 1, got {min_observations}")
        decode_ok = self.decode_observations >= min_observations
        prefill_ok = self.prefill_observations >= min_observations
        if (decode_ok and not self.beats_static("decode")) or (
            prefill_ok and not self.beats_static("prefill")
        ):
            return None
        if decode_ok and prefill_ok:
            return self.model
        if fallback is None or not (decode_ok or prefill_ok):
            return None
        static = LinearStepModel.from_profile(fallback)
        return dataclasses.replace(
            static,
            **({"decode": self.model.decode} if decode_ok else {"prefill": self.model.prefill}),
        )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
