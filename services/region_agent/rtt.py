"""RTT measurement to peer regions: a gRPC `Ping` to each peer agent every interval, smoothed.

In the local mesh a peer's address is a WAN relay that adds the emulated one-way delay each way,
so the measured RTT is the emulated WAN RTT plus loopback overhead.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.region_agent import metrics
from services.region_agent.config import PeerConfig
from services.region_agent.state import Ewma
from slomesh.v1 import region_agent_pb2, region_agent_pb2_grpc

logger = logging.getLogger(__name__)


class RttProber:
    """Pings peer agents and keeps a smoothed RTT per peer region.

    Args:
        region: this region's name (sent as `from_region`).
        peers: the peers to ping.
        timeout_s: deadline of one ping, seconds.
        alpha: EWMA weight of a new sample, in (0, 1].
    """

    def __init__(
        self, region: str, peers: list[PeerConfig], timeout_s: float, alpha: float
    ) -> None:
        self.region = region
        self.peers = peers
        self.timeout_s = timeout_s
        self._ewma = {p.region: Ewma(alpha) for p in peers}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, region_agent_pb2_grpc.RegionAgentStub] = {}
        self.failures: dict[str, int] = {p.region: 0 for p in peers}

    def rtt_ms(self) -> dict[str, float]:
        """Smoothed RTT per peer region that answered at least once, in ms."""
        return {region: e.value for region, e in self._ewma.items() if e.value is not None}

    def _stub(self, peer: PeerConfig) -> region_agent_pb2_grpc.RegionAgentStub:
        stub = self._stubs.get(peer.region)
        if stub is None:
            channel = grpc.aio.insecure_channel(peer.address)
            self._channels[peer.region] = channel
            stub = self._stubs[peer.region] = region_agent_pb2_grpc.RegionAgentStub(channel)
        return stub

    async def ping(self, peer: PeerConfig) -> float | None:
        """Pings one peer; returns the sample in ms (and folds it in), None on failure."""
        stub = self._stub(peer)
        start = time.perf_counter()
        try:
            await stub.Ping(
                region_agent_pb2.PingRequest(from_region=self.region, sent_unix_ns=time.time_ns()),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            self.failures[peer.region] += 1
            logger.debug(
                "rtt ping failed",
                extra={"peer": peer.region, "address": peer.address, "code": exc.code().name},
            )
            return None
        sample_ms = (time.perf_counter() - start) * 1000.0
        value = self._ewma[peer.region].update(sample_ms)
        metrics.PEER_RTT_MS.labels(self.region, peer.region).set(value)
        return sample_ms

    async def ping_all(self) -> dict[str, float | None]:
        """Pings every peer concurrently; returns the samples in ms (None = failed)."""
        results = await asyncio.gather(*(self.ping(p) for p in self.peers))
        return {p.region: r for p, r in zip(self.peers, results)}

    async def close(self) -> None:
        """Closes the peer channels."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
