"""The request ledger in Redis: what must survive a scheduler restart (DESIGN.md section 3).

Layout:

- ``slomesh:req:<request_id>`` -- a hash per request, expiring after `ttl_s` (default 7 days):

  ====================  ===================================================================
  field                 meaning
  ====================  ===================================================================
  rpc                   ``generate`` or ``place``
  admitted_at_unix_ns   when the scheduler received the call (Unix ns)
  origin_region         client's region
  slo_class             SLO class name
  model                 model name
  prompt_tokens         prompt length (estimated for text prompts)
  max_tokens            output cap
  tenant                tenant (may be empty)
  priority              the request's priority (lower = more urgent)
  policy                placement policy
  placement_outcome     ``placed``, ``best_effort``, ``queued`` (while it waits in the
                        best-effort queue), ``refused`` or ``unavailable``
  queued_at_unix_ns     when it joined the best-effort queue (Unix ns)
  best_effort_wait_ms   time it spent queued; best_effort_result: how it left the queue
                        (placed, forced, failed, cancelled, shed, shutdown)
  region, instance_id   where it runs
  agent_endpoint        the agent address given to the client / used to forward
  cached_prefix_tokens  prompt tokens predicted to hit the prefix cache
  slo_feasible          ``1`` / ``0``: the prediction met the SLO with margin
  predicted_ttft_ms     predicted TTFT; likewise predicted_tpot_ms, predicted_e2e_ms,
                        predicted_cost_usd, predicted_queue_wait_ms, predicted_prefill_ms,
                        predicted_rtt_ms
  retry_after_ms        retry hint of a refusal
  ttft_ms, tpot_ms,     actual client-side timings (Generate: measured by the scheduler;
  e2e_ms, queue_ms      Place: as reported with ReportOutcome)
  completion_tokens     output tokens produced; cached_prompt_tokens, finish_reason
  slo_attained          ``1`` / ``0`` (DistServe definition, when the class is known)
  outcome               ``ok``, ``error``, ``refused``, ``unavailable``, ``cancelled``
  error                 error message, if any
  finished_at_unix_ns   when the outcome was recorded
  ====================  ===================================================================

- ``slomesh:decisions`` -- a stream (XADD, ``MAXLEN ~`` `stream_maxlen`) with one entry per
  placement decision: request_id, policy, outcome, region, instance_id, origin_region,
  slo_class, decision_ms, and ``candidates`` (JSON list of every candidate's prediction).
- ``slomesh:outlen:<slo_class>:<model>`` -- a list per (model, SLO class) of the output
  lengths (tokens, decimal strings) of its last `output_length_window` completed requests,
  newest first (LPUSH, then LTRIM to the window), expiring `ttl_s` after the last write: the
  sliding window of `slomesh.scheduler.output_length.OutputLengthPredictor`, shared by
  scheduler replicas and loaded by a starting one (`load_output_lengths`). SLO class names
  hold no ``:``, so the key splits unambiguously even when the model name does. Written at
  least once: a batch retried after a timeout that Redis had in fact applied pushes its
  lengths twice (as it appends its stream entries twice), which shifts a quantile by at most
  the batch's share of the window.

Writes stay off the request's critical path: `record_*` methods only append to an in-memory
queue (no await); a background writer drains it in pipelined batches. When Redis is down the
writer keeps what it could not write (bounded by `max_backlog` operations: beyond that the
oldest are dropped, counted and logged), retries with exponential backoff, and on `close()`
flushes for at most a timeout. An admitted request is therefore written at least into the
queue before it is forwarded, and never forgotten while the process lives (within the bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from slomesh.scheduler.output_length import DEFAULT_OUTPUT_LENGTH_WINDOW
from slomesh.scheduler.policy import PlacementDecision
from slomesh.scheduler.validation import ValidatedRequest
from slomesh.v1 import common_pb2

logger = logging.getLogger(__name__)

__all__ = [
    "DECISIONS_STREAM",
    "OUTPUT_LENGTHS_KEY_PREFIX",
    "REQUEST_KEY_PREFIX",
    "Ledger",
    "output_lengths_key",
    "request_key",
]

REQUEST_KEY_PREFIX = "slomesh:req:"
DECISIONS_STREAM = "slomesh:decisions"
OUTPUT_LENGTHS_KEY_PREFIX = "slomesh:outlen:"


def request_key(request_id: str) -> str:
    """Redis key of a request's ledger hash."""
    return REQUEST_KEY_PREFIX + request_id


def output_lengths_key(model: str, slo_class: str) -> str:
    """Redis key of the output-length window of (model, SLO class)."""
    return f"{OUTPUT_LENGTHS_KEY_PREFIX}{slo_class}:{model}"


@dataclass(slots=True)
class _Op:
    kind: str  # "hset", "xadd" or "lpush"
    key: str
    fields: dict[str, str]  # hset / xadd; for lpush {"value": ...}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


class Ledger:
    """Asynchronous, non-blocking writer of the request ledger (see the module docstring).

    Args:
        redis_url: ``redis://host:port/db``.
        ttl_s: Expiry of request hashes in seconds.
        stream: Name of the decision audit stream.
        stream_maxlen: Approximate length cap of the stream.
        max_backlog: Operations kept in memory while Redis is unreachable; beyond this the
            oldest are dropped (counted in `dropped`).
        batch_size: Operations per pipelined round trip.
        retry_initial_s: First backoff after a failed write, seconds.
        retry_max_s: Largest backoff, seconds.
        metrics: Optional `SchedulerMetrics` for backlog/write counters.
        socket_timeout_s: Redis socket timeout, seconds.
        output_length_window: Output lengths kept per (model, SLO class) list, >= 1 (the
            window of the scheduler's `OutputLengthPredictor`).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        ttl_s: int = 7 * 24 * 3600,
        stream: str = DECISIONS_STREAM,
        stream_maxlen: int = 100_000,
        max_backlog: int = 200_000,
        batch_size: int = 256,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        metrics: Any = None,
        socket_timeout_s: float = 2.0,
        output_length_window: int = DEFAULT_OUTPUT_LENGTH_WINDOW,
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog: must be >= 1, got {max_backlog}")
        if output_length_window < 1:
            raise ValueError(f"output_length_window: must be >= 1, got {output_length_window}")
        self.output_length_window = output_length_window
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.stream = stream
        self.stream_maxlen = stream_maxlen
        self.max_backlog = max_backlog
        self.batch_size = batch_size
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.metrics = metrics
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            decode_responses=True,
        )
        self._pending: deque[_Op] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.connected = True

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client (for reads by tools and tests)."""
        return self._redis

    @property
    def backlog(self) -> int:
        """Operations queued and not yet written."""
        return len(self._pending)

    def start(self) -> None:
        """Starts the background writer (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._writer(), name="ledger-writer"
            )

    # -- recording (never blocks, never raises on Redis trouble) ---------------------------

    def record_admitted(self, request: ValidatedRequest, admitted_unix_ns: int, rpc: str) -> None:
        """Records an admitted (validated) request."""
        self._hset(
            request.request_id,
            {
                "rpc": rpc,
                "admitted_at_unix_ns": admitted_unix_ns,
                "origin_region": request.origin_region,
                "slo_class": request.slo_class,
                "model": request.model,
                "prompt_tokens": request.prompt_tokens,
                "max_tokens": request.max_tokens,
                "tenant": request.tenant,
                "priority": request.priority,
            },
        )

    def record_queued(self, request_id: str, queued_unix_ns: int) -> None:
        """Records that a request joined the best-effort queue."""
        self._hset(request_id, {"placement_outcome": "queued", "queued_at_unix_ns": queued_unix_ns})

    def record_dequeued(self, request_id: str, waited_ms: float, result: str) -> None:
        """Records how long a request waited in the best-effort queue and how it left it
        (``placed``, ``forced``, ``failed``, ``cancelled``, ``shed`` or ``shutdown``)."""
        self._hset(request_id, {"best_effort_wait_ms": waited_ms, "best_effort_result": result})

    def record_decision(self, decision: PlacementDecision, agent_endpoint: str = "") -> None:
        """Records a placement decision on the request's hash and in the audit stream."""
        req = decision.request
        fields: dict[str, Any] = {
            "policy": decision.policy,
            "placement_outcome": decision.outcome,
        }
        chosen = decision.chosen
        if chosen is not None and chosen.prediction is not None:
            p = chosen.prediction
            fields.update(
                region=chosen.region,
                instance_id=chosen.instance_id,
                agent_endpoint=agent_endpoint,
                cached_prefix_tokens=p.cached_prefix_tokens,
                slo_feasible=chosen.feasible,
                predicted_ttft_ms=p.ttft_ms,
                predicted_tpot_ms=p.tpot_ms,
                predicted_e2e_ms=p.e2e_ms,
                predicted_cost_usd=p.gpu_cost_usd,
                predicted_queue_wait_ms=p.queue_wait_ms,
                predicted_prefill_ms=p.prefill_ms,
                predicted_rtt_ms=p.rtt_ms,
            )
        if decision.retry_after_ms is not None:
            fields["retry_after_ms"] = decision.retry_after_ms
        if decision.reason:
            fields["reason"] = decision.reason
        self._hset(req.request_id, fields)
        self._append(
            _Op(
                "xadd",
                self.stream,
                {
                    "request_id": req.request_id,
                    "policy": decision.policy,
                    "outcome": decision.outcome,
                    "region": chosen.region if chosen else "",
                    "instance_id": chosen.instance_id if chosen else "",
                    "origin_region": req.origin_region,
                    "slo_class": req.slo_class,
                    "decision_ms": _fmt(decision.decision_ms),
                    "decided_at_unix_ns": str(decision.decided_unix_ns),
                    "candidates": json.dumps(
                        [c.audit() for c in decision.candidates], separators=(",", ":")
                    ),
                },
            )
        )

    def record_outcome(
        self,
        request_id: str,
        outcome: str,
        *,
        completion: common_pb2.Completion | None = None,
        error: str = "",
        slo_attained: bool | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Records how a request ended.

        Args:
            request_id: The request.
            outcome: ``ok``, ``error``, ``refused``, ``unavailable`` or ``cancelled``.
            completion: The completion (usage, client-side timings, finish reason, where).
            error: Error message.
            slo_attained: Whether the SLO was met, if known.
            extra: More fields to set.
        """
        fields: dict[str, Any] = {"outcome": outcome, "finished_at_unix_ns": time.time_ns()}
        if error:
            fields["error"] = error[:1000]
        if completion is not None:
            t = completion.timings
            fields.update(
                ttft_ms=t.ttft_ms,
                tpot_ms=t.tpot_ms,
                e2e_ms=t.e2e_ms,
                queue_ms=t.queue_ms,
                completion_tokens=completion.usage.completion_tokens,
                cached_prompt_tokens=completion.usage.cached_prompt_tokens,
                finish_reason=completion.finish_reason,
            )
            if completion.region:
                fields["served_region"] = completion.region
            if completion.instance_id:
                fields["served_instance_id"] = completion.instance_id
        if slo_attained is not None:
            fields["slo_attained"] = slo_attained
        if extra:
            fields.update(extra)
        self._hset(request_id, fields)

    def record_output_length(self, model: str, slo_class: str, output_tokens: int) -> None:
        """Appends a completed request's output length to the (model, class) window in Redis.

        Args:
            model: Model name.
            slo_class: SLO class name.
            output_tokens: Tokens the request generated, >= 1.
        """
        self._append(
            _Op("lpush", output_lengths_key(model, slo_class), {"value": str(int(output_tokens))})
        )

    async def load_output_lengths(self) -> dict[tuple[str, str], list[int]]:
        """Reads every output-length window from Redis (one SCAN, one pipelined LRANGE each).

        Entries that are not positive integers are skipped.

        Returns:
            (model, SLO class) -> output lengths in tokens, oldest first (at most
            `output_length_window` each).

        Raises:
            redis.exceptions.RedisError, OSError, TimeoutError: Redis unreachable (the caller
                logs it and starts with empty windows).
        """
        pattern = OUTPUT_LENGTHS_KEY_PREFIX + "*"
        keys = [key async for key in self._redis.scan_iter(match=pattern, count=1000)]
        if not keys:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, self.output_length_window - 1)
        rows = await pipe.execute()
        out: dict[tuple[str, str], list[int]] = {}
        for key, values in zip(keys, rows, strict=True):
            slo_class, sep, model = key[len(OUTPUT_LENGTHS_KEY_PREFIX) :].partition(":")
            if not sep:
                continue
            lengths = [int(v) for v in reversed(values) if v.isdigit() and int(v) > 0]
            if lengths:
                out[(model, slo_class)] = lengths
        return out

    def _hset(self, request_id: str, fields: Mapping[str, Any]) -> None:
        self._append(_Op("hset", request_key(request_id), {k: _fmt(v) for k, v in fields.items()}))

    def _append(self, op: _Op) -> None:
        pending = self._pending
        pending.append(op)
        if len(pending) > self.max_backlog:
            pending.popleft()
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.ledger_dropped.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(
                    "ledger backlog full; dropping oldest writes",
                    extra={"dropped_total": self.dropped, "max_backlog": self.max_backlog},
                )
        self._wakeup.set()

    # -- writer ------------------------------------------------------------------------------

    async def _write_batch(self, batch: list[_Op]) -> None:
        # Writes to the same request hash within a batch are merged (later fields win), so a
        # request admitted and placed in one batch costs one HSET and one EXPIRE; output
        # lengths of one (model, class) in a batch cost one LPUSH (in arrival order: the
        # newest ends up at the head), one LTRIM and one EXPIRE.
        hashes: dict[str, dict[str, str]] = {}
        lists: dict[str, list[str]] = {}
        streams: list[_Op] = []
        for op in batch:
            if op.kind == "hset":
                merged = hashes.get(op.key)
                if merged is None:
                    hashes[op.key] = dict(op.fields)
                else:
                    merged.update(op.fields)
            elif op.kind == "lpush":
                lists.setdefault(op.key, []).append(op.fields["value"])
            else:
                streams.append(op)
        pipe = self._redis.pipeline(transaction=False)
        ttl = self.ttl_s
        for key, fields in hashes.items():
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl)
        for key, values in lists.items():
            pipe.lpush(key, *values)
            pipe.ltrim(key, 0, self.output_length_window - 1)
            pipe.expire(key, ttl)
        for op in streams:
            pipe.xadd(op.key, op.fields, maxlen=self.stream_maxlen, approximate=True)
        await pipe.execute()

    async def _writer(self) -> None:
        backoff = self.retry_initial_s
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            n = min(self.batch_size, len(self._pending))
            batch = [self._pending[i] for i in range(n)]
            try:
                await self._write_batch(batch)
            except (TimeoutError, RedisError, OSError) as err:
                self.failures += 1
                if self.metrics is not None:
                    self.metrics.ledger_writes.labels(result="error").inc()
                if self.connected or self.failures % 50 == 0:
                    logger.warning(
                        "ledger write failed; keeping backlog and retrying",
                        extra={
                            "error": str(err),
                            "backlog": len(self._pending),
                            "retry_in_s": backoff,
                        },
                    )
                self.connected = False
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(self.retry_max_s, backoff * 2)
                continue
            # Success: the written ops still queued are a prefix of the backlog (new ops are
            # appended on the right; the backlog bound drops from the left).
            written_ids = {id(op) for op in batch}
            while self._pending and id(self._pending[0]) in written_ids:
                self._pending.popleft()
            self.written += n
            if self.metrics is not None:
                self.metrics.ledger_writes.labels(result="ok").inc(n)
            if not self.connected:
                logger.info("ledger writes resumed", extra={"backlog": len(self._pending)})
            self.connected = True
            backoff = self.retry_initial_s

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until the backlog is written, at most `timeout_s`; True if it emptied."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.02)
        return not self._pending

    async def close(self, timeout_s: float = 5.0) -> None:
        """Flushes the backlog (at most `timeout_s`), stops the writer and closes Redis.

        Operations still unwritten are counted in `dropped` and logged.
        """
        await self.flush(timeout_s)
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pending:
            lost = len(self._pending)
            self.dropped += lost
            logger.error("ledger closed with unwritten operations", extra={"lost": lost})
            self._pending.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
