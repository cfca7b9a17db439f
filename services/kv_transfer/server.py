"""gRPC `KVTransfer` server of one region."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from prometheus_client import Counter

from slomesh.service import GrpcServerHandle, start_grpc_server
from slomesh.telemetry import get_tracer, grpc_metadata_extract
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

logger = logging.getLogger(__name__)
_tracer = get_tracer(__name__)

SERVICE_NAME = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
RPCS = Counter("slomesh_kv_transfer_rpcs", "KVTransfer RPCs served", ["method"])


class KVTransferServicer(kv_transfer_pb2_grpc.KVTransferServicer):
    """Serves a region's transfer-service identity and WAN link capacities.

    Args:
        region: region slug.
        link_capacity_bytes_per_s: peer region -> configured link capacity, bytes per second.

    Raises:
        ValueError: a capacity is not positive (the message names the peer).
    """

    def __init__(self, region: str, link_capacity_bytes_per_s: Mapping[str, float]):
        for peer, capacity in link_capacity_bytes_per_s.items():
            if capacity <= 0:
                raise ValueError(f"link_capacity_bytes_per_s[{peer!r}] must be > 0, got {capacity}")
        self.region = region
        self.link_capacity_bytes_per_s = dict(link_capacity_bytes_per_s)

    async def GetInfo(self, request, context: grpc.aio.ServicerContext):
        RPCS.labels("GetInfo").inc()
        parent = grpc_metadata_extract(context.invocation_metadata())
        with _tracer.start_as_current_span("kv_transfer.get_info", context=parent):
            return kv_transfer_pb2.TransferServiceInfo(
                region=self.region, link_capacity_bytes_per_s=self.link_capacity_bytes_per_s
            )


async def serve(
    region: str, link_capacity_bytes_per_s: Mapping[str, float], bind: str
) -> GrpcServerHandle:
    """Starts the KVTransfer server (with health and reflection) on `bind`."""
    servicer = KVTransferServicer(region, link_capacity_bytes_per_s)
    return await start_grpc_server(
        [(kv_transfer_pb2_grpc.add_KVTransferServicer_to_server, servicer)], [SERVICE_NAME], bind
    )
