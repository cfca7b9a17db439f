"""Live hot-prefix prefetch (issue 5): the scheduler copies the prefixes a region asks for more
and more to it before its requests need them.

The planning is `slomesh.scheduler.prefetch.HotPrefixTracker`, the same object the simulator
runs: the scheduler counts each placed request in the demand of its prompt's prefixes
(`PrefetchRunner.observe`), and every ``period_s`` of the policy's ``kv_prefetch`` the tracker
orders the most requested prefixes copied to the regions whose demand for them grew and which do
not hold them, from the instance of another region holding the longest part of them. Each order
(`PrefetchOrder`: the prefix's tokens ``P``, source and destination instance) runs in three
steps, all through interfaces a real vLLM with vLLM's file-based KV connector
(``ExampleConnector``) offers, and the emulator likewise:

1. **Export** at the source: a one-token request for the prompt ``P + P[:2]`` (the region
   agent's ``Generate``, ``max_tokens`` 1, on the source instance). The instance holds ``P`` in
   its prefix cache (the index said so), computes two tokens and its connector saves the KV of
   the prompt's whole blocks short of its last token -- exactly ``P`` (``P`` is a whole number of
   blocks) -- as ``P``'s folder in its store, unless the folder exists. Two tokens, not one:
   the connector saves ``align(n - 1)`` tokens of an ``n``-token prompt but looks up
   ``align(n - 2)`` (`slomesh.transfer.stores.example_connector_lookup_tokens`); with ``n =
   len(P) + 2`` both are ``len(P)``.
2. **Move**: ``KVTransfer.TransferPrefix`` of ``P`` from the source instance's store to the
   destination instance's, traffic class ``PREFETCH_KV`` (only the bandwidth the foreground KV
   moves leave), followed with ``Watch`` (`services.global_scheduler.kv_moves.KvMover`).
3. **Import** at the destination: the same one-token request on the destination instance: its
   connector finds ``P``'s folder and loads it (vLLM's
   ``prompt_tokens_by_source_total{source="external_kv_transfer"}``); ``P``'s blocks are then in
   the instance's prefix cache like any computed ones (its KV events publish them to the index),
   so later prompts that start with ``P`` hit them there -- the connector alone would not serve
   them: it loads only the folder of a prompt's own whole length.

The one-token requests are internal: they go straight to the region agents (not through the
placement, the ledger or the output-length learning). A failed step ends the prefetch (logged,
counted); the tracker may order it again later. Each prefetch runs in a ``kv_prefetch`` span
(internal kind; attributes: prefix tokens, source and destination, bytes, outcome) and is
counted in ``slomesh_scheduler_kv_prefetches_total{outcome}`` and
``slomesh_scheduler_kv_prefetch_bytes_total``.

Source: the planning as `slomesh.scheduler.prefetch`; the export/import through a
prompt-keyed connector store follows vLLM 0.32's ``ExampleConnector``
(``vllm/distributed/kv_transfer/kv_connector/v1/example_connector.py``: a request saves
``align(len(prompt) - 1)`` tokens and loads that folder when it exists).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.global_scheduler.kv_moves import KvMover, TransferFailed
from services.global_scheduler.metrics import SchedulerMetrics
from services.global_scheduler.routes import Routes
from slomesh.scheduler.prefetch import HotPrefixTracker, PrefetchOrder
from slomesh.scheduler.validation import ValidatedRequest
from slomesh.scheduler.view import ClusterView
from slomesh.telemetry import get_tracer
from slomesh.v1 import kv_transfer_pb2, region_agent_pb2, region_agent_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = ["PrefetchRunner"]

STEP_TIMEOUT_S = 60.0
"""Longest time one step of a prefetch (export, move or import) may take, seconds."""


class _StepFailed(Exception):
    """A step of a prefetch did not do its part (the message says which and why)."""


class PrefetchRunner:
    """Runs the hot-prefix prefetches of one scheduler replica (module docstring).

    Args:
        tracker: The planner (its config is the policy's ``kv_prefetch``).
        view: The scheduler's cluster view (instances, agents, prefix index, links).
        mover: The scheduler's KV mover (routes to the KV transfer services, channels).
        agent_routes: The scheduler's agent routes; an end's agent is reached as from its own
            region (the prefix's steps are not a client's request: no WAN path to emulate),
            else at the address its state gives.
        agent_stub: The scheduler's agent channel cache: endpoint -> stub.
        metrics: The scheduler's metrics.
        clock_s: The tracker's clock, seconds (default: the wall clock).
    """

    def __init__(
        self,
        tracker: HotPrefixTracker,
        view: ClusterView,
        mover: KvMover,
        agent_routes: Routes,
        agent_stub: Callable[[str], region_agent_pb2_grpc.RegionAgentStub],
        metrics: SchedulerMetrics,
        clock_s: Callable[[], float] = time.time,
    ):
        self.tracker = tracker
        self.view = view
        self.mover = mover
        self.agent_routes = agent_routes
        self.agent_stub = agent_stub
        self.metrics = metrics
        self.clock_s = clock_s
        self.tracer = get_tracer("slomesh.scheduler")
        self._tasks: set[asyncio.Task[str]] = set()

    def observe(self, request: ValidatedRequest) -> None:
        """Counts a placed request in the demand of its prompt's prefixes (token prompts only:
        a text prompt has no token ids to key)."""
        if len(request.prompt_token_ids):
            self.tracker.observe(
                request.model, request.origin_region, request.prompt_token_ids, self.clock_s()
            )

    def plan_once(self) -> list[asyncio.Task[str]]:
        """Plans now and starts a task per order; returns the tasks (each ends with its
        outcome)."""
        orders = self.tracker.plan(self.view, self.clock_s(), self.view.clock_ns())
        started = []
        for order in orders:
            task = asyncio.get_running_loop().create_task(
                self.prefetch(order), name=f"kv-prefetch-{order.dest_region}-{order.prefix_key}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started.append(task)
        return started

    async def run(self) -> None:
        """Plans every ``period_s`` until cancelled."""
        period_s = self.tracker.config.period_s
        while True:
            await asyncio.sleep(period_s)
            try:
                self.plan_once()
            except Exception:  # a bad plan must not stop the loop (or the scheduler)
                logger.exception("hot-prefix prefetch plan failed")

    async def close(self) -> None:
        """Cancels the prefetches under way."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def prefetch(self, order: PrefetchOrder) -> str:
        """Runs one order: export, move, import (module docstring).

        Returns:
            ``completed``, ``failed`` or ``no_endpoint`` (no route to the destination's KV
            transfer service, or no agent endpoint for an end). Never raises but for
            cancellation (counted as ``cancelled``).
        """
        tokens = [int(t) for t in order.token_ids]
        prompt = [*tokens, *tokens[:2]]
        transfer_id = f"prefetch-{uuid.uuid4().hex}"
        outcome, error, moved_bytes = "failed", "", 0
        attributes = {
            "slomesh.transfer_id": transfer_id,
            "slomesh.model": order.model,
            "slomesh.prefix_tokens": len(tokens),
            "slomesh.from_tokens": order.from_tokens,
            "slomesh.source_region": order.source_region,
            "slomesh.source_instance_id": order.source_instance,
            "slomesh.destination_region": order.dest_region,
            "slomesh.destination_instance_id": order.dest_instance,
            "slomesh.predicted_bytes": order.bytes,
        }
        with self.tracer.start_as_current_span(
            "kv_prefetch", kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            try:
                endpoint = self.mover.routes.resolve(order.dest_region, order.dest_region, "")
                source_agent = self._agent_endpoint(order.source_region)
                dest_agent = self._agent_endpoint(order.dest_region)
                if not (endpoint and source_agent and dest_agent):
                    outcome = "no_endpoint"
                    error = "no KV transfer route or agent endpoint for an end of the prefetch"
                    return outcome
                await self._one_token(source_agent, order.model, order.source_instance, prompt)
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    _, moved_bytes = await self.mover.transfer_prefix(
                        endpoint,
                        transfer_id=transfer_id,
                        model=order.model,
                        source=(order.source_region, order.source_instance),
                        destination=(order.dest_region, order.dest_instance),
                        token_ids=prompt,
                        traffic_class=kv_transfer_pb2.PREFETCH_KV,
                        deadline_unix_ns=0,
                        span=span,
                    )
                await self._one_token(dest_agent, order.model, order.dest_instance, prompt)
                outcome = "completed"
            except (_StepFailed, TransferFailed) as err:
                error = str(err)
            except TimeoutError:
                error = f"a step took over {STEP_TIMEOUT_S} s"
            except grpc.aio.AioRpcError as err:
                error = f"{err.code().name}: {err.details()}"
            except asyncio.CancelledError:
                outcome, error = "cancelled", "the scheduler is stopping"
                raise
            except Exception as err:  # logged and counted; never takes the scheduler down
                logger.exception("hot-prefix prefetch crashed", extra={"transfer_id": transfer_id})
                error = f"{type(err).__name__}: {err}"
            finally:
                self.tracker.done(order)
                span.set_attribute("slomesh.outcome", outcome)
                if error:
                    span.set_status(Status(StatusCode.ERROR, error))
                self.metrics.kv_prefetches.labels(outcome).inc()
                if outcome == "completed":
                    self.metrics.kv_prefetch_bytes.inc(moved_bytes)
                (logger.info if outcome == "completed" else logger.warning)(
                    "hot-prefix prefetch ended",
                    extra={
                        "transfer_id": transfer_id,
                        "outcome": outcome,
                        "error": error,
                        "prefix_tokens": len(tokens),
                        "source_instance": order.source_instance,
                        "destination_instance": order.dest_instance,
                    },
                )
        return outcome

    def _agent_endpoint(self, region: str) -> str:
        published = next((i.agent_endpoint for i in self.view.instances([region])), "")
        return self.agent_routes.resolve(region, region, published)

    async def _one_token(
        self, endpoint: str, model: str, instance_id: str, prompt: list[int]
    ) -> None:
        """A one-token request for `prompt` on one instance through its region's agent."""
        call = self.agent_stub(endpoint).Generate(
            region_agent_pb2.AgentGenerateRequest(
                request_id=f"prefetch-{uuid.uuid4().hex}",
                model=model,
                prompt_token_ids=prompt,
                max_tokens=1,
                ignore_eos=True,
                instance_id=instance_id,
            ),
            timeout=STEP_TIMEOUT_S,
        )
        async for message in call:
            if message.WhichOneof("event") == "completion":
                return
        raise _StepFailed(f"{instance_id}: the agent ended the stream without a completion")
