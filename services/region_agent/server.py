"""The region agent: wiring of scraping, KV event indexing, NATS publishing, RTT probing and the
`RegionAgent` gRPC service.

What it publishes (subjects from `slomesh.bus`):

- `slomesh.region.<region>.state`: `RegionState` at `state_hz` and, rate-limited to one per
  `state_min_interval_s`, as soon as an instance's health, running/waiting counts or the
  agent's own outstanding/queued accounting changes. `seq` +1 per message, with the agent's
  random `agent_incarnation`. Not published while NATS is disconnected (state is only useful
  fresh); the seq does not advance for skipped messages.
- `slomesh.region.<region>.kv`: `KvIndexDelta`, the net index changes of all instances since the
  previous delta, at most `kv_flush_interval_s` after a change, only when non-empty. `seq` +1
  per message (first delta: 1) within one incarnation. Deltas buffered by the NATS client while
  disconnected are sent on reconnect; a consumer that still sees a seq jump requests a snapshot.
- Request/reply on `slomesh.region.<region>.kv.snapshot` (any request body): pending changes
  are first published as a delta (seq N), then the reply is a `KvIndexSnapshot` with seq N
  holding every instance's full key set (each entry `cleared=True`, so applying it replaces
  that instance). A consumer applies deltas with seq > N after it.
- `slomesh.region.<region>.rtt`: `RttReport` every `rtt_interval_s` when peers are configured.

Requests for a model an idle swappable instance does not serve switch it first
(`services.region_agent.model_switch`); the state then carries the switch (the instance's new
model and `model_load_remaining_s`) and the region's weight cache and load bandwidths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import nats.errors
import zmq.asyncio
from nats.aio.client import Client as NatsClient
from opentelemetry import trace

from services.region_agent import metrics
from services.region_agent.config import AgentConfig
from services.region_agent.forwarder import Forwarder, UpstreamError
from services.region_agent.kv_subscriber import KvEventSubscriber
from services.region_agent.model_switch import ModelSwitcher
from services.region_agent.routing import NoInstanceError, RequestValidationError, validate_request
from services.region_agent.rtt import RttProber
from services.region_agent.scraper import (
    MetricsParseError,
    fetch_engine_info,
    probe_health,
    scrape_metrics,
)
from services.region_agent.state import InstanceRuntime
from slomesh import bus
from slomesh.kv.index import DeltaAccumulator, InstanceKvTracker, PrefixIndex
from slomesh.service import GrpcServerHandle, start_grpc_server
from slomesh.telemetry import get_tracer, grpc_metadata_extract
from slomesh.topology import Topology
from slomesh.v1 import region_agent_pb2, region_agent_pb2_grpc, state_pb2

logger = logging.getLogger(__name__)
tracer = get_tracer(__name__)

SENT_UNIX_NS_METADATA = "slomesh-sent-unix-ns"
"""gRPC metadata key: the client's send time in unix ns (for the `wan.hop` span)."""

SERVICE_NAME = "slomesh.v1.RegionAgent"


class RegionAgent:
    """One region's agent.

    Args:
        config: agent configuration (instances, NATS, timing).
        topology: the mesh topology (prices, egress, GPU types, max_model_len defaults).
        incarnation: id of this agent run; None = random 16 hex chars.

    Raises:
        KeyError: `config.region` is not in the topology.
    """

    def __init__(self, config: AgentConfig, topology: Topology, incarnation: str | None = None):
        self.config = config
        self.topology = topology
        self.region_spec = topology.region(config.region)
        self.region = config.region
        self.incarnation = incarnation or secrets.token_hex(8)
        self.index = PrefixIndex()
        self.runtimes: dict[str, InstanceRuntime] = {}
        spec_by_id = {i.id: i for i in self.region_spec.instances}
        for inst in config.instances:
            spec = spec_by_id.get(inst.instance_id)
            gpu = inst.gpu_type or (spec.gpu_type if spec else "") or ""
            if spec is None:
                logger.warning(
                    "instance not in the topology's region",
                    extra={"instance_id": inst.instance_id, "region": self.region},
                )
            self.runtimes[inst.instance_id] = InstanceRuntime(
                config=inst,
                gpu_type=gpu,
                tracker=InstanceKvTracker(inst.instance_id),
                swappable=spec.swappable if spec is not None else False,
                model_load_overhead_s=(
                    topology.model_load_overhead_s(spec.id) if spec is not None else 0.0
                ),
            )
        self.pending = DeltaAccumulator()
        self.kv_seq = 0
        self.state_seq = 0
        self.nc: NatsClient | None = None
        self.grpc: GrpcServerHandle | None = None
        self.session: aiohttp.ClientSession | None = None
        self.forwarder: Forwarder | None = None
        self.switcher: ModelSwitcher | None = None
        self.rtt = RttProber(self.region, config.peers, config.rtt_timeout_s, config.rtt_ewma_alpha)
        self._zmq: zmq.asyncio.Context | None = None
        self._subscribers: list[KvEventSubscriber] = []
        self._tasks: list[asyncio.Task] = []
        self._state_changed = asyncio.Event()
        self._last_load: dict[str, tuple] = {}
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound gRPC port (after `start`)."""
        if self.grpc is None:
            raise RuntimeError("agent not started")
        return self.grpc.port

    @property
    def endpoint(self) -> str:
        """The gRPC address published in `RegionState.agent_endpoint`."""
        if self.config.advertise:
            return self.config.advertise
        host = self.config.bind.rpartition(":")[0] or "127.0.0.1"
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Connects NATS, opens the KV event sockets, starts the gRPC server and the loops.

        Raises:
            nats.errors.NoServersError: NATS unreachable at start.
            zmq.ZMQError: a KV event endpoint cannot be opened.
            RuntimeError: the gRPC address cannot be bound.
        """
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        )
        self.switcher = ModelSwitcher(
            self.region, self.topology, self.session, self._on_load_change
        )
        self.forwarder = Forwarder(
            self.region,
            self.runtimes,
            self.index,
            self.session,
            self._on_load_change,
            self.switcher,
        )
        self.nc = await bus.connect_nats(self.config.nats_url, f"region-agent-{self.region}")
        await self.nc.subscribe(bus.kv_snapshot_subject(self.region), cb=self._on_snapshot_request)
        self._zmq = zmq.asyncio.Context()
        for rt in self.runtimes.values():
            if rt.config.kv_events:
                sub = KvEventSubscriber(
                    self.region,
                    rt.tracker,
                    rt.config.kv_events,
                    rt.config.kv_events_bind,
                    self._on_kv_delta,
                    self._zmq,
                )
                sub.start()
                self._subscribers.append(sub)
        servicer = RegionAgentServicer(self)
        self.grpc = await start_grpc_server(
            [(region_agent_pb2_grpc.add_RegionAgentServicer_to_server, servicer)],
            [SERVICE_NAME],
            self.config.bind,
        )
        loop = asyncio.get_running_loop()
        for rt in self.runtimes.values():
            self._tasks.append(
                loop.create_task(self._probe_loop(rt), name=f"probe-{rt.instance_id}")
            )
        self._tasks.append(loop.create_task(self._state_loop(), name="state-publisher"))
        self._tasks.append(loop.create_task(self._kv_flush_loop(), name="kv-publisher"))
        if self.config.peers:
            self._tasks.append(loop.create_task(self._rtt_loop(), name="rtt-prober"))
        logger.info(
            "region agent started",
            extra={
                "region": self.region,
                "grpc_port": self.grpc.port,
                "instances": list(self.runtimes),
                "incarnation": self.incarnation,
            },
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, let in-flight streams finish within the grace period,
        publish the last KV changes, drain NATS, close sockets."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self.grpc is not None:
            await self.grpc.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.switcher is not None:
            await self.switcher.stop()
        for sub in self._subscribers:
            await sub.stop()
        if self.nc is not None and self.nc.is_connected:
            await self.publish_kv_delta()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                logger.warning("nats drain failed", extra={"error": repr(exc)})
        await self.rtt.close()
        if self.session is not None:
            await self.session.close()
        if self._zmq is not None:
            self._zmq.term()
        logger.info("region agent stopped", extra={"region": self.region})

    # -- KV index --------------------------------------------------------------------------

    def _on_kv_delta(self, delta: state_pb2.InstanceBlockDelta) -> None:
        self.index.apply_delta(delta)
        self.pending.add(delta)

    def _take_kv_delta(self) -> state_pb2.KvIndexDelta | None:
        """Takes the pending changes as the next delta (seq +1), None when there are none."""
        if not self.pending:
            return None
        instances = self.pending.take()
        self.kv_seq += 1
        return state_pb2.KvIndexDelta(
            region=self.region,
            seq=self.kv_seq,
            timestamp_unix_ns=time.time_ns(),
            instances=instances,
            agent_incarnation=self.incarnation,
        )

    async def publish_kv_delta(self) -> bool:
        """Publishes pending index changes now; returns True when a delta was sent."""
        delta = self._take_kv_delta()
        if delta is None:
            return False
        await self._publish("kv", bus.kv_subject(self.region), delta)
        return True

    def kv_snapshot(self) -> state_pb2.KvIndexSnapshot:
        """The full index; its seq is the last delta seq (pending changes must be taken first)."""
        instances = [
            state_pb2.InstanceBlockDelta(
                instance_id=iid,
                stored_keys=list(self.index.keys(iid)),
                cleared=True,
                block_size=self.index.block_size(iid) or rt.block_size,
            )
            for iid, rt in self.runtimes.items()
        ]
        return state_pb2.KvIndexSnapshot(
            region=self.region,
            seq=self.kv_seq,
            timestamp_unix_ns=time.time_ns(),
            instances=instances,
            agent_incarnation=self.incarnation,
        )

    async def _on_snapshot_request(self, msg) -> None:
        delta = self._take_kv_delta()
        snapshot = self.kv_snapshot()
        if delta is not None:
            await self._publish("kv", bus.kv_subject(self.region), delta)
        if not msg.reply:
            logger.warning("kv snapshot request without a reply subject")
            return
        await self._publish("kv_snapshot", msg.reply, snapshot)

    async def _kv_flush_loop(self) -> None:
        interval = self.config.kv_flush_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.nc is not None and not self.nc.is_closed:
                await self.publish_kv_delta()

    # -- state -----------------------------------------------------------------------------

    def _on_load_change(self) -> None:
        self._state_changed.set()

    def region_state(self, seq: int | None = None) -> state_pb2.RegionState:
        """The region's current `RegionState` (with `seq`, default the last published one)."""
        instances = []
        cloud_region = self.region_spec.cloud_region
        for rt in self.runtimes.values():
            # An instance whose GPU type has no catalog price (e.g. "CPU") is published at 0.
            price = spot = 0.0
            if rt.gpu_type:
                with contextlib.suppress(KeyError):
                    price, spot = self.topology.gpu_price_usd_per_hour(rt.gpu_type, cloud_region)
            state = rt.to_proto(price, spot, self.index.num_blocks(rt.instance_id))
            # What the engine does not report comes from the topology: the instance's model
            # and context at start.
            spec = next((i for i in self.region_spec.instances if i.id == rt.instance_id), None)
            if not state.max_model_len:
                state.max_model_len = (
                    self.topology.instance_max_model_len(spec.id)
                    if spec is not None
                    else self.topology.model.max_model_len
                )
            if not state.model:
                state.model = (
                    self.topology.instance_model(spec.id).name
                    if spec is not None
                    else self.topology.model.name
                )
            instances.append(state)
            self._export_gauges(state)
        return state_pb2.RegionState(
            region=self.region,
            seq=self.state_seq if seq is None else seq,
            timestamp_unix_ns=time.time_ns(),
            agent_endpoint=self.endpoint,
            instances=instances,
            agent_incarnation=self.incarnation,
            egress_usd_per_gb=self.region_spec.egress_usd_per_gb,
            weight_cache_models=(
                self.switcher.weight_cache_models
                if self.switcher is not None
                else self.topology.weight_cache_models(self.region)
            ),
            weight_cache_gb_per_s=self.region_spec.weight_cache_gb_per_s,
            remote_weights_gb_per_s=self.region_spec.remote_weights_gb_per_s,
        )

    def _export_gauges(self, s: state_pb2.InstanceState) -> None:
        labels = (self.region, s.instance_id)
        metrics.INSTANCE_HEALTHY.labels(*labels).set(1 if s.healthy else 0)
        metrics.INSTANCE_OUTSTANDING.labels(*labels).set(s.num_requests_outstanding)
        metrics.INSTANCE_QUEUED_PREFILL.labels(*labels).set(s.queued_prefill_tokens)
        metrics.INSTANCE_QUEUED_DECODE.labels(*labels).set(s.queued_decode_tokens)
        metrics.INSTANCE_INDEXED_BLOCKS.labels(*labels).set(s.num_indexed_blocks)
        metrics.INSTANCE_RUNNING.labels(*labels).set(s.num_requests_running)
        metrics.INSTANCE_WAITING.labels(*labels).set(s.num_requests_waiting)
        metrics.INSTANCE_KV_USAGE.labels(*labels).set(s.kv_cache_usage)
        metrics.INSTANCE_PREFILL_TPS.labels(*labels).set(s.prefill_tokens_per_s)
        metrics.INSTANCE_DECODE_TPS.labels(*labels).set(s.decode_tokens_per_s)
        for phase, fit in (("decode", s.decode_fit), ("prefill", s.prefill_fit)):
            if s.HasField(f"{phase}_fit"):
                metrics.INSTANCE_ONLINE_FIT_R2.labels(*labels, phase).set(fit.r2)
                metrics.INSTANCE_ONLINE_FIT_OBSERVATIONS.labels(*labels, phase).set(
                    fit.observations
                )

    async def publish_state(self) -> bool:
        """Publishes a `RegionState` now (seq +1); False when NATS is not connected."""
        if self.nc is None or not self.nc.is_connected:
            return False
        now = time.monotonic()
        for rt in self.runtimes.values():
            rt.tick(now)
        state = self.region_state(self.state_seq + 1)
        self.state_seq += 1
        await self._publish("state", bus.state_subject(self.region), state)
        return True

    async def _state_loop(self) -> None:
        """Publishes on a fixed-rate schedule (`state_hz`, catching up after a late tick so the
        rate holds under load) plus, rate-limited, whenever `_state_changed` is set."""
        period = 1.0 / self.config.state_hz
        min_gap = self.config.state_min_interval_s
        last_publish = 0.0
        next_due = time.monotonic()
        while True:
            timeout = max(0.0, next_due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), timeout)
            since = time.monotonic() - last_publish
            if since < min_gap:
                await asyncio.sleep(min_gap - since)
            self._state_changed.clear()
            try:
                await self.publish_state()
            except Exception:
                logger.exception("state publish failed")
            last_publish = time.monotonic()
            if last_publish >= next_due:
                next_due += period
                if next_due < last_publish - period:
                    # More than a period behind (e.g. the loop stalled): do not burst.
                    next_due = last_publish + period

    # -- probing ---------------------------------------------------------------------------

    async def _probe_loop(self, rt: InstanceRuntime) -> None:
        assert self.session is not None
        cfg = self.config
        base = rt.config.url
        health_ok = False
        next_health = 0.0
        info_due = True
        next_info_attempt = 0.0
        while True:
            started = time.monotonic()
            if started >= next_health:
                health_ok = await probe_health(self.session, base)
                next_health = started + cfg.health_interval_s
            scraped = None
            try:
                scraped = await scrape_metrics(self.session, base)
            except (aiohttp.ClientError, TimeoutError, OSError, MetricsParseError) as exc:
                logger.debug(
                    "scrape failed", extra={"instance_id": rt.instance_id, "error": repr(exc)}
                )
            ok = scraped is not None and health_ok
            if not ok:
                metrics.SCRAPE_ERRORS.labels(self.region, rt.instance_id).inc()
            was_healthy = rt.healthy
            changed = rt.probe_result(ok, cfg.unhealthy_after_failures)
            if scraped is not None:
                rt.scraped = scraped
                if scraped.num_gpu_blocks:
                    rt.tracker.set_capacity_blocks(scraped.num_gpu_blocks)
                rt.observe_step_times(scraped, cfg.online_fit)
            if changed:
                logger.info(
                    "instance health changed",
                    extra={"instance_id": rt.instance_id, "healthy": rt.healthy},
                )
                if rt.healthy and not was_healthy:
                    info_due = True  # (re)read engine info: the engine may have restarted
            if ok and info_due and started >= next_info_attempt:
                try:
                    info = await fetch_engine_info(self.session, base)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    logger.debug(
                        "engine info failed",
                        extra={"instance_id": rt.instance_id, "error": repr(exc)},
                    )
                    next_info_attempt = started + 1.0
                else:
                    rt.adopt_info(info)
                    info_due = False
            load = (rt.healthy, rt.scraped.num_requests_running, rt.scraped.num_requests_waiting)
            if changed or self._last_load.get(rt.instance_id) != load:
                self._last_load[rt.instance_id] = load
                self._state_changed.set()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, cfg.scrape_interval_s - elapsed))

    # -- RTT -------------------------------------------------------------------------------

    async def _rtt_loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.rtt.ping_all()
            rtts = self.rtt.rtt_ms()
            if rtts and self.nc is not None and self.nc.is_connected:
                report = state_pb2.RttReport(
                    region=self.region, timestamp_unix_ns=time.time_ns(), rtt_ms=rtts
                )
                await self._publish("rtt", bus.rtt_subject(self.region), report)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.config.rtt_interval_s - elapsed))

    # -- NATS ------------------------------------------------------------------------------

    async def _publish(self, kind: str, subject: str, message) -> None:
        assert self.nc is not None
        try:
            await bus.publish(self.nc, subject, message)
        except (nats.errors.Error, OSError) as exc:
            metrics.PUBLISH_ERRORS.labels(self.region, kind).inc()
            logger.warning(
                "nats publish failed", extra={"kind": kind, "subject": subject, "error": repr(exc)}
            )
            return
        metrics.PUBLISHES.labels(self.region, kind).inc()


def _metadata_value(metadata, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key and isinstance(item[1], str):
            return item[1]
    return None


class RegionAgentServicer(region_agent_pb2_grpc.RegionAgentServicer):
    """gRPC `RegionAgent`: Generate (forward + stream), Ping (RTT echo), GetState."""

    def __init__(self, agent: RegionAgent) -> None:
        self.agent = agent

    async def Generate(
        self, request: region_agent_pb2.AgentGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[region_agent_pb2.AgentGenerateResponse]:
        received_monotonic = time.monotonic()
        received_ns = time.time_ns()
        agent = self.agent
        metadata = context.invocation_metadata()
        parent = grpc_metadata_extract(metadata)
        sent = _metadata_value(metadata, SENT_UNIX_NS_METADATA)
        if sent is not None and sent.strip().lstrip("-").isdigit():
            hop = tracer.start_span(
                "wan.hop",
                context=parent,
                kind=trace.SpanKind.INTERNAL,
                start_time=int(sent),
                attributes={
                    "slomesh.origin_region": request.origin_region,
                    "slomesh.region": agent.region,
                },
            )
            hop.end(end_time=max(received_ns, int(sent)))
        # Spans are handled explicitly (not attached as the current context) because this
        # async generator may be closed from another context when the client cancels.
        span = tracer.start_span(
            "agent.generate",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE_NAME,
                "rpc.method": "Generate",
                "slomesh.region": agent.region,
                "slomesh.request_id": request.request_id,
                "slomesh.origin_region": request.origin_region,
                "slomesh.prompt_tokens": len(request.prompt_token_ids),
                "slomesh.max_tokens": request.max_tokens,
            },
        )
        code: grpc.StatusCode | None = None
        message = ""
        try:
            try:
                validate_request(request, agent.runtimes)
            except RequestValidationError as exc:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            if code is None:
                assert agent.forwarder is not None
                stream = agent.forwarder.generate(
                    request,
                    received_monotonic,
                    context.time_remaining(),
                    trace.set_span_in_context(span, parent),
                )
                try:
                    async with contextlib.aclosing(stream):
                        async for response in stream:
                            if response.HasField("started"):
                                span.set_attribute(
                                    "slomesh.instance_id", response.started.instance_id
                                )
                            elif response.HasField("completion"):
                                done = response.completion
                                span.set_attribute(
                                    "slomesh.completion_tokens", done.usage.completion_tokens
                                )
                                span.set_attribute("slomesh.ttft_ms", done.timings.ttft_ms)
                            yield response
                except NoInstanceError as exc:
                    code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
                except UpstreamError as exc:
                    code, message = exc.code, exc.message
        except (asyncio.CancelledError, GeneratorExit):
            span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled by the client"))
            raise
        finally:
            if code is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, message))
                span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.end()
        if code is not None:
            metrics.REQUEST_ERRORS.labels(agent.region, code.name).inc()
            logger.warning(
                "generate failed",
                extra={"request_id": request.request_id, "code": code.name, "error": message},
            )
            await context.abort(code, message)

    async def Ping(
        self, request: region_agent_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> region_agent_pb2.PingResponse:
        return region_agent_pb2.PingResponse(
            region=self.agent.region, received_unix_ns=time.time_ns()
        )

    async def GetState(
        self, request: region_agent_pb2.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.RegionState:
        return self.agent.region_state()
