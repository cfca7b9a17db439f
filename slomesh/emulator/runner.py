"""Runs an :class:`~slomesh.engine.model.Engine` in wall-clock time on an asyncio loop.

One background task steps the engine. For each step it computes the batch at once, sleeps until
the step's absolute deadline (``start + duration``, scaled by ``time_scale``), then delivers the
step's tokens to per-request queues stamped with the deadline, publishes the step's KV events
and updates metrics. Consecutive steps are chained on deadlines, not on wake-up times, so
``asyncio.sleep`` jitter does not accumulate. When a delivery is more than ``resync_after_s``
late (an overloaded host), the clock is re-based to now, with a warning and
``slomesh_emulator_lag_resyncs_total`` counted; every delivery's lateness goes to
``slomesh_emulator_lag_seconds``. With no work the task waits on an event.

Clocks: engine time is seconds since the runner started divided by ``time_scale`` (``time_scale``
= wall seconds per modelled second; 1.0 is real time, 0.1 runs ten times faster than the GPU
being modelled). Timestamps handed out (token events, spans) are unix wall-clock times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from slomesh.emulator.kv_events import ZmqKvEventPublisher
from slomesh.emulator.kv_store import EmulatorKvStore
from slomesh.emulator.metrics import EmulatorMetrics
from slomesh.engine.model import (
    FINISH_ABORT,
    Engine,
    EngineRequest,
    RequestMetrics,
    StepResult,
)

logger = logging.getLogger(__name__)

_LAG_WARN_S = 0.05
_LAG_WARN_INTERVAL_S = 10.0


@dataclass(frozen=True)
class TokenEvent:
    """Tokens of one request delivered at the end of an engine step.

    Attributes:
        token_ids: New token ids (empty for an abort notice).
        finished: Whether the request is done.
        finish_reason: ``"length"`` or ``"abort"`` when finished, else ``None``.
        time_unix_s: Wall-clock time the tokens became available, unix seconds.
    """

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    time_unix_s: float


class RequestStream:
    """Handle of one submitted request: its token events, in order, until finished.

    Delivery follows vLLM v1's output path: with a stream interval ``N > 1`` new tokens are
    held back until ``N`` have gathered since the last delivered event (the first token and
    the finishing event always go out at once: vLLM's ``--stream-interval`` /
    ``SamplingParams.stream_interval``, ``RequestState.make_request_output``), and an event
    the consumer has not taken yet absorbs the next one (vLLM's ``RequestOutputCollector``),
    so a slow consumer gets fewer, larger events instead of a growing backlog.

    Args:
        stream_interval: Tokens per delivered event (>= 1).
    """

    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        max_tokens: int,
        arrival_s: float,
        span: trace.Span | None,
        stream_interval: int = 1,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.arrival_s = arrival_s
        self.stream_interval = stream_interval
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        self._held: list[int] = []  # tokens waiting for the stream interval
        self._num_sent_tokens = 0
        self._pending: TokenEvent | None = None  # delivered, not yet taken by the consumer
        self._ready = asyncio.Event()
        self._span = span
        self._last_token_s: float | None = None

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while True:
            await self._ready.wait()
            event, self._pending = self._pending, None
            self._ready.clear()
            assert event is not None
            yield event
            if event.finished:
                return

    def _put(self, event: TokenEvent) -> None:
        self.num_output_tokens += len(event.token_ids)
        if event.finished:
            self.finished = True
            self.finish_reason = event.finish_reason
        self._held.extend(event.token_ids)
        if not (
            event.finished
            or (self._num_sent_tokens == 0 and self._held)
            or len(self._held) >= self.stream_interval
        ):
            return
        tokens, self._held = self._held, []
        self._num_sent_tokens += len(tokens)
        if self._pending is not None:
            tokens = self._pending.token_ids + tokens
        self._pending = TokenEvent(tokens, event.finished, event.finish_reason, event.time_unix_s)
        self._ready.set()


class EngineRunner:
    """Steps ``engine`` in (scaled) wall-clock time and fans its outputs out to request streams.

    Args:
        engine: The engine to drive (owned by the runner from now on).
        metrics: Metric set to update, or ``None``.
        publisher: KV-event publisher, or ``None``.
        tracer: Tracer for ``engine.*`` spans, or ``None`` for no spans.
        time_scale: Wall seconds per modelled second (> 0).
        span_attributes: Attributes added to every ``engine.request`` span (instance id, GPU).
        resync_after_s: Lateness (wall seconds) beyond which the step clock is re-based.
        kv_store: The external KV store whose folders the engine's saves are written to (the
            one the engine was built with as ``external_kv``), or ``None``.

    Raises:
        ValueError: ``time_scale`` <= 0.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        metrics: EmulatorMetrics | None = None,
        publisher: ZmqKvEventPublisher | None = None,
        tracer: Tracer | None = None,
        time_scale: float = 1.0,
        span_attributes: dict[str, str] | None = None,
        resync_after_s: float = 0.25,
        kv_store: EmulatorKvStore | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.engine = engine
        self.metrics = metrics
        self.publisher = publisher
        self.tracer = tracer
        self.time_scale = time_scale
        self.resync_after_s = resync_after_s
        self.kv_store = kv_store
        self._span_attributes = dict(span_attributes or {})
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._t0_mono = time.monotonic()
        self._t0_unix = time.time()
        self._last_lag_warning = float("-inf")

    # ------------------------------------------------------------------ clocks

    def engine_now(self) -> float:
        """Current engine time, modelled seconds since the runner was created."""
        return (time.monotonic() - self._t0_mono) / self.time_scale

    def to_unix(self, engine_t: float) -> float:
        """Unix wall-clock seconds of engine time ``engine_t``."""
        return self._t0_unix + engine_t * self.time_scale

    def _ns(self, engine_t: float) -> int:
        return int(self.to_unix(engine_t) * 1e9)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the stepping task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-runner")

    async def stop(self) -> None:
        """Stop stepping and end every live request with an ``"abort"`` event."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request_id in list(self._streams):
            self.abort(request_id)
        # Requests that finished in the cancelled step were never delivered: end them too.
        for stream in self._streams.values():
            stream._put(TokenEvent([], True, FINISH_ABORT, time.time()))
            if stream._span is not None:
                stream._span.set_status(Status(StatusCode.ERROR, "emulator stopped"))
                stream._span.end()
        self._streams.clear()

    def set_span_attribute(self, key: str, value: str) -> None:
        """Set an attribute added to every later ``engine.request`` span."""
        self._span_attributes[key] = value

    @property
    def num_live_requests(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        request: EngineRequest,
        parent_context: Context | None = None,
        stream_interval: int = 1,
    ) -> RequestStream:
        """Hand a request to the engine now.

        Args:
            request: The request (its ``arrival_time_s`` is set to now).
            parent_context: Trace context the ``engine.request`` span is a child of.
            stream_interval: Tokens per delivered event (see :class:`RequestStream`).

        Returns:
            The request's stream of token events.

        Raises:
            ValueError: the engine rejects the request (see ``Engine.add_request``), or
                ``stream_interval`` < 1.
        """
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        now = self.engine_now()
        self.engine.add_request(request, now_s=now)
        span = None
        if self.tracer is not None:
            span = self.tracer.start_span(
                "engine.request",
                context=parent_context,
                kind=SpanKind.SERVER,
                start_time=self._ns(now),
                attributes={
                    "slomesh.request_id": request.request_id,
                    "slomesh.prompt_tokens": len(request.prompt_token_ids),
                    "slomesh.max_tokens": request.max_tokens,
                    **self._span_attributes,
                },
            )
        stream = RequestStream(
            request.request_id,
            len(request.prompt_token_ids),
            request.max_tokens,
            now,
            span,
            stream_interval,
        )
        self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        """Abort a live request: free it in the engine and end its stream with ``"abort"``.

        Returns:
            False when the request is not live.
        """
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        now = self.engine_now()
        m = self.engine.abort(request_id, now_s=now)
        if m is None:
            # It finished in the step now in flight; that step's delivery completes it.
            return True
        del self._streams[request_id]
        stream._put(TokenEvent([], True, FINISH_ABORT, self.to_unix(now)))
        self._finish(stream, m)
        return True

    def reset_prefix_cache(self) -> bool:
        """Reset the engine's prefix cache and publish the resulting event now.

        Returns:
            False when some request still holds KV blocks.
        """
        ok = self.engine.reset_prefix_cache()
        events = self.engine.drain_kv_events()
        if self.publisher is not None and events:
            self.publisher.publish(events, ts=time.time())
            if self.metrics is not None:
                self.metrics.kv_events_published.inc()
        return ok

    # ------------------------------------------------------------------ stepping

    async def _loop(self) -> None:
        while True:
            try:
                await self._step_loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in the engine must not leave clients hanging: fail the live requests
                # (they end with "abort") and keep serving new ones.
                logger.exception(
                    "engine step failed; aborting live requests",
                    extra={"live_requests": len(self._streams)},
                )
                for request_id in list(self._streams):
                    self.abort(request_id)

    async def _step_loop(self) -> None:
        next_start: float | None = None
        scale = self.time_scale
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                if self.metrics is not None:
                    self.metrics.update_engine(self.engine.stats())
                await self._wake.wait()
                next_start = None
                continue
            now = self.engine_now()
            start = now if next_start is None else next_start
            result = self.engine.step(start)
            if result.num_scheduled_tokens == 0:
                # Nothing could be scheduled (cannot happen with a consistent engine); wait for
                # an arrival or abort instead of spinning.
                self._deliver(result)
                self._wake.clear()
                await self._wake.wait()
                next_start = None
                continue
            deadline = result.end_s
            delay_s = (deadline - self.engine_now()) * scale
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            lag_s = max(0.0, (self.engine_now() - deadline) * scale)
            next_start = deadline
            if self.metrics is not None:
                self.metrics.lag_seconds.observe(lag_s)
            if lag_s > _LAG_WARN_S:
                mono = time.monotonic()
                if mono - self._last_lag_warning > _LAG_WARN_INTERVAL_S:
                    self._last_lag_warning = mono
                    logger.warning(
                        "emulator step delivery is behind its deadline",
                        extra={"lag_s": round(lag_s, 4), "running": self.engine.num_running},
                    )
            if lag_s > self.resync_after_s:
                next_start = None
                if self.metrics is not None:
                    self.metrics.lag_resyncs.inc()
            if self.kv_store is not None and result.external_kv_saves:
                # The step's KV saves land before its tokens are delivered (vLLM's
                # ExampleConnector saves synchronously in the forward pass).
                await self._save_external_kv(result.external_kv_saves)
            self._deliver(result)

    async def _save_external_kv(self, prompts: list[list[int]]) -> None:
        store = self.kv_store
        assert store is not None
        for prompt in prompts:
            try:
                await asyncio.to_thread(store.save, prompt)
            except OSError:
                logger.exception(
                    "external KV save failed", extra={"kv_store_path": str(store.path)}
                )

    def _deliver(self, result: StepResult) -> None:
        end_unix = self.to_unix(result.end_s)
        scale = self.time_scale
        metrics = self.metrics
        streams = self._streams
        for fs in result.first_scheduled:
            stream = streams.get(fs.request_id)
            if stream is not None:
                stream.num_cached_tokens = fs.num_cached_tokens
        for out in result.outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            if metrics is not None:
                if stream._last_token_s is None:
                    metrics.time_to_first_token.observe((result.end_s - stream.arrival_s) * scale)
                else:
                    metrics.inter_token_latency.observe(
                        (result.end_s - stream._last_token_s) * scale
                    )
            stream._last_token_s = result.end_s
            stream._put(TokenEvent(out.new_token_ids, out.finished, out.finish_reason, end_unix))
        for m in result.finished:
            stream = streams.pop(m.request_id, None)
            if stream is not None:
                self._finish(stream, m)
        if self.publisher is not None and result.kv_events:
            self.publisher.publish(result.kv_events, ts=end_unix)
            if metrics is not None:
                metrics.kv_events_published.inc()
        if metrics is not None:
            metrics.update_engine(self.engine.stats())
            if result.num_scheduled_tokens:
                metrics.iteration_tokens.observe(result.num_scheduled_tokens)

    def _finish(self, stream: RequestStream, m: RequestMetrics) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(m, self.time_scale, stream.max_tokens)
        span = stream._span
        if span is None:
            return
        span.set_attribute("slomesh.cached_tokens", m.num_cached_tokens)
        span.set_attribute("slomesh.output_tokens", m.num_output_tokens)
        span.set_attribute("slomesh.preemptions", m.num_preemptions)
        span.set_attribute("slomesh.finish_reason", m.finish_reason)
        ctx = trace.set_span_in_context(span)
        assert self.tracer is not None
        phases = (
            ("engine.queue", m.arrival_time_s, m.first_scheduled_time_s),
            ("engine.prefill", m.first_scheduled_time_s, m.first_token_time_s),
            ("engine.decode", m.first_token_time_s, m.finished_time_s),
        )
        for name, t_start, t_end in phases:
            if t_start is None:
                continue
            if t_end is None:
                t_end = m.finished_time_s
            child = self.tracer.start_span(
                name,
                context=ctx,
                start_time=self._ns(t_start),
                attributes={"slomesh.request_id": m.request_id},
            )
            child.end(end_time=self._ns(t_end))
        if m.finish_reason == FINISH_ABORT:
            span.set_status(Status(StatusCode.ERROR, "aborted"))
        span.end(end_time=self._ns(m.finished_time_s))
