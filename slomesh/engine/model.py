"""A clock-agnostic model of one vLLM V1 engine: continuous batching, chunked prefill, paged KV.

The engine holds requests and a :class:`~slomesh.engine.kv_cache.KVCacheManager`. Each call to
:meth:`Engine.step` schedules one batch the way vLLM V1's scheduler does, advances every scheduled
request as if the forward pass had run, and returns how long that pass takes on the profiled GPU
(:func:`~slomesh.engine.profiles.step_time_s`). The caller owns the clock: the emulator sleeps for
``duration_s`` of wall time, the simulator advances virtual time. Nothing here reads a clock.

Scheduling (Source: vLLM V1 ``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``):

1. Running requests first, in admission order. Each needs ``num_tokens - num_computed_tokens``
   tokens of the step's token budget: 1 for a decode, the rest of the prompt (capped by the
   budget) for a request still prefilling in chunks. When its KV blocks cannot be allocated, the
   newest running request is preempted (its blocks freed, its progress dropped: recompute) and
   put back at the front of the waiting queue, until the allocation fits or the request itself
   was the one preempted.
2. Then, if nothing was preempted in this step, waiting requests in FCFS order while budget and
   ``max_num_seqs`` allow: the longest cached prefix is looked up (``num_cached_tokens``), and
   the uncached rest is scheduled, in a chunk if the budget is short (chunked prefill).
3. A request whose computed tokens catch up with its tokens samples one new token at the end of
   the step: the step that completes a prefill emits the first token, each later step one more.

External KV (optional, ``Engine(external_kv=...)``; Source: vLLM V1's KV connector API,
``KVConnectorBase_V1``, as ``ExampleConnector`` implements it): when a waiting request is
scheduled for the first time, the connector says how many prompt tokens beyond the local prefix
hit it can load (``get_num_new_matched_tokens``); those count as computed, occupy KV blocks, and
their load time (``start_load_kv``, synchronous in the forward pass) is added to the step. When a
request that loaded nothing completes its prefill, the step saves its prompt's KV to the
connector (``save_kv_layer``), and that save time is added too; the caller writes the data
(`StepResult.external_kv_saves`). Prompt tokens are then counted by source like vLLM's
``vllm:prompt_tokens_by_source`` (``local_compute``, ``local_cache_hit``,
``external_kv_transfer``).

The emulator has no language model: output ids are pseudo-random (seeded per request id) and
never EOS, so every request generates exactly ``max_tokens`` tokens (``finish_reason ==
"length"``) unless it reaches ``max_model_len`` first; ``ignore_eos`` is accepted and has no
further effect.

GPU time per request (our choice of rule, the usual token-proportional attribution; no paper we
know of defines it for mixed batches): each step's ``duration_s`` -- forward pass plus any
external KV load/save time -- is split among the requests scheduled in it in proportion to the
tokens each contributes (its prefill chunk's tokens while prefilling, 1 while decoding), and
accumulated per request as ``RequestMetrics.gpu_seconds``. It is modelled time on the caller's
clock, not wall time; over all requests it sums to the duration of every step that had work
(recomputed prefills after a preemption included).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import xxhash

from slomesh.engine.kv_cache import (
    KVCacheManager,
    KVEvent,
    compute_block_hashes,
    extend_block_hashes,
)
from slomesh.engine.profiles import DEFAULT_MODEL, GpuProfile, ModelSpec, step_time_s

FINISH_LENGTH = "length"
"""Finish reason: ``max_tokens`` (or ``max_model_len``) reached."""
FINISH_ABORT = "abort"
"""Finish reason: the request was aborted by the caller."""


class ExternalKvConnector(Protocol):
    """An external KV store an engine loads prompt prefixes from and saves them to (see the
    module docstring; the emulator's is `slomesh.emulator.kv_store.EmulatorKvStore`)."""

    def num_matched_tokens(self, prompt_token_ids: Sequence[int], num_computed_tokens: int) -> int:
        """Prompt tokens beyond ``num_computed_tokens`` (the local prefix hit) it can load;
        0 for none (vLLM's ``get_num_new_matched_tokens``)."""
        ...

    def tokens_to_save(self, prompt_token_ids: Sequence[int]) -> int:
        """Prompt tokens whose KV it would save for this prompt; 0 when it holds them already
        or the prompt is too short."""
        ...

    def load_time_s(self, num_tokens: int) -> float:
        """Seconds to load ``num_tokens`` tokens' KV into the KV cache."""
        ...

    def save_time_s(self, num_tokens: int) -> float:
        """Seconds to save ``num_tokens`` tokens' KV from the KV cache."""
        ...


@dataclass
class EngineConfig:
    """Scheduler and cache settings of one engine (vLLM's engine arguments of the same names)."""

    max_num_batched_tokens: int = 8192
    """Token budget of one step: prefill chunk tokens plus one per decode (>= 1)."""

    max_num_seqs: int = 256
    """Most requests running at once (>= 1)."""

    block_size: int = 16
    """Tokens per KV block (>= 1). vLLM uses 16 on GPU."""

    num_gpu_blocks: int | None = None
    """KV blocks on the GPU; ``None`` sizes the cache from the GPU profile (>= 1 when set)."""

    enable_prefix_caching: bool = True
    """Reuse cached KV blocks of identical prefixes."""

    enable_chunked_prefill: bool = True
    """Split prompts longer than the remaining budget across steps. Without it a prompt must
    fit one step's budget, and ``max_num_batched_tokens`` must be >= ``max_model_len``."""

    max_model_len: int | None = None
    """Longest sequence (prompt plus output) in tokens; ``None`` takes the model's (>= 2)."""

    output_vocab_size: int = 32000
    """Output token ids are drawn from ``[3, output_vocab_size)`` (> 3)."""

    seed: int = 0
    """Seed of the per-request output-token generators."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.output_vocab_size <= 3:
            raise ValueError(f"output_vocab_size must be > 3, got {self.output_vocab_size}")


@dataclass
class EngineRequest:
    """A generation request as the engine sees it.

    Attributes:
        request_id: Unique among the engine's live requests.
        prompt_token_ids: Prompt tokens, shape ``(n,)``, each in ``[0, vocab_size)``.
        max_tokens: Output tokens to generate (>= 1).
        ignore_eos: Accepted for API parity; output never contains EOS (module docstring).
        arrival_time_s: When the request reached the engine, on the caller's clock, seconds.
        eos_token_id: EOS id, never emitted.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    ignore_eos: bool = False
    arrival_time_s: float = 0.0
    eos_token_id: int = 2


class TokenOutput(NamedTuple):
    """New tokens of one request at the end of a step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class FirstScheduled(NamedTuple):
    """A request scheduled for the first time in a step, with its prefix-cache hit."""

    request_id: str
    num_cached_tokens: int


@dataclass(frozen=True)
class RequestMetrics:
    """Timeline and token counts of a finished (or aborted) request; times on the caller's clock.

    ``None`` times mean the phase never happened (e.g. aborted while waiting).
    """

    request_id: str
    arrival_time_s: float
    first_scheduled_time_s: float | None
    first_token_time_s: float | None
    finished_time_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_preemptions: int
    finish_reason: str
    gpu_seconds: float = 0.0
    """The request's share of the duration of the steps it was scheduled in, seconds (module
    docstring, GPU time per request)."""

    @property
    def queue_time_s(self) -> float | None:
        """Arrival to first scheduling (vLLM's ``request_queue_time_seconds``)."""
        if self.first_scheduled_time_s is None:
            return None
        return self.first_scheduled_time_s - self.arrival_time_s

    @property
    def prefill_time_s(self) -> float | None:
        """First scheduling to first token (vLLM's ``request_prefill_time_seconds``)."""
        if self.first_token_time_s is None or self.first_scheduled_time_s is None:
            return None
        return self.first_token_time_s - self.first_scheduled_time_s

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token, the engine's TTFT (no network)."""
        if self.first_token_time_s is None:
            return None
        return self.first_token_time_s - self.arrival_time_s

    @property
    def decode_time_s(self) -> float | None:
        """First token to finish (vLLM's ``request_decode_time_seconds``)."""
        if self.first_token_time_s is None:
            return None
        return self.finished_time_s - self.first_token_time_s

    @property
    def inference_time_s(self) -> float | None:
        """First scheduling to finish (vLLM's ``request_inference_time_seconds``)."""
        if self.first_scheduled_time_s is None:
            return None
        return self.finished_time_s - self.first_scheduled_time_s

    @property
    def e2e_time_s(self) -> float:
        """Arrival to finish (vLLM's ``e2e_request_latency_seconds``)."""
        return self.finished_time_s - self.arrival_time_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (``None`` with fewer than 2 tokens)."""
        decode = self.decode_time_s
        if decode is None or self.num_output_tokens < 2:
            return None
        return decode / (self.num_output_tokens - 1)


@dataclass
class StepResult:
    """What one engine step did.

    Attributes:
        start_s: ``now_s`` the step was called with.
        duration_s: Modelled forward-pass time; outputs exist at ``start_s + duration_s``.
        outputs: One entry per request that produced a token in this step.
        first_scheduled: Requests scheduled for the first time, with their cached tokens.
        kv_events: Prefix-cache events caused by this step's allocations, in order.
        finished: Metrics of requests that finished in this step.
        preempted: Ids of requests preempted (recompute) in this step.
        num_prefill_tokens: Uncached prompt tokens computed.
        num_decode_seqs: Requests that decoded one token.
        num_scheduled_tokens: ``num_prefill_tokens + num_decode_seqs``.
        num_external_tokens: Prompt tokens loaded from the external KV connector.
        external_kv_saves: Prompts (token ids) whose KV this step saved to the external KV
            connector; the caller writes them (the step's duration includes the save).
    """

    start_s: float
    duration_s: float
    outputs: list[TokenOutput] = field(default_factory=list)
    first_scheduled: list[FirstScheduled] = field(default_factory=list)
    kv_events: list[KVEvent] = field(default_factory=list)
    finished: list[RequestMetrics] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0
    num_scheduled_tokens: int = 0
    num_external_tokens: int = 0
    external_kv_saves: list[list[int]] = field(default_factory=list)

    @property
    def end_s(self) -> float:
        """When the step's outputs exist, on the caller's clock."""
        return self.start_s + self.duration_s


@dataclass
class DecodeRun:
    """Consecutive decode-only steps run at once by :meth:`Engine.run_decode_steps`.

    Equivalent to the :class:`StepResult` of each step (:meth:`to_step_results`), stored
    compactly: every request of the batch decodes exactly one token per step.

    Attributes:
        start_s: Start of each step on the caller's clock, seconds, shape ``(k,)``.
        duration_s: Modelled duration of each step, seconds, shape ``(k,)``; step ``j`` ends
            at ``start_s[j] + duration_s[j]`` and step ``j + 1`` starts there.
        request_ids: The batch, in the engine's running order, shape ``(B,)``.
        new_token_ids: Per request (same order), its ``k`` new tokens, one per step.
        finished: Metrics of the requests that finished in the last step (none before it).
        kv_events: Per step, the prefix-cache events it caused, in order.
        num_free_blocks: Free KV blocks after each step (the last one after the finished
            requests released theirs), shape ``(k,)``: the engine's KV usage over the run.
    """

    start_s: list[float]
    duration_s: list[float]
    request_ids: list[str]
    new_token_ids: list[list[int]]
    finished: list[RequestMetrics]
    kv_events: list[list[KVEvent]]
    num_free_blocks: list[int]

    @property
    def num_steps(self) -> int:
        """Steps in the run (``k`` >= 1)."""
        return len(self.start_s)

    @property
    def batch_size(self) -> int:
        """Requests decoding in every step (``B``)."""
        return len(self.request_ids)

    def step_end_s(self, j: int) -> float:
        """When step ``j``'s outputs exist, on the caller's clock (same float as
        ``StepResult.end_s``)."""
        return self.start_s[j] + self.duration_s[j]

    @property
    def end_s(self) -> float:
        """End of the last step, seconds."""
        return self.step_end_s(len(self.start_s) - 1)

    def to_step_results(self) -> list[StepResult]:
        """The run as the :class:`StepResult` each :meth:`Engine.step` call would have returned."""
        k = len(self.start_s)
        batch = len(self.request_ids)
        done = {m.request_id for m in self.finished}
        out: list[StepResult] = []
        for j in range(k):
            last = j == k - 1
            outputs = []
            for rid, toks in zip(self.request_ids, self.new_token_ids, strict=True):
                fin = last and rid in done
                outputs.append(TokenOutput(rid, [toks[j]], fin, FINISH_LENGTH if fin else None))
            out.append(
                StepResult(
                    start_s=self.start_s[j],
                    duration_s=self.duration_s[j],
                    outputs=outputs,
                    kv_events=list(self.kv_events[j]),
                    finished=list(self.finished) if last else [],
                    num_decode_seqs=batch,
                    num_scheduled_tokens=batch,
                )
            )
        return out


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges of the engine, named after vLLM's Prometheus metrics.

    Token counters are cumulative since the engine started.
    """

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    num_gpu_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_cache_queries_tokens: int
    prefix_cache_hits_tokens: int
    prompt_tokens_total: int
    prompt_tokens_local_compute: int
    prompt_tokens_local_cache_hit: int
    generation_tokens_total: int
    num_preemptions_total: int
    num_requests_finished: int
    num_requests_aborted: int
    num_steps: int
    busy_time_s: float
    waiting_prefill_tokens: int
    """Tokens waiting requests must prefill (prompt, plus output so far for preempted ones),
    before any prefix-cache hit."""
    running_prefill_tokens: int
    """Tokens running requests still have to prefill (chunked prefill or recompute in
    progress)."""
    remaining_decode_tokens: int
    """Output tokens all live requests still have to generate."""
    prompt_tokens_external_kv_transfer: int = 0
    """Prompt tokens loaded from the external KV connector (vLLM's
    ``prompt_tokens_by_source{source="external_kv_transfer"}``)."""


class _Req:
    """Engine-side state of one request."""

    __slots__ = (
        "arrival_time_s",
        "block_hashes",
        "eos_token_id",
        "first_scheduled_s",
        "first_token_s",
        "gpu_seconds",
        "max_tokens",
        "num_cached_tokens",
        "num_computed",
        "num_external_tokens",
        "num_output",
        "num_preemptions",
        "num_prompt_tokens",
        "request_id",
        "rng",
        "token_ids",
    )

    def __init__(self, req: EngineRequest, block_size: int, seed: int) -> None:
        self.request_id = req.request_id
        self.arrival_time_s = req.arrival_time_s
        self.token_ids: list[int] = [int(t) for t in req.prompt_token_ids]
        self.num_prompt_tokens = len(self.token_ids)
        self.block_hashes: list[int] = compute_block_hashes(self.token_ids, block_size)
        self.max_tokens = req.max_tokens
        self.num_output = 0
        self.num_computed = 0
        self.num_cached_tokens = -1
        self.num_external_tokens = 0
        self.num_preemptions = 0
        self.first_scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.gpu_seconds = 0.0
        self.eos_token_id = req.eos_token_id
        self.rng = random.Random(xxhash.xxh3_64_intdigest(f"{seed}/{req.request_id}".encode()))

    def metrics(self, finished_s: float, reason: str) -> RequestMetrics:
        return RequestMetrics(
            request_id=self.request_id,
            arrival_time_s=self.arrival_time_s,
            first_scheduled_time_s=self.first_scheduled_s,
            first_token_time_s=self.first_token_s,
            finished_time_s=finished_s,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=max(0, self.num_cached_tokens),
            num_output_tokens=self.num_output,
            num_preemptions=self.num_preemptions,
            finish_reason=reason,
            gpu_seconds=self.gpu_seconds,
        )


class Engine:
    """One vLLM-like engine on one GPU, stepped by its caller.

    Args:
        profile: GPU the engine runs on (timing and, unless configured, KV capacity).
        model: Model served.
        config: Scheduler and cache settings.
        on_kv_event: Optional callback for every prefix-cache event as it happens (the same
            events are also returned in :attr:`StepResult.kv_events`).
        external_kv: Optional external KV connector (module docstring); None: none, as vLLM
            without ``--kv-transfer-config``.

    Raises:
        ValueError: the model leaves no room for KV blocks on this GPU (``num_gpu_blocks``), the
            KV cache cannot hold one ``max_model_len`` sequence (``max_model_len``), or chunked
            prefill is off and ``max_num_batched_tokens`` < ``max_model_len``.
    """

    def __init__(
        self,
        profile: GpuProfile,
        model: ModelSpec = DEFAULT_MODEL,
        config: EngineConfig | None = None,
        on_kv_event: Callable[[KVEvent], None] | None = None,
        external_kv: ExternalKvConnector | None = None,
    ) -> None:
        self.profile = profile
        self.external_kv = external_kv
        self.model = model
        self.config = config if config is not None else EngineConfig()
        cfg = self.config
        num_blocks = cfg.num_gpu_blocks
        if num_blocks is None:
            num_blocks = profile.num_gpu_blocks(model, cfg.block_size)
            if num_blocks < 1:
                raise ValueError(
                    f"num_gpu_blocks: {model.name} leaves no KV-cache memory on {profile.gpu_type}"
                )
        self.num_gpu_blocks = num_blocks
        self.max_model_len = (
            cfg.max_model_len if cfg.max_model_len is not None else model.max_model_len
        )
        if self.max_model_len > num_blocks * cfg.block_size:
            raise ValueError(
                f"max_model_len {self.max_model_len} is larger than the KV cache "
                f"({num_blocks} blocks x {cfg.block_size} = {num_blocks * cfg.block_size} tokens)"
            )
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens {cfg.max_num_batched_tokens} must be >= max_model_len "
                f"{self.max_model_len} when chunked prefill is disabled"
            )
        self._on_kv_event = on_kv_event
        self._pending_events: list[KVEvent] = []
        self.kv = KVCacheManager(
            num_blocks,
            cfg.block_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            on_event=self._collect_event,
        )
        self._requests: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._last_time_s = 0.0
        # Counters.
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._prompt_tokens = 0
        self._prompt_compute = 0
        self._prompt_cache_hit = 0
        self._prompt_external = 0
        self._generation_tokens = 0
        self._preemptions = 0
        self._finished = 0
        self._aborted = 0
        self._steps = 0
        self._busy_s = 0.0

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineRequest, now_s: float | None = None) -> None:
        """Queue a request (FCFS).

        Args:
            req: The request; ``arrival_time_s`` is replaced by ``now_s`` when given.
            now_s: Current time on the caller's clock, seconds.

        Raises:
            ValueError: duplicate ``request_id``; empty prompt or token ids out of
                ``[0, vocab_size)`` (``prompt_token_ids``); ``max_tokens`` < 1; prompt of
                ``max_model_len`` tokens or more (``prompt_token_ids``).
        """
        if req.request_id in self._requests:
            raise ValueError(f"request_id {req.request_id!r} is already in the engine")
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt_token_ids must not be empty")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {n} tokens; max_model_len {self.max_model_len} leaves no "
                "room for output"
            )
        lo, hi = min(req.prompt_token_ids), max(req.prompt_token_ids)
        if lo < 0 or hi >= self.model.vocab_size:
            raise ValueError(
                f"prompt_token_ids must be in [0, {self.model.vocab_size}), got [{lo}, {hi}]"
            )
        if now_s is not None:
            req = EngineRequest(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                max_tokens=req.max_tokens,
                ignore_eos=req.ignore_eos,
                arrival_time_s=now_s,
                eos_token_id=req.eos_token_id,
            )
        r = _Req(req, self.config.block_size, self.config.seed)
        self._requests[r.request_id] = r
        self._waiting.append(r)

    def abort(self, request_id: str, now_s: float | None = None) -> RequestMetrics | None:
        """Drop a live request and free its KV blocks (cached content stays cached).

        Args:
            request_id: The request.
            now_s: Current time (for its metrics); defaults to the end of the last step.

        Returns:
            The request's metrics (``finish_reason == "abort"``), or ``None`` if it is not live.
        """
        r = self._requests.pop(request_id, None)
        if r is None:
            return None
        try:
            self._waiting.remove(r)
        except ValueError:
            self._running.remove(r)
        self.kv.free(request_id)
        self._aborted += 1
        return r.metrics(self._last_time_s if now_s is None else now_s, FINISH_ABORT)

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self._running)

    def has_request(self, request_id: str) -> bool:
        """Whether ``request_id`` is live (waiting or running)."""
        return request_id in self._requests

    @property
    def num_running(self) -> int:
        """Requests admitted to the batch."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued (new or preempted)."""
        return len(self._waiting)

    def reset_prefix_cache(self) -> bool:
        """Drop all cached blocks (only when no request holds blocks).

        The :class:`~slomesh.engine.kv_cache.AllBlocksCleared` event is returned by
        :meth:`drain_kv_events` (and passed to ``on_kv_event``).

        Returns:
            False when some request still holds blocks.
        """
        return self.kv.reset()

    def insert_cached_prefix(self, token_ids: Sequence[int]) -> tuple[int, list[KVEvent]]:
        """Caches the KV of a prompt prefix that arrived from elsewhere (a KV move or
        prefetch from another engine), between steps
        (`slomesh.engine.kv_cache.KVCacheManager.insert_cached_prefix`).

        Args:
            token_ids: The prefix, shape ``(n,)`` (its full blocks count).

        Returns:
            (leading tokens of the prefix now cached, the KV events it raised -- they are
            not returned by a later step).
        """
        cached = self.kv.insert_cached_prefix(token_ids)
        return cached, self.drain_kv_events()

    def drain_kv_events(self) -> list[KVEvent]:
        """Events raised outside :meth:`step` (e.g. by :meth:`reset_prefix_cache`), then cleared."""
        events, self._pending_events = self._pending_events, []
        return events

    def stats(self) -> EngineStats:
        """Snapshot of counters and gauges (O(live requests))."""
        waiting_prefill = sum(len(r.token_ids) for r in self._waiting)
        running_prefill = 0
        for r in self._running:
            remaining = len(r.token_ids) - r.num_computed
            if r.num_output == 0 or remaining > 1:
                running_prefill += remaining
        remaining_decode = sum(r.max_tokens - r.num_output for r in self._requests.values())
        return EngineStats(
            num_requests_running=len(self._running),
            num_requests_waiting=len(self._waiting),
            kv_cache_usage=self.kv.usage,
            num_gpu_blocks=self.num_gpu_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            num_cached_blocks=self.kv.num_cached_blocks,
            prefix_cache_queries_tokens=self._prefix_queries,
            prefix_cache_hits_tokens=self._prefix_hits,
            prompt_tokens_total=self._prompt_tokens,
            prompt_tokens_local_compute=self._prompt_compute,
            prompt_tokens_local_cache_hit=self._prompt_cache_hit,
            generation_tokens_total=self._generation_tokens,
            num_preemptions_total=self._preemptions,
            num_requests_finished=self._finished,
            num_requests_aborted=self._aborted,
            num_steps=self._steps,
            busy_time_s=self._busy_s,
            waiting_prefill_tokens=waiting_prefill,
            running_prefill_tokens=running_prefill,
            remaining_decode_tokens=remaining_decode,
            prompt_tokens_external_kv_transfer=self._prompt_external,
        )

    # ------------------------------------------------------------------ stepping

    def step(self, now_s: float) -> StepResult:
        """Schedule and run one batch starting at ``now_s``.

        Args:
            now_s: Step start on the caller's clock, seconds.

        Returns:
            The step's duration, outputs (available at ``now_s + duration_s``) and events.
            With no work the result is empty with ``duration_s == 0``.
        """
        cfg = self.config
        result = StepResult(start_s=now_s, duration_s=0.0)
        self._last_time_s = max(self._last_time_s, now_s)
        if not self._waiting and not self._running:
            result.kv_events = self.drain_kv_events()
            return result
        budget = cfg.max_num_batched_tokens
        kv = self.kv
        running = self._running
        scheduled: list[tuple[_Req, int]] = []

        # 1. Running requests (decodes and unfinished chunked prefills).
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(len(r.token_ids) - r.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            fits = True
            while not kv.allocate(r.request_id, n, r.token_ids, r.block_hashes):
                victim = running.pop()
                self._preempt(victim)
                result.preempted.append(victim.request_id)
                if victim is r:
                    fits = False
                    break
            if not fits:
                break
            scheduled.append((r, n))
            budget -= n
            i += 1

        # 2. Waiting requests, FCFS, unless this step had to preempt.
        if not result.preempted:
            waiting = self._waiting
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                r = waiting[0]
                num_cached = 0
                if cfg.enable_prefix_caching:
                    extend_block_hashes(r.block_hashes, r.token_ids, cfg.block_size)
                    num_cached = kv.get_computed_prefix(r.token_ids, r.block_hashes)
                num_external = 0
                if self.external_kv is not None and r.first_scheduled_s is None:
                    # At least the last prompt token is computed (it samples the first token).
                    num_external = min(
                        self.external_kv.num_matched_tokens(
                            r.token_ids[: r.num_prompt_tokens], num_cached
                        ),
                        len(r.token_ids) - num_cached - 1,
                    )
                    num_external = max(0, num_external)
                n = len(r.token_ids) - num_cached - num_external
                if not cfg.enable_chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                if not kv.allocate(
                    r.request_id,
                    num_external + n,
                    r.token_ids,
                    r.block_hashes,
                    num_cached_tokens=num_cached,
                ):
                    break
                waiting.popleft()
                running.append(r)
                r.num_computed = num_cached + num_external
                self._prefix_queries += len(r.token_ids)
                self._prefix_hits += num_cached
                if r.first_scheduled_s is None:
                    r.first_scheduled_s = now_s
                    r.num_cached_tokens = num_cached + num_external
                    r.num_external_tokens = num_external
                    result.num_external_tokens += num_external
                    result.first_scheduled.append(
                        FirstScheduled(r.request_id, num_cached + num_external)
                    )
                scheduled.append((r, n))
                budget -= n

        # 3. Cost of the batch.
        prefill_tokens = 0
        decode_seqs = 0
        context = 0
        pairs = 0.0
        for r, n in scheduled:
            c = r.num_computed
            if n == 1 and r.num_output > 0 and c == len(r.token_ids) - 1:
                decode_seqs += 1
                context += c + 1
                pairs += c + 1
            else:
                prefill_tokens += n
                context += c + n
                pairs += n * c + n * (n + 1) / 2.0
        duration = step_time_s(
            self.profile, self.model, prefill_tokens, decode_seqs, context, attention_pairs=pairs
        )
        ext = self.external_kv
        if ext is not None:
            save_tokens = 0
            for r, n in scheduled:
                if r.num_output == 0 and r.num_computed + n >= len(r.token_ids):
                    prompt = r.token_ids[: r.num_prompt_tokens]
                    to_save = 0 if r.num_external_tokens else ext.tokens_to_save(prompt)
                    if to_save > 0:
                        save_tokens += to_save
                        result.external_kv_saves.append(list(prompt))
            if result.num_external_tokens:
                duration += ext.load_time_s(result.num_external_tokens)
            if save_tokens:
                duration += ext.save_time_s(save_tokens)
        end_s = now_s + duration
        result.duration_s = duration
        result.num_prefill_tokens = prefill_tokens
        result.num_decode_seqs = decode_seqs
        result.num_scheduled_tokens = prefill_tokens + decode_seqs
        if scheduled:
            self._steps += 1
            self._busy_s += duration
            # Token-proportional attribution (module docstring); every n here is >= 1.
            total = prefill_tokens + decode_seqs
            for r, n in scheduled:
                r.gpu_seconds += duration * n / total

        # 4. Advance requests; sample a token for each that caught up.
        any_finished = False
        max_len = self.max_model_len
        vocab = cfg.output_vocab_size
        for r, n in scheduled:
            r.num_computed += n
            if r.num_computed < len(r.token_ids):
                continue
            tok = r.rng.randrange(3, vocab)
            if tok == r.eos_token_id:
                tok = 3 if tok + 1 >= vocab else tok + 1
            r.token_ids.append(tok)
            r.num_output += 1
            self._generation_tokens += 1
            if r.first_token_s is None:
                r.first_token_s = end_s
                cached = max(0, r.num_cached_tokens)
                external = r.num_external_tokens
                self._prompt_tokens += r.num_prompt_tokens
                self._prompt_cache_hit += cached - external
                self._prompt_external += external
                self._prompt_compute += r.num_prompt_tokens - cached
            finished = r.num_output >= r.max_tokens or len(r.token_ids) >= max_len
            reason = FINISH_LENGTH if finished else None
            result.outputs.append(TokenOutput(r.request_id, [tok], finished, reason))
            if finished:
                any_finished = True
                kv.free(r.request_id)
                del self._requests[r.request_id]
                self._finished += 1
                result.finished.append(r.metrics(end_s, FINISH_LENGTH))
        if any_finished:
            finished_ids = {m.request_id for m in result.finished}
            self._running = [r for r in running if r.request_id not in finished_ids]
        self._last_time_s = max(self._last_time_s, end_s)
        result.kv_events = self.drain_kv_events()
        return result

    def run_decode_steps(
        self, now_s: float, until_s: float = math.inf, max_steps: int | None = None
    ) -> DecodeRun | None:
        """Run several decode-only steps at once, exactly as repeated :meth:`step` calls would.

        Applies when the engine is in a steady decode phase: no request waiting, every running
        request past its prefill (one token to compute per step) and the batch within the token
        budget. Steps are chained (step ``j + 1`` starts when step ``j`` ends) and the run stops
        before the first step that would start at or after ``until_s``, after ``max_steps``
        steps, at the first step in which a request finishes (that step included), and before a
        step whose KV blocks would not fit (that step would preempt). Requests, counters, the KV
        cache and its events end up exactly as after the same number of :meth:`step` calls; the
        difference is speed: KV allocations are made only at block boundaries (the ones that
        take or fill a block) and tokens are sampled per request, not per step.

        Args:
            now_s: Start of the first step on the caller's clock, seconds.
            until_s: Only steps starting strictly before this are run, seconds.
            max_steps: Most steps to run (``None``: no limit besides the above).

        Returns:
            The run, or ``None`` (nothing done) when the fast path does not apply or not even
            one step qualifies; the caller then uses :meth:`step`.
        """
        running = self._running
        if self._waiting or not running or now_s >= until_s:
            return None
        cfg = self.config
        batch = len(running)
        if batch > cfg.max_num_batched_tokens:
            return None
        max_len = self.max_model_len
        k_cap = max_steps if max_steps is not None else 1 << 62
        context = 0
        for r in running:
            n_tok = len(r.token_ids)
            if r.num_output == 0 or r.num_computed != n_tok - 1:
                return None
            left = min(r.max_tokens - r.num_output, max_len - n_tok)
            k_cap = min(k_cap, left)
            context += n_tok
        if k_cap < 1:
            return None

        # Step times: context grows by one token per request per step.
        profile, model = self.profile, self.model
        starts: list[float] = []
        durations: list[float] = []
        t = now_s
        ctx = context
        while len(starts) < k_cap and t < until_s:
            d = step_time_s(profile, model, 0, batch, ctx, attention_pairs=float(ctx))
            starts.append(t)
            durations.append(d)
            t = t + d
            ctx += batch
        k = len(starts)

        # KV blocks: no block is freed inside the run, so every step's new blocks must fit.
        bs = cfg.block_size
        kv = self.kv
        free = kv.num_free_blocks
        base = [r.num_computed for r in running]

        def blocks_needed(steps: int) -> int:
            total = 0
            for n0 in base:
                first = -n0 % bs
                if steps > first:
                    total += (steps - 1 - first) // bs + 1
            return total

        if blocks_needed(k) > free:
            lo, hi = 0, k
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if blocks_needed(mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if k == 0:
                return None
            del starts[k:]
            del durations[k:]

        # Tokens, per request (each request has its own generator).
        vocab = cfg.output_vocab_size
        new_tokens: list[list[int]] = []
        for r in running:
            randrange = r.rng.randrange
            toks = [randrange(3, vocab) for _ in range(k)]
            eos = r.eos_token_id
            if eos in toks:
                fix = 3 if eos + 1 >= vocab else eos + 1
                toks = [fix if tok == eos else tok for tok in toks]
            r.token_ids.extend(toks)
            new_tokens.append(toks)

        # KV allocations in step order, only where a step takes a new block (the request's KV
        # length is a block multiple) or fills one; the steps in between only lengthen the
        # request's last block, which the next allocation (or the final catch-up) covers.
        points: list[tuple[int, int]] = []
        for idx, n0 in enumerate(base):
            for first in {-n0 % bs, -(n0 + 1) % bs}:
                points.extend((j, idx) for j in range(first, k, bs))
        points.sort()
        allocated = list(base)
        taken = [0] * k  # new blocks taken in each step
        for j, idx in points:
            if (base[idx] + j) % bs == 0:
                taken[j] += 1
        kv_events: list[list[KVEvent]] = [[] for _ in range(k)]
        prev = self.drain_kv_events()
        if prev:
            kv_events[0] = prev
        step_of_pending = 0
        for j, idx in points:
            if j != step_of_pending:
                events = self.drain_kv_events()
                if events:
                    kv_events[step_of_pending].extend(events)
                step_of_pending = j
            r = running[idx]
            target = base[idx] + j + 1
            if not kv.allocate(r.request_id, target - allocated[idx], r.token_ids, r.block_hashes):
                raise RuntimeError("KV allocation failed inside a decode run")  # pre-checked
            allocated[idx] = target
        events = self.drain_kv_events()
        if events:
            kv_events[step_of_pending].extend(events)

        # Advance requests and counters; requests that reach their end finish in the last step.
        end_s = starts[-1] + durations[-1]
        finished: list[RequestMetrics] = []
        # Each step's share per request, added step by step as :meth:`step` adds it.
        shares = [d / batch for d in durations]
        for idx, r in enumerate(running):
            g = r.gpu_seconds
            for share in shares:
                g += share
            r.gpu_seconds = g
            r.num_computed += k
            r.num_output += k
            if r.num_output >= r.max_tokens or len(r.token_ids) >= max_len:
                kv.free(r.request_id)
                del self._requests[r.request_id]
                finished.append(r.metrics(end_s, FINISH_LENGTH))
            elif allocated[idx] < r.num_computed:
                kv.allocate(
                    r.request_id, r.num_computed - allocated[idx], r.token_ids, r.block_hashes
                )
        events = self.drain_kv_events()
        if events:
            kv_events[k - 1].extend(events)
        request_ids = [r.request_id for r in running]
        num_free: list[int] = []
        for n_taken in taken:
            free -= n_taken
            num_free.append(free)
        num_free[-1] = kv.num_free_blocks
        if finished:
            self._finished += len(finished)
            done = {m.request_id for m in finished}
            self._running = [r for r in running if r.request_id not in done]
        self._generation_tokens += batch * k
        self._steps += k
        for d in durations:
            self._busy_s += d
        self._last_time_s = max(self._last_time_s, now_s, end_s)
        return DecodeRun(
            start_s=starts,
            duration_s=durations,
            request_ids=request_ids,
            new_token_ids=new_tokens,
            finished=finished,
            kv_events=kv_events,
            num_free_blocks=num_free,
        )

    # ------------------------------------------------------------------ internals

    def _collect_event(self, event: KVEvent) -> None:
        self._pending_events.append(event)
        if self._on_kv_event is not None:
            self._on_kv_event(event)

    def _preempt(self, r: _Req) -> None:
        self.kv.free(r.request_id)
        r.num_computed = 0
        r.num_preemptions += 1
        self._preemptions += 1
        self._waiting.appendleft(r)
