"""What every slomesh gRPC service needs: health checking, reflection, graceful shutdown and a
Prometheus endpoint.

Shutdown order (STYLE.md): health goes NOT_SERVING first so load balancers and clients stop
sending, then `server.stop(grace)` lets in-flight calls finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)

# Keepalive and message-size options for long-lived streaming services.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class GrpcServerHandle:
    """A started grpc.aio server with its health servicer."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str]

    async def set_serving(self, serving: bool) -> None:
        """Sets every registered service (and the overall "" service) SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful stop: NOT_SERVING, then stop accepting and wait up to `grace_s`."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_grpc_server(
    servicers: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any]],
    service_names: Sequence[str],
    bind: str = "127.0.0.1:0",
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> GrpcServerHandle:
    """Starts a grpc.aio server with health checking and reflection.

    Args:
        servicers: pairs of (`add_XServicer_to_server` function, servicer instance).
        service_names: full names of those services ("slomesh.v1.GlobalScheduler"), for health
            and reflection.
        bind: "host:port"; port 0 picks a free one.
        interceptors: server interceptors.

    Returns:
        The handle; every service is SERVING when this returns.

    Raises:
        RuntimeError: the address could not be bound.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
    for add_fn, servicer in servicers:
        add_fn(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {bind}")
    await server.start()
    handle = GrpcServerHandle(server, health_servicer, port, list(service_names))
    await handle.set_serving(True)
    logger.info("grpc server started", extra={"port": port, "services": list(service_names)})
    return handle


def start_metrics_server(
    port: int = 0, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> int:
    """Serves Prometheus metrics over HTTP on a daemon thread.

    Args:
        port: TCP port; 0 picks a free one.
        host: address to bind.
        registry: the collector registry to expose.

    Returns:
        The bound port.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("metrics server started", extra={"port": bound})
    return bound


def install_signal_handlers(stop_event: asyncio.Event) -> None:
    """Sets `stop_event` on SIGINT or SIGTERM (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
