"""Configuration of a region agent: its instances, peers and timing knobs, parsed from the CLI.

`--instance` takes comma-separated `key=value` pairs::

    --instance id=wdc-h100-0,url=http://127.0.0.1:8001,kv_events=tcp://127.0.0.1:5557,gpu=H100

- `id` (required): instance id (as in the topology).
- `url` (required): base URL of the engine's OpenAI-compatible HTTP server.
- `kv_events` (optional): ZMQ endpoint of the engine's KV event publisher. By default the agent
  connects to it (the engine binds, e.g. vLLM with `"endpoint": "tcp://*:5557"`). Prefix it
  with `bind:` (`kv_events=bind:tcp://127.0.0.1:5557`) when the engine connects instead (vLLM's
  rule: a publisher endpoint without `*` is connected to) and the agent must bind.
- `gpu` (optional): GPU type used for prices and when the engine cannot say (real vLLM); else
  the topology's GPU type of that instance id.
- `profile` (optional): latency profile YAML written by ``slomesh profile`` for this instance's
  model and GPU type: the prior of the agent's online latency fit (`slomesh.online_fit`);
  without it the prior is the GPU type's roofline (none for a GPU type without one, e.g.
  "CPU": the fit then starts from the data alone).

`--peer REGION=HOST:PORT` names another region's agent (or the WAN relay in front of it) to
ping for RTT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from slomesh.online_fit import OnlineFitConfig
from slomesh.scheduler.predictor import load_latency_profile


@dataclass(frozen=True)
class InstanceConfig:
    """One engine instance the agent serves.

    Attributes:
        instance_id: id of the instance, unique in the mesh.
        url: base URL of its HTTP server, without a trailing slash.
        kv_events: ZMQ endpoint of its KV event publisher, None when it publishes none.
        kv_events_bind: True when the agent binds `kv_events` (the engine connects).
        gpu_type: GPU type from the CLI or the topology, None when unknown.
        latency_profile: path of the latency profile that is the online fit's prior, None
            for the roofline.
    """

    instance_id: str
    url: str
    kv_events: str | None = None
    kv_events_bind: bool = False
    gpu_type: str | None = None
    latency_profile: str | None = None


@dataclass(frozen=True)
class PeerConfig:
    """A peer region's agent address for RTT pings.

    Attributes:
        region: the peer region's name.
        address: "host:port" of its gRPC server (or the WAN relay in front of it).
    """

    region: str
    address: str


@dataclass
class AgentConfig:
    """Everything a `RegionAgent` needs besides the topology.

    Attributes:
        region: this region's name (topology slug).
        instances: the engines the agent serves.
        nats_url: NATS server URL(s).
        bind: gRPC bind address "host:port" (port 0 = pick a free one).
        advertise: gRPC address published in `RegionState.agent_endpoint`; None = bind address
            with the actual port.
        peers: peer agents to ping for RTT.
        state_hz: `RegionState` publish rate, per second (> 0).
        scrape_interval_s: period of `/metrics` scrapes per instance, seconds.
        health_interval_s: period of `/health` probes per instance, seconds.
        unhealthy_after_failures: consecutive failed probes before an instance is unhealthy.
        kv_flush_interval_s: longest time a KV index change waits before it is published.
        rtt_interval_s: period of RTT pings, seconds.
        rtt_timeout_s: deadline of one RTT ping, seconds.
        rtt_ewma_alpha: weight of a new RTT sample in the moving average, in (0, 1].
        state_min_interval_s: shortest gap between two `RegionState`s sent on change.
        shutdown_grace_s: time in-flight Generate streams get to finish on shutdown.
        online_fit: knobs of the per-instance online latency fit (`slomesh.online_fit`).

    Raises:
        ValueError: a value is out of range, or an instance's latency profile cannot be read
            or is invalid (the message names the instance).
    """

    region: str
    instances: list[InstanceConfig]
    nats_url: str
    bind: str = "127.0.0.1:0"
    advertise: str | None = None
    peers: list[PeerConfig] = field(default_factory=list)
    state_hz: float = 10.0
    scrape_interval_s: float = 0.1
    health_interval_s: float = 0.5
    unhealthy_after_failures: int = 3
    kv_flush_interval_s: float = 0.05
    rtt_interval_s: float = 1.0
    rtt_timeout_s: float = 2.0
    rtt_ewma_alpha: float = 0.3
    state_min_interval_s: float = 0.02
    shutdown_grace_s: float = 10.0
    online_fit: OnlineFitConfig = field(default_factory=OnlineFitConfig)

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("instances: at least one --instance is required")
        ids = [i.instance_id for i in self.instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"instances: duplicate instance ids in {ids}")
        if self.state_hz <= 0:
            raise ValueError(f"state_hz: must be > 0, got {self.state_hz}")
        if not 0 < self.rtt_ewma_alpha <= 1:
            raise ValueError(f"rtt_ewma_alpha: must be in (0, 1], got {self.rtt_ewma_alpha}")
        if self.unhealthy_after_failures < 1:
            raise ValueError("unhealthy_after_failures: must be >= 1")
        for name in (
            "scrape_interval_s",
            "health_interval_s",
            "kv_flush_interval_s",
            "rtt_interval_s",
            "rtt_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for inst in self.instances:
            if inst.latency_profile is not None:
                try:
                    load_latency_profile(inst.latency_profile)
                except ValueError as err:
                    raise ValueError(f"instances.{inst.instance_id}.profile: {err}") from None


_INSTANCE_KEYS = {"id", "url", "kv_events", "gpu", "profile"}


def parse_instance(spec: str) -> InstanceConfig:
    """Parses one `--instance` value (module docstring).

    Raises:
        ValueError: unknown or missing keys, or a URL that is not http(s)://host:port.
    """
    pairs: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ValueError(f"--instance: expected key=value, got {part!r}")
        if key not in _INSTANCE_KEYS:
            raise ValueError(f"--instance: unknown key {key!r} (known: {sorted(_INSTANCE_KEYS)})")
        if key in pairs:
            raise ValueError(f"--instance: duplicate key {key!r}")
        pairs[key] = value.strip()
    for key in ("id", "url"):
        if key not in pairs:
            raise ValueError(f"--instance: missing {key}= in {spec!r}")
    url = pairs["url"].rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--instance: url must be http(s)://host:port, got {url!r}")
    kv = pairs.get("kv_events")
    bind = False
    if kv is not None and kv.startswith("bind:"):
        kv, bind = kv[len("bind:") :], True
    if kv is not None and "://" not in kv:
        raise ValueError(
            f"--instance: kv_events must be a ZMQ endpoint like tcp://host:port, got {kv!r}"
        )
    return InstanceConfig(
        instance_id=pairs["id"],
        url=url,
        kv_events=kv,
        kv_events_bind=bind,
        gpu_type=pairs.get("gpu"),
        latency_profile=pairs.get("profile"),
    )


def parse_peer(spec: str) -> PeerConfig:
    """Parses one `--peer REGION=HOST:PORT` value.

    Raises:
        ValueError: not REGION=HOST:PORT with a numeric port.
    """
    region, sep, address = spec.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not region or not colon or not host or not port.isdigit():
        raise ValueError(f"--peer: expected REGION=HOST:PORT, got {spec!r}")
    return PeerConfig(region=region.strip(), address=address.strip())
