"""Latency profiles: measure a vLLM-compatible server and fit a prefill/decode latency model.

    slomesh profile --endpoint URL --out PROFILE.yaml [--gpu-type NAME]
                    [--prompt-tokens 64,128,...] [--batch-sizes 1,2,4,8,16]
                    [--repeats 3] [--output-tokens 128] [--stream-interval 1]

**The model** (per model and GPU type): step times linear in roofline features, fitted by
non-negative least squares::

    prefill_ms      = c0 + c1 * batch_tokens + c2 * attention_pairs
        batch_tokens    = sum over the batch's sequences of n_s (uncached prompt tokens)
        attention_pairs = sum over the batch of n_s * (cached_s + (n_s + 1) / 2)
    decode_step_ms  = d0 + d1 * batch_size + d2 * context_tokens
        context_tokens  = sum over the batch's sequences of the KV length each attends to

``c0``/``d0`` are the fixed cost of a step (weights read once, scheduler, kernel launches, the
HTTP path), ``c1`` the GEMM cost of a token, ``c2`` the attention cost of one causal
(query, key) pair, ``d1`` the per-sequence cost of a decode step and ``d2`` the KV read per
context token. Source: SLOs-Serve (Chen et al., 2025, arXiv:2504.08784) section 4 and Vidur
(Agrawal et al., MLSys 2024, arXiv:2405.05465) model a batch's forward time from its prefill
tokens, decode count and context; the same terms as the roofline of
:func:`slomesh.engine.profiles.step_time_s`, without its max(compute, memory).

**The measurement**, over HTTP against ``/v1/completions`` (streaming, ``return_token_ids``,
``ignore_eos``, ``stream_options.include_usage``; prompts are lists of random token ids in
``PROMPT_TOKEN_ID_RANGE``, drawn afresh for every probe so that no probe hits the prefix cache;
a reported ``usage.prompt_tokens_details.cached_tokens`` > 0 fails the run):

- prefill point ``(n, k)``: one call carrying ``k`` prompts of ``n`` tokens with
  ``max_tokens=1``; the value is the time until *every* prompt has its first token (the time
  to prefill ``k * n`` tokens: one engine step, or the sum of the chunks when the batch exceeds
  the token budget of a step). ``k`` prompts in one call reach the engine together, where ``k``
  separate calls would start the first one's step alone.
- decode point ``(L, B)``: one call carrying ``B`` prompts of ``L`` tokens with
  ``max_tokens=T`` (all the same, ``ignore_eos``), timed in its *steady window*, where all
  ``B`` sequences decode in every step: after the last sequence's first token (every prefill
  done) and before the first sequence's last token (none finished). That leaves out the
  ramp-up -- the server hands the ``B`` prompts to the engine one by one, and on a busy host
  their prefills land in different steps, mixed with the first sequences' decodes (chunked
  prefill does the same when ``B * L`` exceeds the step's token budget) -- and the ramp-down
  where the batch is no longer full. Two ways, the first where the server allows it:

  * *engine timing* (:func:`widest_engine_window`): ``/metrics`` scraped before the call and
    every ``ENGINE_POLL_INTERVAL_S`` while it runs; the mean of vLLM's own
    ``vllm:inter_token_latency_seconds`` recorded between the first scrape that counts every
    first token of the call and the last one that counts no finished request
    (:func:`engine_decode_window`). The latencies are taken by the server, free of the HTTP
    path and of the client, and the scrapes show the server's state on the poller's clock:
    on a 2-core host under load a Python client reads the stream in bursts (its gaps at
    batch 1 are then mostly zero) and lags the server by more than the whole output. The
    scrapes are checked against the server's counters (all first tokens counted, no request
    finished, one latency per output token), and a probe whose window they missed is sent
    again (``ENGINE_WINDOW_TRIES``). A whole-call delta of the same histogram would average
    the ramps in (20-30 % too slow at 8 x 1024 tokens on vLLM's CPU backend on a loaded
    2-core host); its buckets (10 ms and up) are too coarse for a median.
  * *client timing* (:func:`steady_decode`), for servers without that histogram, or when
    engine timing fails every try: the median of the inter-token gaps of the streamed chunks in
    the window (a chunk of ``n`` tokens, from ``stream_interval`` or a lagging reader, counts
    as ``n`` gaps, each a ``1/n``-th of its gap).

  The point's context is the mean over the window's steps of the batch's KV tokens (each
  step's sum over the sequences of ``L + j`` at their decode step ``j``; ``B * (L + T / 2)``
  when the window spans all ``T - 1`` steps). Points whose chunked prefill
  (``ceil(B * L / budget)`` steps) would leave fewer than half the ``T - 1`` decode steps
  steady are skipped.

Warm-up probes go first (one decode probe per batch size at the shortest prompt, per
``warmup`` round). Every point is probed ``repeats`` times (in rounds over the whole sweep, so
that a slow spell of the host spreads over all points) and the fastest kept: the host's other
work only ever slows a probe down, so the minimum is the best estimate of the engine's own
time (the advice of Python's ``timeit``; on a 2-core host at load average 12, medians of 3
probes scattered decode points by 2-3x and held-out R² fell to 0.29). Times are
divided by the server's ``time_scale`` (the emulator's wall seconds per modelled second, from
``/slomesh/info``; 1 for vLLM), so a profile holds the modelled GPU's times. Every
``holdout_every``-th point (in sweep order) is held out of the fit, and R² is reported on the
held-out and on the training points.

The server's limits come from ``/slomesh/info`` (the emulator), else ``/v1/models``
(``max_model_len``) and ``/metrics`` (``vllm:cache_config_info``: block size, KV cache
size), else the command-line flags; points beyond them are skipped and listed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp
import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from slomesh.vllm_metrics import MetricsParseError, ScrapedMetrics, parse_vllm_metrics

if TYPE_CHECKING:
    from rich.console import Console

PROMPT_TOKEN_ID_RANGE = (100, 30000)
"""Token ids of the random prompts, ``[low, high)``: inside the vocabulary of any current LLM
(32000 for Llama 2 and the tiny test Llama, 128256 for Llama 3) and clear of special tokens."""
DEFAULT_PROMPT_TOKENS = (64, 128, 256, 512, 1024, 1536)
"""Prompt lengths swept by default; all fit the 2048-token context of ``REAL_VLLM.md``'s
server with the default output tokens."""
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
"""Batch sizes swept by default."""
DEFAULT_REPEATS = 3
"""Probes per point by default (the fastest is kept)."""
DEFAULT_OUTPUT_TOKENS = 128
"""Output tokens of a decode probe by default: enough steps for a steady window of about a
hundred after the ramps (a few steps each), while a probe stays under a second at CPU step
times of 2-8 ms."""
DEFAULT_HOLDOUT_EVERY = 4
"""Every 4th point (indices 3, 7, ...) is held out of the fit by default."""
ASSUMED_MAX_NUM_BATCHED_TOKENS = 2048
"""Token budget of an engine step assumed when the server does not report it: vLLM's default
for its OpenAI server on CPUs and on GPUs under 70 GiB (``EngineArgs.get_batch_defaults``)."""
R2_TARGET = 0.9
"""R² on held-out points below which ``slomesh profile`` warns (issue 4's target)."""
ENGINE_WINDOW_TRIES = 3
"""Decode probes sent for one measurement when the server's ``/metrics`` scrapes miss the
steady window (:func:`engine_decode_window`) before the client's timing is used."""
ENGINE_POLL_INTERVAL_S = 0.02
"""Pause between two ``/metrics`` scrapes of a decode probe (:func:`widest_engine_window`)."""
MIN_POINTS = 4
"""Fewest points of a fit: three coefficients need three training points, plus one held out."""

_PREFILL_TERMS = ("intercept_ms", "per_batch_token_ms", "per_attention_pair_ms")
_DECODE_TERMS = ("intercept_ms", "per_sequence_ms", "per_context_token_ms")


class ProfilingError(RuntimeError):
    """The server cannot be profiled: unreachable, an error answer, unknown limits, or a sweep
    that leaves too few points within its limits."""


class LatencyProfileError(ValueError):
    """A latency-profile file cannot be read, is not YAML, or holds an invalid value (the
    message names the field, e.g. ``prefill.coefficients.intercept_ms: ...``)."""


# ---------------------------------------------------------------------------------- features


def attention_pairs(uncached_tokens: int, cached_tokens: int = 0) -> float:
    """Causal (query, key) pairs that attention evaluates to prefill one sequence.

    Each of the ``n = uncached_tokens`` new tokens attends to the ``cached_tokens`` prefix and
    to the new tokens up to itself: ``n * cached + n * (n + 1) / 2`` = ``n * (cached +
    (n + 1) / 2)`` (the engine model's count, ``slomesh.engine.model.Engine.step``).

    Raises:
        ValueError: a count is negative.
    """
    if uncached_tokens < 0 or cached_tokens < 0:
        raise ValueError(
            f"uncached_tokens and cached_tokens must be >= 0, got {uncached_tokens}, "
            f"{cached_tokens}"
        )
    return uncached_tokens * (cached_tokens + (uncached_tokens + 1) / 2.0)


_FROZEN = ConfigDict(extra="forbid", frozen=True)


class PrefillPoint(BaseModel):
    """One measured prefill: ``batch_size`` sequences of the same shape prefilled together."""

    model_config = _FROZEN

    uncached_tokens: int = Field(ge=1)
    """Prompt tokens each sequence computes."""
    cached_tokens: int = Field(default=0, ge=0)
    """Prompt tokens each sequence found in the prefix cache."""
    batch_size: int = Field(ge=1)
    """Sequences prefilled together."""
    ttft_ms: float = Field(ge=0)
    """Fastest over the probes of the time until every sequence had its first token, ms."""

    @property
    def batch_tokens(self) -> int:
        """Uncached tokens of the whole batch."""
        return self.batch_size * self.uncached_tokens

    @property
    def attention_pairs(self) -> float:
        """Causal attention pairs of the whole batch (:func:`attention_pairs` per sequence)."""
        return self.batch_size * attention_pairs(self.uncached_tokens, self.cached_tokens)


class DecodePoint(BaseModel):
    """One measured decode: ``batch_size`` sequences of ``prompt_tokens`` decoding together.

    ``context_tokens`` defaults to ``B * (L + T / 2)``, the mean over all ``T - 1`` decode
    steps (profiles written before the steady-window measurement have no such field).
    """

    model_config = _FROZEN

    batch_size: int = Field(ge=1)
    """Sequences decoding together."""
    prompt_tokens: int = Field(ge=1)
    """Prompt tokens of each sequence."""
    output_tokens: int = Field(ge=2)
    """Tokens each sequence generated (the first one by the prefill)."""
    tpot_ms: float = Field(ge=0)
    """Fastest over the probes of the decode step time (TPOT) with the whole batch decoding in
    each probe's steady window: the engine's mean inter-token latency there
    (:func:`engine_decode_window`) over the probes the server timed, else (none was) the
    client's median gap (:func:`steady_decode`), ms."""
    context_tokens: float = Field(ge=0)
    """KV tokens the batch attends to in its mean measured decode step (summed over the
    batch), in the fastest probe."""
    engine_timed_probes: int = Field(default=0, ge=0)
    """Probes timed by the server's own inter-token latencies (:func:`engine_decode_window`);
    the others by the client's arrival times (:func:`steady_decode`)."""

    @model_validator(mode="before")
    @classmethod
    def _default_context(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("context_tokens") is None:
            try:
                b, n, t = int(data["batch_size"]), int(data["prompt_tokens"]), data["output_tokens"]
                data = {**data, "context_tokens": b * (n + int(t) / 2.0)}
            except (KeyError, TypeError, ValueError):
                pass  # the field validators name what is missing or invalid
        return data


# ---------------------------------------------------------------------------------- fitting


def nonnegative_lstsq(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The ``x >= 0`` that minimises ``||features @ x - targets||²`` (non-negative least squares).

    Exact for the few columns of a latency model: every support (subset of columns) is solved
    by unconstrained least squares (``numpy.linalg.lstsq``, columns scaled to unit maximum for
    conditioning) and kept as a candidate when its solution is non-negative; the candidate of
    least residual is the optimum, because the optimum's non-zero entries are the unconstrained
    least-squares solution on its own support (the KKT conditions of NNLS; Lawson & Hanson,
    *Solving Least Squares Problems*, 1974, ch. 23). That is ``2**p`` small solves for ``p``
    columns, so meant for ``p`` up to about 10. A negative term is thereby dropped (set to 0)
    and the others refitted, the simple rule the issue asks for, made exact.

    Args:
        features: ``(m, p)`` matrix, one row per point.
        targets: ``(m,)`` observed values.

    Returns:
        ``(p,)`` non-negative coefficients.

    Raises:
        ValueError: the shapes do not match, or a value is not finite.
    """
    a = np.asarray(features, dtype=float)
    y = np.asarray(targets, dtype=float)
    if a.ndim != 2 or y.shape != (a.shape[0],):
        raise ValueError(f"features must be (m, p) and targets (m,), got {a.shape}, {y.shape}")
    if not (np.isfinite(a).all() and np.isfinite(y).all()):
        raise ValueError("features and targets must be finite")
    p = a.shape[1]
    scale = np.abs(a).max(axis=0)
    usable = [j for j in range(p) if scale[j] > 0]
    best = np.zeros(p)
    best_ss = float(y @ y)
    for size in range(1, len(usable) + 1):
        for support in combinations(usable, size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(a[:, cols] / scale[cols], y, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(p)
            x[cols] = sol / scale[cols]
            residual = a @ x - y
            ss = float(residual @ residual)
            if ss < best_ss:
                best, best_ss = x, ss
    return best


def r_squared(observed: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Coefficient of determination ``1 - SS_res / SS_tot`` of ``predicted`` against ``observed``.

    ``SS_tot`` is taken around the mean of the same ``observed`` values, so on held-out points
    this is the out-of-sample R² (as scikit-learn's ``r2_score`` on a test set); it can be
    negative when the model predicts worse than that mean.

    Returns:
        R², or ``None`` when it is undefined (fewer than 2 points, or all observed equal).

    Raises:
        ValueError: the sequences differ in length.
    """
    y = np.asarray(observed, dtype=float)
    p = np.asarray(predicted, dtype=float)
    if y.shape != p.shape:
        raise ValueError(f"observed and predicted differ in shape: {y.shape}, {p.shape}")
    if y.size < 2:
        return None
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return None
    return 1.0 - float(((y - p) ** 2).sum()) / ss_tot


def held_out_mask(num_points: int, every: int) -> np.ndarray:
    """Which points are held out of the fit: index ``i`` when ``i % every == every - 1``.

    Raises:
        ValueError: ``every`` < 2.
    """
    if every < 2:
        raise ValueError(f"holdout_every must be >= 2, got {every}")
    return np.arange(num_points) % every == every - 1


class FitQuality(BaseModel):
    """How well a fitted model explains its points."""

    model_config = _FROZEN

    r2_train: float | None
    """R² on the points the fit used (``None`` when undefined)."""
    r2_held_out: float | None
    """R² on the held-out points (``None`` when undefined, e.g. fewer than 2 held out)."""
    train_points: int = Field(ge=0)
    """Points the fit used."""
    held_out_points: int = Field(ge=0)
    """Points held out of it."""


def _fit(
    features: np.ndarray, targets: np.ndarray, holdout_every: int
) -> tuple[np.ndarray, FitQuality]:
    held = held_out_mask(len(targets), holdout_every)
    train = ~held
    if len(targets) < MIN_POINTS or train.sum() < features.shape[1]:
        raise ValueError(
            f"{len(targets)} points leave {int(train.sum())} for training; the fit needs at "
            f"least {MIN_POINTS} points and {features.shape[1]} for training"
        )
    coef = nonnegative_lstsq(features[train], targets[train])
    predicted = features @ coef
    quality = FitQuality(
        r2_train=r_squared(targets[train], predicted[train]),
        r2_held_out=r_squared(targets[held], predicted[held]),
        train_points=int(train.sum()),
        held_out_points=int(held.sum()),
    )
    return coef, quality


class PrefillCoefficients(BaseModel):
    """``prefill_ms = intercept_ms + per_batch_token_ms * batch_tokens
    + per_attention_pair_ms * attention_pairs``."""

    model_config = _FROZEN

    intercept_ms: float = Field(ge=0)
    """Fixed cost of a prefill (step overhead, weights read, request path), ms."""
    per_batch_token_ms: float = Field(ge=0)
    """Cost of one uncached prompt token in the batch, ms."""
    per_attention_pair_ms: float = Field(ge=0)
    """Cost of one causal attention (query, key) pair, ms."""


class DecodeCoefficients(BaseModel):
    """``decode_step_ms = intercept_ms + per_sequence_ms * batch_size
    + per_context_token_ms * context_tokens``."""

    model_config = _FROZEN

    intercept_ms: float = Field(ge=0)
    """Fixed cost of a decode step (weights read, scheduler, launches), ms."""
    per_sequence_ms: float = Field(ge=0)
    """Cost of one more sequence in the step, ms."""
    per_context_token_ms: float = Field(ge=0)
    """Cost of one more KV token attended to, ms."""


class PrefillFit(BaseModel):
    """The fitted prefill model, its quality and the points it was fitted to (in sweep order)."""

    model_config = _FROZEN

    coefficients: PrefillCoefficients
    quality: FitQuality
    points: list[PrefillPoint]


class DecodeFit(BaseModel):
    """The fitted decode model, its quality and the points it was fitted to (in sweep order)."""

    model_config = _FROZEN

    coefficients: DecodeCoefficients
    quality: FitQuality
    points: list[DecodePoint]


def prefill_features(points: Sequence[PrefillPoint]) -> np.ndarray:
    """``(m, 3)`` rows ``[1, batch_tokens, attention_pairs]`` of prefill points."""
    return np.array([[1.0, p.batch_tokens, p.attention_pairs] for p in points]).reshape(-1, 3)


def decode_features(points: Sequence[DecodePoint]) -> np.ndarray:
    """``(m, 3)`` rows ``[1, batch_size, context_tokens]`` of decode points."""
    return np.array([[1.0, p.batch_size, p.context_tokens] for p in points]).reshape(-1, 3)


def fit_prefill(
    points: Sequence[PrefillPoint], holdout_every: int = DEFAULT_HOLDOUT_EVERY
) -> PrefillFit:
    """Fit the prefill model to ``points``, holding out every ``holdout_every``-th one.

    Raises:
        ValueError: too few points (fewer than 3 left for training), or ``holdout_every`` < 2.
    """
    targets = np.array([p.ttft_ms for p in points], dtype=float)
    coef, quality = _fit(prefill_features(points), targets, holdout_every)
    return PrefillFit(
        coefficients=PrefillCoefficients(**dict(zip(_PREFILL_TERMS, coef.tolist(), strict=True))),
        quality=quality,
        points=list(points),
    )


def fit_decode(
    points: Sequence[DecodePoint], holdout_every: int = DEFAULT_HOLDOUT_EVERY
) -> DecodeFit:
    """Fit the decode model to ``points``, holding out every ``holdout_every``-th one.

    Raises:
        ValueError: too few points (fewer than 3 left for training), or ``holdout_every`` < 2.
    """
    targets = np.array([p.tpot_ms for p in points], dtype=float)
    coef, quality = _fit(decode_features(points), targets, holdout_every)
    return DecodeFit(
        coefficients=DecodeCoefficients(**dict(zip(_DECODE_TERMS, coef.tolist(), strict=True))),
        quality=quality,
        points=list(points),
    )


# ---------------------------------------------------------------------------------- profile


class SweepConfig(BaseModel):
    """What ``slomesh profile`` measures: prefill at every (prompt length, batch size) and
    decode at every (prompt length, batch size) that fit the server's limits.

    Raises (on construction): ``pydantic.ValidationError`` (a ``ValueError``) naming the field.
    """

    model_config = _FROZEN

    prompt_tokens: tuple[int, ...] = DEFAULT_PROMPT_TOKENS
    """Prompt lengths (uncached tokens per sequence), each >= 1."""
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    """Sequences per probe, each >= 1."""
    repeats: int = Field(default=DEFAULT_REPEATS, ge=1)
    """Probes per point; the fastest is kept."""
    output_tokens: int = Field(default=DEFAULT_OUTPUT_TOKENS, ge=2)
    """Output tokens ``T`` of a decode probe (TPOT needs ``T >= 2``)."""
    warmup: int = Field(default=1, ge=0)
    """Unrecorded warm-up rounds sent first, each one decode probe per batch size of the plan
    at its shortest prompt (engine warm-up, one batch shape after another)."""
    engine_timing: bool = True
    """Time decode steps by the server's ``/metrics`` where it has ``ITL_FAMILY``
    (:func:`engine_decode_window`); false: always by the client's arrival times."""
    stream_interval: int = Field(default=1, ge=1)
    """Tokens per streamed chunk asked of the server (vLLM's per-request ``stream_interval``,
    vLLM >= 0.11 and the emulator; not sent when 1): fewer chunks, less work for the server's
    HTTP path on a host it shares with the engine."""

    @field_validator("prompt_tokens", "batch_sizes")
    @classmethod
    def _positive_distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("must not be empty")
        if min(value) < 1:
            raise ValueError(f"every value must be >= 1, got {min(value)}")
        if len(set(value)) != len(value):
            raise ValueError("values must be distinct")
        return tuple(sorted(value))


class LatencyProfile(BaseModel):
    """Fitted prefill and decode latency models of one model on one GPU type, with the points
    they were fitted to. Saved and loaded as YAML (:meth:`save`, :meth:`load`).

    All times are of the modelled device: measured times divided by the server's
    ``time_scale`` (1 for a real vLLM).
    """

    model_config = _FROZEN

    version: Literal[1] = 1
    """File format version."""
    model: str = Field(min_length=1)
    """Served model name (``/v1/models``)."""
    gpu_type: str = Field(min_length=1)
    """Device label: ``--gpu-type``, else the emulator's ``gpu_type``, else ``"unknown"``."""
    endpoint: str
    """Base URL that was measured."""
    created_at: datetime
    """When the measurement finished (UTC)."""
    block_size: int | None = Field(default=None, ge=1)
    """Tokens per KV block of the server (``None`` when it did not say)."""
    max_model_len: int = Field(ge=1)
    """Context length of the server, tokens."""
    time_scale: float = Field(default=1.0, gt=0)
    """Wall seconds per modelled second of the measured server (the emulator's; 1 for vLLM)."""
    holdout_every: int = Field(default=DEFAULT_HOLDOUT_EVERY, ge=2)
    """Every ``holdout_every``-th point was held out of the fits."""
    sweep: SweepConfig
    """What was measured."""
    sweep_wall_s: float | None = Field(default=None, ge=0)
    """Wall seconds the probes took, warm-up included (``None`` in older profiles)."""
    prefill: PrefillFit
    """Prefill model."""
    decode: DecodeFit
    """Decode model."""

    @classmethod
    def from_points(
        cls,
        prefill_points: Sequence[PrefillPoint],
        decode_points: Sequence[DecodePoint],
        *,
        holdout_every: int = DEFAULT_HOLDOUT_EVERY,
        **fields: Any,
    ) -> Self:
        """Fit both models and build a profile; ``fields`` are the other fields.

        Raises:
            ValueError: too few points, or an invalid field.
        """
        return cls(
            holdout_every=holdout_every,
            prefill=fit_prefill(prefill_points, holdout_every),
            decode=fit_decode(decode_points, holdout_every),
            **fields,
        )

    def refit(self, holdout_every: int | None = None) -> Self:
        """This profile with both models fitted again to its stored points.

        Raises:
            ValueError: too few points for ``holdout_every``.
        """
        every = self.holdout_every if holdout_every is None else holdout_every
        return self.model_copy(
            update={
                "holdout_every": every,
                "prefill": fit_prefill(self.prefill.points, every),
                "decode": fit_decode(self.decode.points, every),
            }
        )

    # ------------------------------------------------------------------ predictions

    def prefill_step_ms(self, batch_tokens: float, attention_pairs: float) -> float:
        """Time to prefill a batch of ``batch_tokens`` uncached tokens whose attention
        evaluates ``attention_pairs`` causal pairs (:func:`attention_pairs` summed over the
        batch), ms; 0 for an empty batch.

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
        c = self.prefill.coefficients
        return (
            c.intercept_ms
            + c.per_batch_token_ms * batch_tokens
            + c.per_attention_pair_ms * attention_pairs
        )

    def prefill_ms(
        self, uncached_tokens: int, cached_tokens: int = 0, batch_tokens: int | None = None
    ) -> float:
        """Time to prefill one sequence's ``uncached_tokens`` after a cached prefix of
        ``cached_tokens`` (the ``P_q`` of DESIGN.md §2), ms; 0 when nothing is uncached.

        Args:
            uncached_tokens: Prompt tokens to compute.
            cached_tokens: Prompt tokens already in the KV cache (attended to, not computed).
            batch_tokens: Uncached tokens of the whole step the sequence is prefilled in
                (>= ``uncached_tokens``); ``None`` = the sequence alone. The other sequences
                are taken to be shaped like this one (the shape the sweep measures), so the
                batch's attention pairs are ``batch_tokens * (cached + (n + 1) / 2)``.

        Raises:
            ValueError: a count is negative, or ``batch_tokens`` < ``uncached_tokens``.
        """
        n = uncached_tokens
        pairs = attention_pairs(n, cached_tokens)
        if n == 0:
            return 0.0
        if batch_tokens is None:
            batch_tokens = n
        elif batch_tokens < n:
            raise ValueError(f"batch_tokens ({batch_tokens}) < uncached_tokens ({n})")
        return self.prefill_step_ms(batch_tokens, pairs * batch_tokens / n)

    def decode_step_ms(self, batch_size: int, context_tokens: float) -> float:
        """Time of one decode step (TPOT) of ``batch_size`` sequences attending to
        ``context_tokens`` KV tokens in all (the ``TPOT_i(batch)`` of DESIGN.md §2), ms.

        Raises:
            ValueError: ``batch_size`` < 1 or ``context_tokens`` < 0.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
        c = self.decode.coefficients
        return (
            c.intercept_ms
            + c.per_sequence_ms * batch_size
            + c.per_context_token_ms * context_tokens
        )

    # ------------------------------------------------------------------ files

    def to_yaml(self) -> str:
        """The profile as YAML text (what :meth:`save` writes)."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> Path:
        """Write the profile as YAML to ``path`` (parents created); returns the path.

        Raises:
            OSError: the file cannot be written.
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.to_yaml())
        return out

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read and validate a profile written by :meth:`save`.

        Raises:
            LatencyProfileError: the file cannot be read, is not YAML, is not a mapping, or a
                field is missing or invalid (the message names it, e.g.
                ``decode.coefficients.per_sequence_ms: Input should be greater than or equal
                to 0``).
        """
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise LatencyProfileError(f"cannot read latency profile {path}: {err}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise LatencyProfileError(f"latency profile {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise LatencyProfileError(f"latency profile {path}: top level must be a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
            raise LatencyProfileError(
                f"latency profile {path}: {where}: {first['msg']}{more}"
            ) from None


# ---------------------------------------------------------------------------------- server


class ServerLimits(BaseModel):
    """What the measured server serves and how much it holds."""

    model_config = _FROZEN

    model: str
    """Served model name (first entry of ``/v1/models``)."""
    max_model_len: int = Field(ge=2)
    """Context length, tokens (prompt plus output)."""
    block_size: int | None = Field(default=None, ge=1)
    """Tokens per KV block, or ``None`` when unknown."""
    kv_cache_tokens: int | None = Field(default=None, ge=1)
    """Tokens the KV cache holds, or ``None`` when unknown."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    """Token budget of one engine step, or ``None`` when unknown."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most running sequences, or ``None`` when unknown."""
    time_scale: float = Field(default=1.0, gt=0)
    """Wall seconds per modelled second (the emulator's ``time_scale``; 1 otherwise)."""
    gpu_type: str | None = None
    """GPU type the server reports (the emulator's ``/slomesh/info``), else ``None``."""


def _int_or_none(value: Any) -> int | None:
    if value is None or value in ("", "None"):
        return None
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def cache_config_from_metrics(text: str) -> dict[str, int | None]:
    """``block_size`` and ``kv_cache_tokens`` (``num_gpu_blocks * block_size``) from the
    ``vllm:cache_config_info`` labels of a Prometheus ``/metrics`` body
    (`slomesh.vllm_metrics.parse_vllm_metrics`); ``None`` for what is absent or unparsable."""
    try:
        scraped = parse_vllm_metrics(text)
    except MetricsParseError:
        return {"block_size": None, "kv_cache_tokens": None}
    bs, blocks = scraped.block_size, scraped.num_gpu_blocks
    return {"block_size": bs, "kv_cache_tokens": blocks * bs if blocks and bs else None}


async def _get_json(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int, Any]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            return resp.status, None
        return resp.status, await resp.json(content_type=None)


ITL_FAMILY = "vllm:inter_token_latency_seconds"
"""The histogram whose presence in ``/metrics`` lets :func:`engine_decode_window` time the
decode steps inside the server."""


async def scrape_step_metrics(
    session: aiohttp.ClientSession, endpoint: str, timeout_s: float = 10.0
) -> ScrapedMetrics | None:
    """``GET /metrics`` parsed (:func:`slomesh.vllm_metrics.parse_vllm_metrics`), or ``None``
    when the server has no such page, it cannot be read or parsed, or it lacks the
    ``ITL_FAMILY`` histogram (then the decode steps are timed by the client)."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.get(f"{endpoint}/metrics", timeout=timeout) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    if ITL_FAMILY not in text:
        return None
    try:
        return parse_vllm_metrics(text)
    except MetricsParseError:
        return None


async def read_server_limits(
    session: aiohttp.ClientSession,
    endpoint: str,
    *,
    max_model_len: int | None = None,
    block_size: int | None = None,
    max_num_batched_tokens: int | None = None,
    timeout_s: float = 10.0,
) -> ServerLimits:
    """Read the served model and the server's limits.

    ``/v1/models`` gives the model and ``max_model_len``; ``/slomesh/info`` (the emulator)
    gives everything; otherwise ``/metrics`` (``vllm:cache_config_info``) gives the block size
    and KV cache size. The keyword arguments fill in what the server does not report.

    Args:
        session: HTTP session.
        endpoint: Base URL, e.g. ``http://127.0.0.1:8000``.

    Raises:
        ProfilingError: the server is unreachable, ``/v1/models`` fails or lists no model, or
            ``max_model_len`` is known neither from the server nor from the argument.
    """
    try:
        status, models = await _get_json(session, f"{endpoint}/v1/models", timeout_s)
        if status != 200:
            raise ProfilingError(
                f"GET {endpoint}/v1/models answered {status}; is this a vLLM-compatible server?"
            )
        cards = models.get("data") if isinstance(models, dict) else None
        if not cards or not isinstance(cards[0], dict) or not cards[0].get("id"):
            raise ProfilingError(f"GET {endpoint}/v1/models lists no model")
        fields: dict[str, Any] = {
            "model": str(cards[0]["id"]),
            "max_model_len": _int_or_none(cards[0].get("max_model_len")),
        }
        status, info = await _get_json(session, f"{endpoint}/slomesh/info", timeout_s)
        if status == 200 and isinstance(info, dict):
            bs = _int_or_none(info.get("block_size"))
            blocks = _int_or_none(info.get("num_gpu_blocks"))
            fields.update(
                max_model_len=_int_or_none(info.get("max_model_len")) or fields["max_model_len"],
                block_size=bs,
                kv_cache_tokens=blocks * bs if blocks and bs else None,
                max_num_batched_tokens=_int_or_none(info.get("max_num_batched_tokens")),
                max_num_seqs=_int_or_none(info.get("max_num_seqs")),
                time_scale=float(info.get("time_scale") or 1.0),
                gpu_type=info.get("gpu_type") or None,
            )
        else:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with session.get(f"{endpoint}/metrics", timeout=timeout) as resp:
                if resp.status == 200:
                    fields.update(cache_config_from_metrics(await resp.text()))
    except (aiohttp.ClientError, TimeoutError) as err:
        raise ProfilingError(f"cannot reach {endpoint}: {err or type(err).__name__}") from None
    for key, fallback in (
        ("max_model_len", max_model_len),
        ("block_size", block_size),
        ("max_num_batched_tokens", max_num_batched_tokens),
    ):
        if fields.get(key) is None:
            fields[key] = fallback
    if fields["max_model_len"] is None:
        raise ProfilingError(f"{endpoint} does not report max_model_len; pass --max-model-len")
    return ServerLimits(**fields)


class SweepPlan(BaseModel):
    """The points of a sweep that fit a server, in measuring order."""

    model_config = _FROZEN

    prefill: list[tuple[int, int]]
    """``(prompt_tokens, batch_size)`` of each prefill point."""
    decode: list[tuple[int, int]]
    """``(prompt_tokens, batch_size)`` of each decode point."""
    skipped: list[str]
    """Why each left-out point was left out."""


def _kv_tokens_needed(batch_size: int, seq_tokens: int, block_size: int | None) -> int:
    bs = block_size or 1
    return batch_size * math.ceil(seq_tokens / bs) * bs


def plan_sweep(sweep: SweepConfig, limits: ServerLimits) -> SweepPlan:
    """The prefill and decode points of ``sweep`` that fit ``limits``.

    A point is left out when a sequence (prompt plus output) exceeds ``max_model_len``, the
    batch's KV blocks exceed the KV cache, the batch exceeds ``max_num_seqs``, or (decode
    only) the batch's chunked prefill would leave less than half of the ``T - 1`` decode
    steps steady: it takes ``ceil(B * L / budget)`` steps (``budget`` =
    ``max_num_batched_tokens``, else ``ASSUMED_MAX_NUM_BATCHED_TOKENS``), in all but the last
    of which the first sequences decode outside the steady window of :func:`steady_decode`.

    Raises:
        ProfilingError: fewer than ``MIN_POINTS`` prefill or decode points are left.
    """
    budget = limits.max_num_batched_tokens or ASSUMED_MAX_NUM_BATCHED_TOKENS
    prefill: list[tuple[int, int]] = []
    decode: list[tuple[int, int]] = []
    skipped: list[str] = []

    def fits(n: int, k: int, out_tokens: int) -> str | None:
        if n + out_tokens > limits.max_model_len:
            return f"{n} + {out_tokens} tokens > max_model_len {limits.max_model_len}"
        if limits.max_num_seqs is not None and k > limits.max_num_seqs:
            return f"batch {k} > max_num_seqs {limits.max_num_seqs}"
        needed = _kv_tokens_needed(k, n + out_tokens, limits.block_size)
        if limits.kv_cache_tokens is not None and needed > limits.kv_cache_tokens:
            return f"{needed} KV tokens > KV cache {limits.kv_cache_tokens}"
        return None

    for n in sweep.prompt_tokens:
        for k in sweep.batch_sizes:
            reason = fits(n, k, 1)
            if reason:
                skipped.append(f"prefill {n} tokens x {k}: {reason}")
            else:
                prefill.append((n, k))
    for n in sweep.prompt_tokens:
        for k in sweep.batch_sizes:
            reason = fits(n, k, sweep.output_tokens)
            ramp_steps = math.ceil(k * n / budget) - 1
            if reason is None and ramp_steps > (sweep.output_tokens - 1) / 2:
                reason = (
                    f"{k * n} prompt tokens take {ramp_steps + 1} steps at the step budget "
                    f"{budget}: {ramp_steps} of the {sweep.output_tokens - 1} decode steps "
                    "would not be steady"
                )
            if reason:
                skipped.append(f"decode {n} tokens x {k}: {reason}")
            else:
                decode.append((n, k))
    for name, points in (("prefill", prefill), ("decode", decode)):
        if len(points) < MIN_POINTS:
            raise ProfilingError(
                f"only {len(points)} {name} points of the sweep fit the server's limits "
                f"(need {MIN_POINTS}); skipped: {'; '.join(skipped) or 'none'}"
            )
    return SweepPlan(prefill=prefill, decode=decode, skipped=skipped)


# ---------------------------------------------------------------------------------- probes


class SequenceTiming(BaseModel):
    """Client-side timing of one sequence of a probe, seconds after the request was sent."""

    model_config = _FROZEN

    ttft_s: float
    """Until its first token."""
    e2e_s: float
    """Until its last token."""
    chunks: tuple[tuple[float, int], ...] = ()
    """``(arrival_s, tokens)`` of every streamed chunk that carried tokens, in arrival order
    (the first at ``ttft_s``, the last at ``e2e_s``); ``tokens`` is 1 for a server that sends
    no token ids."""


class DecodeWindow(BaseModel):
    """The steady window of one decode probe: its step time and where it was measured."""

    model_config = _FROZEN

    step_s: float = Field(ge=0)
    """Decode step time of the batch, seconds: the engine's mean inter-token latency over the
    window (:func:`engine_decode_window`), or the client's median gap (:func:`steady_decode`)."""
    context_tokens: float = Field(ge=0)
    """Mean over the window's tokens of the batch's KV tokens in the step that made them."""
    tokens: int = Field(ge=1)
    """Tokens (inter-token gaps) in the window, summed over the sequences."""
    source: Literal["engine", "client"]
    """``engine``: the server's own ``/metrics``; ``client``: the streamed arrival times."""


def engine_decode_window(
    baseline: ScrapedMetrics,
    start: ScrapedMetrics,
    end: ScrapedMetrics,
    batch_size: int,
    prompt_tokens: int,
) -> DecodeWindow | None:
    """Decode step time of a probe's steady window from the server's own counters.

    Three ``/metrics`` scrapes of an otherwise idle server: ``baseline`` before the call,
    ``start`` once the client has every sequence's first token, ``end`` before the first
    sequence's last one. Between ``start`` and ``end`` every step is a pure decode step of the
    whole batch when ``start`` counts all ``B`` first tokens of the call
    (``vllm:time_to_first_token_seconds`` count) and ``end`` no finished request
    (``vllm:request_prompt_tokens`` count, observed as a request finishes) -- the scrapes are
    checked, not assumed, as the server runs ahead of a client that lags. The step time is
    then the mean of the inter-token latencies recorded in between
    (``vllm:inter_token_latency_seconds`` sum / count deltas: each the time between the
    engine core's outputs of two steps, taken inside the engine, free of the HTTP path and of
    the client's delays); each is the period of a step, as in
    ``slomesh.online_fit.step_time_observations``. The mean context of those steps is
    ``B * L + (G_start + G_end - B) / 2``, with ``G`` the call's output tokens at a scrape
    (``vllm:generation_tokens``): a step that makes token ``m_i`` of sequence ``i`` attends to
    ``sum_i (L + m_i - 1)`` = ``B * L + G`` tokens, ``G`` the call's tokens before it.
    Source of the metric semantics: vLLM 0.32, ``vllm/v1/metrics/stats.py``
    (``IterationStats.update_from_output``, ``update_from_finished_request``).

    Args:
        baseline, start, end: The scrapes (:func:`slomesh.vllm_metrics.parse_vllm_metrics`).
        batch_size: Sequences ``B`` of the call.
        prompt_tokens: Prompt tokens ``L`` of each.

    Returns:
        The window (``source="engine"``), or ``None`` when the scrapes do not bracket a
        steady window: ``start`` too early, ``end`` too late, no inter-token latency in
        between, or latencies and output tokens that disagree (other traffic on the server).

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first_tokens = start.time_to_first_token_count - baseline.time_to_first_token_count
    finished = end.request_prompt_tokens_count - baseline.request_prompt_tokens_count
    itl_count = end.inter_token_latency_count - start.inter_token_latency_count
    itl_sum_s = end.inter_token_latency_sum_s - start.inter_token_latency_sum_s
    made_start = start.generation_tokens_total - baseline.generation_tokens_total
    made_end = end.generation_tokens_total - baseline.generation_tokens_total
    if first_tokens != batch_size or finished != 0 or itl_count < 1 or itl_sum_s < 0:
        return None
    if made_end - made_start != itl_count:
        return None
    return DecodeWindow(
        step_s=itl_sum_s / itl_count,
        context_tokens=batch_size * prompt_tokens + (made_start + made_end - batch_size) / 2.0,
        tokens=int(itl_count),
        source="engine",
    )


def widest_engine_window(
    baseline: ScrapedMetrics,
    scrapes: Sequence[ScrapedMetrics],
    batch_size: int,
    prompt_tokens: int,
) -> DecodeWindow | None:
    """The widest steady window a series of ``/metrics`` scrapes brackets.

    Args:
        baseline: The scrape before the call.
        scrapes: Scrapes taken while the call ran, in order.
        batch_size: Sequences ``B`` of the call.
        prompt_tokens: Prompt tokens ``L`` of each.

    Returns:
        :func:`engine_decode_window` from the first scrape that counts every first token of
        the call to the last one that counts no finished request, or ``None`` when no such
        pair exists or it does not bracket a steady window.
    """
    start = next(
        (
            s
            for s in scrapes
            if s.time_to_first_token_count - baseline.time_to_first_token_count >= batch_size
        ),
        None,
    )
    unfinished = [
        s
        for s in scrapes
        if s.request_prompt_tokens_count == baseline.request_prompt_tokens_count
    ]
    if start is None or not unfinished:
        return None
    return engine_decode_window(baseline, start, unfinished[-1], batch_size, prompt_tokens)


def steady_decode(sequences: Sequence[SequenceTiming], prompt_tokens: int) -> DecodeWindow:
    """Decode step time of a batch that decodes together, from its streamed arrival times.

    The *steady window* runs from ``lo``, the arrival of the last sequence's first token
    (after it, every prefill is done and all sequences decode in every step), to ``hi``, the
    arrival of the first sequence's last token (until it, none has finished). A gap between two
    chunks of one sequence is in the window when it starts at or after ``lo`` and ends at or
    before ``hi``; a chunk that arrives after ``lo`` with a token made by an earlier, mixed
    step is thereby left out (the gap before it starts before ``lo``), as long as the client's
    jitter stays under a step. A chunk of ``n`` tokens (``stream_interval``, or a reader that
    lags) counts as ``n`` gaps, each a ``1/n``-th of its gap. The step time is the median of
    the gaps (robust to the host's stalls); the context is the mean over the gaps of
    ``B * (L + m - 1)`` for the gap that ends with output token ``m`` (decode step ``j = m -
    1`` attends to ``L + j`` tokens, as in ``slomesh.engine.model.Engine.step``), which is
    ``B * (L + T / 2)`` when the window spans all ``T - 1`` steps.

    Args:
        sequences: ``B`` timings of one call (:func:`run_probe`), each with its ``chunks``.
        prompt_tokens: Prompt tokens ``L`` of every sequence.

    Returns:
        The window's median step time, mean context and size (``source="client"``).

    Raises:
        ProfilingError: no gap lies in the window (the ramps overlap: the batch did not
            decode together; more output tokens, a smaller batch or a quieter host help).
        ValueError: ``sequences`` is empty, or a chunk carries fewer than 1 token.
    """
    if not sequences:
        raise ValueError("steady_decode needs at least one sequence")
    lo = max(s.ttft_s for s in sequences)
    hi = min(s.e2e_s for s in sequences)
    gaps_s: list[float] = []
    kv_tokens: list[int] = []
    for seq in sequences:
        produced = 0
        prev_s: float | None = None
        for arrival_s, tokens in seq.chunks:
            if tokens < 1:
                raise ValueError(f"a chunk must carry at least 1 token, got {tokens}")
            if prev_s is not None and prev_s >= lo and arrival_s <= hi:
                gap_s = (arrival_s - prev_s) / tokens
                for m in range(produced + 1, produced + tokens + 1):
                    gaps_s.append(gap_s)
                    kv_tokens.append(prompt_tokens + m - 1)
            produced += tokens
            prev_s = arrival_s
    if not gaps_s:
        raise ProfilingError(
            f"no steady decode window in a call of {len(sequences)} sequences of "
            f"{prompt_tokens} tokens: the last first token came at {lo:.3f} s, the first last "
            f"token at {hi:.3f} s; raise --output-tokens"
        )
    return DecodeWindow(
        step_s=float(np.median(gaps_s)),
        context_tokens=len(sequences) * float(np.mean(kv_tokens)),
        tokens=len(gaps_s),
        source="client",
    )


async def run_probe(
    session: aiohttp.ClientSession,
    endpoint: str,
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    timeout_s: float = 300.0,
    *,
    stream_interval: int = 1,
) -> list[SequenceTiming]:
    """Send ``prompts`` in one streaming ``/v1/completions`` call and time each sequence.

    Args:
        session: HTTP session.
        endpoint: Base URL.
        model: Served model name.
        prompts: Token-id prompts (all reach the engine together).
        max_tokens: Output tokens per prompt (``ignore_eos``, so exactly that many).
        timeout_s: Limit for the whole call, seconds.
        stream_interval: Tokens per chunk asked of the server (the request's
            ``stream_interval`` field, sent only when > 1).

    Returns:
        One timing per prompt, in prompt order.

    Raises:
        ProfilingError: an error answer or error event, a sequence that did not finish with
            ``max_tokens`` tokens, or prefix-cache hits on the random prompts.
    """
    body = {
        "model": model,
        "prompt": prompts,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if stream_interval > 1:
        body["stream_interval"] = stream_interval
    k = len(prompts)
    chunks: list[list[tuple[float, int]]] = [[] for _ in range(k)]
    first: list[float | None] = [None] * k
    last: list[float | None] = [None] * k
    tokens: list[int | None] = [None] * k  # None: the server sends no token_ids
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        async with session.post(
            f"{endpoint}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                raise ProfilingError(
                    f"POST {endpoint}/v1/completions answered {resp.status}: "
                    f"{_error_message(await resp.text())}"
                )
            async for raw in resp.content:
                now = time.perf_counter() - start
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ProfilingError(f"stream error: {_error_message(json.dumps(chunk))}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    i = int(choice.get("index", 0))
                    if not 0 <= i < k:
                        raise ProfilingError(f"stream chunk for choice {i} of a {k}-prompt call")
                    ids = choice.get("token_ids")
                    if isinstance(ids, list):
                        tokens[i] = (tokens[i] or 0) + len(ids)
                        if not ids:
                            continue
                    # A chunk carries at least one new token (vLLM sends no empty ones), its
                    # text is empty when the server runs without a tokenizer.
                    chunks[i].append((now, len(ids) if isinstance(ids, list) else 1))
                    if first[i] is None:
                        first[i] = now
                    if choice.get("finish_reason") is not None:
                        last[i] = now
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        raise ProfilingError(
            f"POST {endpoint}/v1/completions failed: {err or type(err).__name__}"
        ) from None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    if cached:
        raise ProfilingError(
            f"the server reused {cached} cached tokens of random prompts; profile a server "
            "nothing else is using"
        )
    completion = usage.get("completion_tokens")
    if completion is not None and completion != k * max_tokens:
        raise ProfilingError(
            f"the server generated {completion} tokens for {k} prompts of max_tokens "
            f"{max_tokens}; it must honour ignore_eos"
        )
    timings = []
    for i in range(k):
        ttft, e2e, got = first[i], last[i], tokens[i]
        if ttft is None or e2e is None or (got is not None and got != max_tokens):
            raise ProfilingError(
                f"sequence {i} of the call ended without its {max_tokens} tokens "
                f"(tokens {got}, finished {e2e is not None}); the server must honour ignore_eos"
            )
        timings.append(SequenceTiming(ttft_s=ttft, e2e_s=e2e, chunks=tuple(chunks[i])))
    return timings


def _error_message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or data)[:500]


def random_prompts(
    rng: np.random.Generator, batch_size: int, prompt_tokens: int
) -> list[list[int]]:
    """``batch_size`` prompts of ``prompt_tokens`` random ids in ``PROMPT_TOKEN_ID_RANGE``."""
    low, high = PROMPT_TOKEN_ID_RANGE
    return rng.integers(low, high, size=(batch_size, prompt_tokens)).tolist()


async def measure(
    session: aiohttp.ClientSession,
    endpoint: str,
    limits: ServerLimits,
    plan: SweepPlan,
    sweep: SweepConfig,
    *,
    rng: np.random.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 300.0,
) -> tuple[list[PrefillPoint], list[DecodePoint]]:
    """Warm the server up, then probe every point of ``plan`` ``sweep.repeats`` times and
    keep the fastest (decode: of the steady-window step times, :func:`engine_decode_window`
    where the server has ``ITL_FAMILY``, else :func:`steady_decode`).

    Args:
        session: HTTP session.
        endpoint: Base URL.
        limits: The server's model and limits (:func:`read_server_limits`).
        plan: The points (:func:`plan_sweep`).
        sweep: Repeats, output tokens, warm-up probes.
        rng: Source of the random prompts; ``None`` = fresh OS entropy (so that a second run
            against the same server does not repeat the first one's prompts).
        progress: Called with (probes done, probes in all) after every probe.
        timeout_s: Limit for one probe, seconds.

    Returns:
        The prefill and the decode points, in plan order, in modelled ms.

    Raises:
        ProfilingError: a probe failed (see :func:`run_probe`), or a decode probe had no
            steady window in the client's timing (see :func:`steady_decode`).
    """
    rng = rng if rng is not None else np.random.default_rng()
    scale_ms = 1000.0 / limits.time_scale
    out_tokens = sweep.output_tokens
    shortest = min(n for n, _ in plan.decode)
    warm_batches = sorted({k for _, k in plan.decode})
    total = sweep.warmup * len(warm_batches) + sweep.repeats * (
        len(plan.prefill) + len(plan.decode)
    )
    done = 0

    async def send(n: int, k: int, max_tokens: int) -> list[SequenceTiming]:
        return await run_probe(
            session,
            endpoint,
            limits.model,
            random_prompts(rng, k, n),
            max_tokens,
            timeout_s,
            stream_interval=sweep.stream_interval,
        )

    def count_probe() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    async def probe(n: int, k: int, max_tokens: int) -> list[SequenceTiming]:
        timings = await send(n, k, max_tokens)
        count_probe()
        return timings

    engine_timing = sweep.engine_timing and await scrape_step_metrics(session, endpoint) is not None

    async def engine_timed_probe(
        n: int, k: int
    ) -> tuple[list[SequenceTiming], DecodeWindow | None]:
        baseline = await scrape_step_metrics(session, endpoint)
        scrapes: list[ScrapedMetrics] = []

        async def poll() -> None:
            # The server's state at each scrape, on the poller's own clock: a client that
            # reads the stream in bursts on a loaded host does not shift the window.
            while True:
                scraped = await scrape_step_metrics(session, endpoint)
                if scraped is not None:
                    scrapes.append(scraped)
                    if scraped.request_prompt_tokens_count > baseline.request_prompt_tokens_count:
                        return  # a sequence finished: the steady window is over
                await asyncio.sleep(ENGINE_POLL_INTERVAL_S)

        if baseline is None:
            return await send(n, k, out_tokens), None
        poller = asyncio.create_task(poll())
        try:
            timings = await send(n, k, out_tokens)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        return timings, widest_engine_window(baseline, scrapes, k, n)

    async def decode_probe(n: int, k: int) -> DecodeWindow:
        window = None
        if engine_timing:
            # A window no pair of scrapes bracketed (a host so loaded that the poller missed
            # it) is probed again before the client's own timing is taken.
            for _ in range(ENGINE_WINDOW_TRIES):
                timings, window = await engine_timed_probe(n, k)
                if window is not None:
                    break
        else:
            timings = await send(n, k, out_tokens)
        count_probe()
        return window or steady_decode(timings, n)

    for _ in range(sweep.warmup):
        for k in warm_batches:
            await probe(shortest, k, out_tokens)
    prefill_ms: list[list[float]] = [[] for _ in plan.prefill]
    decode_windows: list[list[DecodeWindow]] = [[] for _ in plan.decode]
    for _ in range(sweep.repeats):
        for j, (n, k) in enumerate(plan.prefill):
            timings = await probe(n, k, 1)
            prefill_ms[j].append(max(t.ttft_s for t in timings) * scale_ms)
        for j, (n, k) in enumerate(plan.decode):
            window = await decode_probe(n, k)
            decode_windows[j].append(window)
    prefill_points = [
        PrefillPoint(uncached_tokens=n, batch_size=k, ttft_ms=min(samples))
        for (n, k), samples in zip(plan.prefill, prefill_ms, strict=True)
    ]
    decode_points = []
    for (n, k), windows in zip(plan.decode, decode_windows, strict=True):
        engine = [w for w in windows if w.source == "engine"]
        # The client's timing stands in only where the server never timed the point: on a
        # loaded host its gaps are as often bursts of ~0 as steps, and would win the minimum.
        fastest = min(engine or windows, key=lambda w: w.step_s)
        decode_points.append(
            DecodePoint(
                batch_size=k,
                prompt_tokens=n,
                output_tokens=out_tokens,
                tpot_ms=fastest.step_s * scale_ms,
                context_tokens=fastest.context_tokens,
                engine_timed_probes=len(engine),
            )
        )
    return prefill_points, decode_points


async def profile_endpoint(
    endpoint: str,
    sweep: SweepConfig | None = None,
    *,
    gpu_type: str | None = None,
    holdout_every: int = DEFAULT_HOLDOUT_EVERY,
    max_model_len: int | None = None,
    block_size: int | None = None,
    max_num_batched_tokens: int | None = None,
    rng: np.random.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[ServerLimits, SweepPlan], None] | None = None,
    timeout_s: float = 300.0,
) -> LatencyProfile:
    """Measure the server at ``endpoint`` over ``sweep`` and fit its latency profile.

    Args:
        endpoint: Base URL of a vLLM-compatible server (vLLM or the emulator).
        sweep: What to measure (default: :class:`SweepConfig` defaults).
        gpu_type: Device label; ``None`` = what the server reports, else ``"unknown"``.
        holdout_every: Every ``holdout_every``-th point is held out of the fits.
        max_model_len, block_size, max_num_batched_tokens: Used when the server does not
            report them.
        rng: Source of the random prompts (see :func:`measure`).
        progress: Called with (probes done, probes in all) after every probe.
        on_plan: Called once with the limits and the plan, before the first probe.
        timeout_s: Limit for one probe, seconds.

    Raises:
        ProfilingError: the server cannot be profiled (see :func:`read_server_limits`,
            :func:`plan_sweep`, :func:`run_probe`).
        ValueError: ``holdout_every`` leaves too few training points.
    """
    sweep = sweep or SweepConfig()
    endpoint = endpoint.rstrip("/")
    held_out_mask(0, holdout_every)  # reject a bad holdout_every before measuring
    # Streamed chunks carry prompt token ids: allow long lines.
    async with aiohttp.ClientSession(read_bufsize=2**20) as session:
        limits = await read_server_limits(
            session,
            endpoint,
            max_model_len=max_model_len,
            block_size=block_size,
            max_num_batched_tokens=max_num_batched_tokens,
        )
        plan = plan_sweep(sweep, limits)
        if on_plan is not None:
            on_plan(limits, plan)
        started_s = time.perf_counter()
        prefill_points, decode_points = await measure(
            session,
            endpoint,
            limits,
            plan,
            sweep,
            rng=rng,
            progress=progress,
            timeout_s=timeout_s,
        )
        sweep_wall_s = time.perf_counter() - started_s
    return LatencyProfile.from_points(
        prefill_points,
        decode_points,
        holdout_every=holdout_every,
        model=limits.model,
        gpu_type=gpu_type or limits.gpu_type or "unknown",
        endpoint=endpoint,
        created_at=datetime.now(UTC),
        block_size=limits.block_size,
        max_model_len=limits.max_model_len,
        time_scale=limits.time_scale,
        sweep=sweep,
        sweep_wall_s=sweep_wall_s,
    )


# ---------------------------------------------------------------------------------- CLI


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{flag}: not a comma-separated list of integers"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{flag}: empty list")
    return values


def _r2_text(value: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    return text if value >= R2_TARGET else f"[yellow]{text}[/]"


def print_profile(profile: LatencyProfile, console: Console) -> None:
    """Print a profile's R² and coefficients as rich tables on ``console``."""
    from rich.table import Table

    quality = Table(
        title=f"latency profile of {profile.model} on {profile.gpu_type} "
        f"(every {profile.holdout_every}th point held out)"
    )
    for col in ("model", "points (train / held out)", "R² train", "R² held out"):
        quality.add_column(col, justify="left" if col == "model" else "right")
    for name, fit in (("prefill", profile.prefill), ("decode", profile.decode)):
        q = fit.quality
        quality.add_row(
            name,
            f"{q.train_points} / {q.held_out_points}",
            _r2_text(q.r2_train),
            _r2_text(q.r2_held_out),
        )
    console.print(quality)
    coefficients = Table(title="coefficients (ms)")
    coefficients.add_column("term")
    coefficients.add_column("value", justify="right")
    for prefix, coef in (
        ("prefill", profile.prefill.coefficients),
        ("decode", profile.decode.coefficients),
    ):
        for term, value in coef.model_dump().items():
            coefficients.add_row(f"{prefix}.{term}", f"{value:.6g}")
    console.print(coefficients)


def build_parser() -> argparse.ArgumentParser:
    """The ``slomesh profile`` argument parser."""
    p = argparse.ArgumentParser(
        prog="slomesh profile",
        description="Measure a vLLM-compatible server and fit its prefill/decode latency model.",
    )
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, help="write the profile YAML here")
    p.add_argument("--gpu-type", default=None, help="device label (default: from the server)")
    p.add_argument(
        "--prompt-tokens",
        type=lambda s: _int_list(s, "--prompt-tokens"),
        default=DEFAULT_PROMPT_TOKENS,
        help="prompt lengths, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--batch-sizes",
        type=lambda s: _int_list(s, "--batch-sizes"),
        default=DEFAULT_BATCH_SIZES,
        help="batch sizes, comma-separated (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="probes per point")
    p.add_argument(
        "--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS, help="tokens per decode probe"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unrecorded warm-up rounds (one decode probe per batch size) sent first",
    )
    p.add_argument(
        "--client-timing",
        action="store_true",
        help="time decode steps by the streamed arrival times only, not by the server's "
        "/metrics inter-token latencies",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed chunk asked of the server (vLLM >= 0.11; default 1)",
    )
    p.add_argument(
        "--holdout-every", type=int, default=DEFAULT_HOLDOUT_EVERY, help="hold out every Nth point"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="if the server does not say")
    p.add_argument("--block-size", type=int, default=None, help="if the server does not say")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help=f"token budget of a step, if the server does not say "
        f"(default {ASSUMED_MAX_NUM_BATCHED_TOKENS})",
    )
    p.add_argument("--timeout-s", type=float, default=300.0, help="limit for one probe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``slomesh profile``; returns 0 when the profile was written, 2 on bad arguments or
    a server that cannot be profiled."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True, soft_wrap=True)
    if not args.endpoint.startswith(("http://", "https://")):
        parser.error(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
    if args.holdout_every < 2:
        parser.error("--holdout-every must be >= 2")
    try:
        sweep = SweepConfig(
            prompt_tokens=args.prompt_tokens,
            batch_sizes=args.batch_sizes,
            repeats=args.repeats,
            output_tokens=args.output_tokens,
            warmup=args.warmup,
            stream_interval=args.stream_interval,
            engine_timing=not args.client_timing,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        parser.error(f"{first['loc'][0]}: {first['msg']}")

    bar = Progress(
        TextColumn("[bold]profile"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=args.no_progress,
    )
    task = bar.add_task("profile", total=None)

    def on_plan(limits: ServerLimits, plan: SweepPlan) -> None:
        budget = limits.max_num_batched_tokens or f"{ASSUMED_MAX_NUM_BATCHED_TOKENS} (assumed)"
        err.print(
            f"{args.endpoint}: model {limits.model}, max_model_len {limits.max_model_len}, "
            f"block size {limits.block_size}, KV cache {limits.kv_cache_tokens} tokens, "
            f"step budget {budget}, time scale {limits.time_scale:g}; "
            f"{len(plan.prefill)} prefill and {len(plan.decode)} decode points"
        )
        for reason in plan.skipped:
            err.print(f"  skipped {reason}")

    try:
        with bar:
            profile = asyncio.run(
                profile_endpoint(
                    args.endpoint,
                    sweep,
                    gpu_type=args.gpu_type,
                    holdout_every=args.holdout_every,
                    max_model_len=args.max_model_len,
                    block_size=args.block_size,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                    on_plan=on_plan,
                    timeout_s=args.timeout_s,
                )
            )
    except (ProfilingError, ValueError) as exc:
        err.print(f"slomesh profile: {exc}", markup=False, highlight=False)
        return 2
    print_profile(profile, Console())
    path = profile.save(args.out)
    wall = f" (probes took {profile.sweep_wall_s:.0f} s)" if profile.sweep_wall_s else ""
    err.print(f"profile written to {path}{wall}")
    engine_timed = sum(p.engine_timed_probes for p in profile.decode.points)
    err.print(
        f"decode steps timed by the server's inter-token latencies in {engine_timed} of "
        f"{len(profile.decode.points) * sweep.repeats} probes, by the client's arrival times "
        "in the others"
    )
    for name, fit in (("prefill", profile.prefill), ("decode", profile.decode)):
        r2 = fit.quality.r2_held_out
        if r2 is None or r2 < R2_TARGET:
            err.print(
                f"[yellow]warning[/]: {name} R² on held-out points is "
                f"{'undefined' if r2 is None else f'{r2:.3f}'} (target >= {R2_TARGET})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
