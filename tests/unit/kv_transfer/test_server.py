from __future__ import annotations

import grpc
import pytest

from services.kv_transfer.server import KVTransferServicer, serve
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc


async def test_get_info_reports_region_and_link_capacities():
    handle = await serve("tokyo", {"frankfurt": 2e8, "washington-dc": 1e8}, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            info = await kv_transfer_pb2_grpc.KVTransferStub(channel).GetInfo(
                kv_transfer_pb2.GetInfoRequest()
            )
        assert info.region == "tokyo"
        assert dict(info.link_capacity_bytes_per_s) == {"frankfurt": 2e8, "washington-dc": 1e8}
    finally:
        await handle.stop(0.1)


def test_non_positive_capacity_is_refused():
    with pytest.raises(ValueError, match="frankfurt"):
        KVTransferServicer("tokyo", {"frankfurt": 0})
