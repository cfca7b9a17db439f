"""The local multi-region mesh: start, watch and stop every process of a topology on one machine.

`Mesh` starts, in this order:

1. nats-server with JetStream and a Redis (valkey) server (`slomesh.procs`);
2. per instance of the topology, a vLLM emulator (``python -m slomesh.emulator``) on a free HTTP
   port publishing KV events on a free ZMQ port, with an ExampleConnector-like KV store in
   ``RUN_DIR/kv/<instance id>`` (``--kv-store-path``: the prefixes it serves are saved there,
   and a prefix moved there is loaded instead of computed);
3. per region, a KV transfer service (``python -m services.kv_transfer``) with its instances'
   stores (store id = instance id), as ``--peer`` the relay to each peer region's transfer
   service, and publishing its link statistics on NATS;
4. one WAN relay process (``python -m slomesh.wan_relay``) holding, for every ordered pair of
   regions, a relay origin -> target region's agent and one origin -> target region's KV
   transfer service, each delaying both directions by half the measured RTT between the two
   regions' `location`s (`Topology.rtt_ms`), so a round trip through it takes the RTT. The
   transfer services' relays also cap the bandwidth at the topology's capacity of the link
   (`Topology.link_capacity_bytes_per_s`, the direction the KV flows: target -> origin) times
   the KV store scale (`Mesh`'s ``kv_store_scale``): the emulators' KV files are that fraction
   of the real KV, so a move takes the time the real bytes would take on the link;
5. per region, a region agent (``python -m services.region_agent``) with its instances, and as
   ``--peer`` the relay from its region to each peer region (so its RTT probes cross the
   emulated WAN);
6. the global scheduler (``python -m services.global_scheduler``), acting as every region's
   replica, with ``--routes-json`` naming, per origin region, the address of each serving
   region's agent: the agent itself for the origin's own region, the relay otherwise. A request
   placed away from its origin therefore pays the RTT on its way there and back. Its
   ``--kv-transfer-routes-json`` names the KV transfer services the same way (own region:
   the service itself; others: the relay), where the prefix moves of placements start.

It then waits until every service is healthy (HTTP ``/health`` of emulators, gRPC health of
agents, KV transfer services and the scheduler, TCP of the relays), every agent reports all
its instances healthy, and the scheduler can place a probe from every origin region; writes
``RUN_DIR/mesh.json`` (endpoints, pids, command lines, the scheduler address, the topology
path, the KV transfer routes) and logs every service to ``RUN_DIR/logs/<service>.log``. Every
child runs in its own process group and is stopped with SIGTERM, then SIGKILL after a timeout.

`slomesh up --detach` runs the mesh under a supervisor process in the background (its pid and
all children's are in mesh.json) for `slomesh down` to stop.

`compose_from_topology` describes the same mesh as a docker-compose file (``docker-compose.yml``
at the repository root is its output for the default topology).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from slomesh.procs import NatsServerProcess, RedisServerProcess, free_ports
from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology
from slomesh.transfer.stores import KvStoreConfig

logger = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path(".slomesh") / "run"
MESH_FILE = "mesh.json"
EMULATOR_BLOCK_SIZE = 16
"""KV block size of the mesh's emulators, tokens (vLLM's default on GPUs)."""
DEFAULT_KV_STORE_SCALE = 1 / 256
"""Size of the local mesh's emulated KV files relative to the real KV (512 bytes per token of
Llama-3.1-8B instead of 128 KiB): every prompt an emulator serves is saved, so full-size files
would fill the disk in one benchmark run. The transfer services' relays carry the link
capacity times this, so a move still takes the real KV's time on the link. The services' own
link schedulers keep the real capacity (what they publish, and what the scheduler's
predictions divide real KV bytes by); the relay is the bottleneck, and the foreground use they
publish counts the scaled bytes, so their spare bandwidth reads high while moves run."""
STOP_TIMEOUT_S = 10.0
"""Seconds a child gets to exit after SIGTERM before SIGKILL."""


class MeshError(RuntimeError):
    """The mesh could not be started (a service died or did not become ready)."""


# --------------------------------------------------------------------------------------------
# Health checks


def check_http_health(url: str, timeout_s: float = 1.0) -> bool:
    """True when GET `url` answers 2xx within `timeout_s`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_grpc_health(address: str, service: str = "", timeout_s: float = 1.0) -> bool:
    """True when the gRPC health service at `address` reports `service` SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def check_tcp(address: str, timeout_s: float = 0.5) -> bool:
    """True when a TCP connection to "host:port" succeeds."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Plan: ports, commands, routes


@dataclass
class InstancePlan:
    """Where one emulated instance listens."""

    id: str
    region: str
    gpu_type: str
    http_port: int
    kv_events_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def kv_events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_events_port}"


RELAY_AGENT = "agent"
RELAY_KV_TRANSFER = "kv-transfer"


@dataclass
class RelayPlan:
    """One emulated WAN link: origin region -> a service of the target region.

    ``service`` is the target region's service it reaches: `RELAY_AGENT` (the region agent) or
    `RELAY_KV_TRANSFER` (the KV transfer service). ``bandwidth_bytes_per_s`` caps the link per
    direction (shared by every connection through it; `slomesh.wan_relay`), e.g.
    `Topology.link_capacity_bytes_per_s` for the links between KV transfer services; None =
    uncapped (the agents' control traffic).
    """

    origin: str
    target: str
    listen_port: int
    target_address: str
    one_way_delay_ms: float
    bandwidth_bytes_per_s: float | None = None
    service: str = RELAY_AGENT

    @property
    def name(self) -> str:
        """``origin->target`` (agent), ``origin->target/kv-transfer`` (KV transfer service)."""
        base = f"{self.origin}->{self.target}"
        return base if self.service == RELAY_AGENT else f"{base}/{self.service}"

    @property
    def relay_arg(self) -> str:
        """The ``--relay`` value of `slomesh wan-relay` for this link (`RelaySpec.parse`)."""
        bandwidth = f"={self.bandwidth_bytes_per_s:.12g}" if self.bandwidth_bytes_per_s else ""
        return (
            f"{self.name}@{self.listen_port}={self.target_address}"
            f"={self.one_way_delay_ms:g}{bandwidth}"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"


@dataclass
class MeshPlan:
    """All ports and routes of a local mesh, chosen before anything starts."""

    topology: Topology
    topology_path: Path
    instances: dict[str, InstancePlan]
    agent_ports: dict[str, int]
    agent_metrics_ports: dict[str, int]
    relays: list[RelayPlan]
    relay_metrics_port: int
    scheduler_port: int
    scheduler_metrics_port: int
    nats_port: int
    redis_port: int
    kv_transfer_ports: dict[str, int] = field(default_factory=dict)
    kv_transfer_metrics_ports: dict[str, int] = field(default_factory=dict)
    kv_store_scale: float = 1.0

    @classmethod
    def build(
        cls, topology: Topology, topology_path: Path, kv_store_scale: float = 1.0
    ) -> MeshPlan:
        """Picks distinct free loopback ports for every service of `topology`.

        Args:
            topology: the mesh.
            topology_path: its file.
            kv_store_scale: size of the emulators' KV files relative to the real KV, in (0, 1];
                the transfer services' relays carry the link capacity times it.

        Raises:
            ValueError: `kv_store_scale` out of range.
        """
        if not 0 < kv_store_scale <= 1:
            raise ValueError(f"kv_store_scale must be in (0, 1], got {kv_store_scale}")
        regions = topology.regions
        specs = [(region, inst) for region in regions for inst in region.instances]
        pairs = [(o, t) for o in regions for t in regions if o.name != t.name]
        ports = iter(free_ports(2 * len(specs) + 4 * len(regions) + 2 * len(pairs) + 5))
        instances = {
            inst.id: InstancePlan(inst.id, region.name, inst.gpu_type, next(ports), next(ports))
            for region, inst in specs
        }
        agent_ports = {r.name: next(ports) for r in regions}
        kv_transfer_ports = {r.name: next(ports) for r in regions}
        relays = [
            RelayPlan(
                origin=o.name,
                target=t.name,
                listen_port=next(ports),
                target_address=f"127.0.0.1:{agent_ports[t.name]}",
                one_way_delay_ms=topology.rtt_ms(o.name, t.name) / 2.0,
            )
            for o, t in pairs
        ]
        relays += [
            RelayPlan(
                origin=o.name,
                target=t.name,
                listen_port=next(ports),
                target_address=f"127.0.0.1:{kv_transfer_ports[t.name]}",
                one_way_delay_ms=topology.rtt_ms(o.name, t.name) / 2.0,
                # The origin's service pulls from the target's: KV flows target -> origin.
                bandwidth_bytes_per_s=topology.link_capacity_bytes_per_s(t.name, o.name)
                * kv_store_scale,
                service=RELAY_KV_TRANSFER,
            )
            for o, t in pairs
        ]
        return cls(
            topology=topology,
            topology_path=topology_path,
            instances=instances,
            agent_ports=agent_ports,
            agent_metrics_ports={r.name: next(ports) for r in regions},
            relays=relays,
            relay_metrics_port=next(ports),
            scheduler_port=next(ports),
            scheduler_metrics_port=next(ports),
            nats_port=next(ports),
            redis_port=next(ports),
            kv_transfer_ports=kv_transfer_ports,
            kv_transfer_metrics_ports={r.name: next(ports) for r in regions},
            kv_store_scale=kv_store_scale,
        )

    def agent_address(self, region: str) -> str:
        return f"127.0.0.1:{self.agent_ports[region]}"

    def kv_transfer_address(self, region: str) -> str:
        return f"127.0.0.1:{self.kv_transfer_ports[region]}"

    def relay(self, origin: str, target: str, service: str = RELAY_AGENT) -> RelayPlan:
        """The relay origin -> `service` of target. Raises KeyError when there is none."""
        for r in self.relays:
            if r.origin == origin and r.target == target and r.service == service:
                return r
        raise KeyError(f"no relay {origin}->{target} ({service})")

    def routes(self) -> dict[str, dict[str, str]]:
        """{origin: {serving region: agent address as reached from origin}} (--routes-json)."""
        return routes_for(
            self.topology, self.agent_address, lambda o, t: self.relay(o, t).address
        )

    def kv_transfer_routes(self) -> dict[str, dict[str, str]]:
        """{origin: {region: KV transfer service address as reached from origin}}
        (the scheduler's --kv-transfer-routes-json)."""
        return routes_for(
            self.topology,
            self.kv_transfer_address,
            lambda o, t: self.relay(o, t, RELAY_KV_TRANSFER).address,
        )


def routes_for(
    topology: Topology,
    agent_address: Callable[[str], str],
    relay_address: Callable[[str, str], str],
) -> dict[str, dict[str, str]]:
    """Routes table: own region = the service itself (`agent_address`, an agent or a KV
    transfer service), other regions = the relay origin->target."""
    names = topology.region_names
    return {
        o: {t: agent_address(t) if o == t else relay_address(o, t) for t in names} for o in names
    }


def emulator_kv_store_config(
    topology: Topology, instance_id: str, path: str | Path
) -> KvStoreConfig:
    """The KV transfer service's ``--kv-store`` of the emulator `instance_id` whose
    ``--kv-store-path`` is `path` (store id = instance id; `EMULATOR_BLOCK_SIZE`)."""
    from slomesh.engine.profiles import MODELS

    model = topology.instance_model(instance_id).name
    spec = MODELS.get(model)
    return KvStoreConfig(
        id=instance_id,
        kind="emulator",
        path=Path(path),
        model=model,
        block_size=EMULATOR_BLOCK_SIZE,
        num_layers=spec.num_layers if spec is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Child processes


@dataclass
class ChildProcess:
    """A service process of the mesh (own process group, output to a log file)."""

    name: str
    kind: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    endpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_matches(pid: int, cmd: Sequence[str]) -> bool:
    """True when process `pid` runs `cmd` (guards against pid reuse before killing)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    if not cmd:
        return True
    return argv[: min(3, len(cmd))] == list(cmd[: min(3, len(cmd))])


def stop_pids(entries: Sequence[tuple[int, Sequence[str]]], timeout_s: float = STOP_TIMEOUT_S):
    """SIGTERMs the process groups of `entries` (pid, cmd), then SIGKILLs what remains.

    Only processes whose command line still matches `cmd` are signalled (pid reuse guard).

    Returns:
        The pids that were still alive after SIGKILL (empty on success).
    """
    targets = [pid for pid, cmd in entries if pid_alive(pid) and _pid_matches(pid, cmd)]
    for pid in targets:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
        time.sleep(0.05)
    for pid in targets:
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
        time.sleep(0.05)
    return [p for p in targets if pid_alive(p)]


# --------------------------------------------------------------------------------------------
# The mesh


class Mesh:
    """A local multi-region mesh (see the module docstring). Use as a context manager.

    Args:
        topology_path: topology YAML; None = `configs/topology.default.yaml`.
        run_dir: directory for mesh.json, routes.json, logs/ and the NATS store.
        spans_out: JSON-lines span file every service appends to (env SLOMESH_SPANS_OUT).
        policy: placement policy name for the scheduler (None = its default).
        slo_config: SLO classes YAML for the scheduler (None = built-in classes).
        log_level: log level of every service.
        startup_timeout_s: how long `start()` waits for the mesh to become ready.
        python: interpreter for the services.
        extra_args: per service kind ("emulator", "agent", "kv-transfer", "scheduler",
            "wan-relay") extra command-line arguments.
        nats_url: an already running NATS to use instead of starting one.
        redis_url: an already running Redis to use instead of starting one.
        kv_store_scale: size of the emulators' KV files (``RUN_DIR/kv/<instance>``) relative
            to the real KV, in (0, 1] (`DEFAULT_KV_STORE_SCALE`).

    Attributes:
        scheduler_address: "host:port" of the global scheduler (after `start()`).
        regions: region names of the topology.
    """

    def __init__(
        self,
        topology_path: str | Path | None = None,
        run_dir: str | Path = DEFAULT_RUN_DIR,
        spans_out: str | Path | None = None,
        *,
        policy: str | None = None,
        slo_config: str | Path | None = None,
        log_level: str = "INFO",
        startup_timeout_s: float = 180.0,
        python: str = sys.executable,
        extra_args: dict[str, list[str]] | None = None,
        nats_url: str | None = None,
        redis_url: str | None = None,
        kv_store_scale: float = DEFAULT_KV_STORE_SCALE,
    ):
        if not 0 < kv_store_scale <= 1:
            raise ValueError(f"kv_store_scale must be in (0, 1], got {kv_store_scale}")
        self.kv_store_scale = kv_store_scale
        self.topology_path = Path(topology_path or DEFAULT_TOPOLOGY_PATH).resolve()
        self.topology = Topology.load(self.topology_path)
        self.run_dir = Path(run_dir).resolve()
        self.spans_out = str(Path(spans_out).resolve()) if spans_out else None
        self.policy = policy
        self.slo_config = str(Path(slo_config).resolve()) if slo_config else None
        self.log_level = log_level
        self.startup_timeout_s = startup_timeout_s
        self.python = python
        self.extra_args = extra_args or {}
        self.plan: MeshPlan | None = None
        self.nats: NatsServerProcess | None = None
        self.redis: RedisServerProcess | None = None
        self._external_nats_url = nats_url
        self._external_redis_url = redis_url
        self.children: list[ChildProcess] = []
        self._infra: dict[str, dict[str, Any]] = {}
        self.started_at_unix_s: float | None = None
        self._stopped = False

    # -- public -------------------------------------------------------------------------------

    @property
    def regions(self) -> list[str]:
        return self.topology.region_names

    @property
    def scheduler_address(self) -> str:
        if self.plan is None:
            raise RuntimeError("mesh not started")
        return f"127.0.0.1:{self.plan.scheduler_port}"

    @property
    def nats_url(self) -> str:
        """URL of the mesh's NATS (the external one, or the one it started; "" before)."""
        return self._external_nats_url or (self.nats.url if self.nats else "")

    @property
    def redis_url(self) -> str:
        """URL of the mesh's Redis (the external one, or the one it started; "" before)."""
        return self._external_redis_url or (self.redis.url if self.redis else "")

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    def kv_store_dir(self, instance_id: str) -> Path:
        """The emulator `instance_id`'s KV store directory."""
        return self.run_dir / "kv" / instance_id

    @property
    def mesh_file(self) -> Path:
        return self.run_dir / MESH_FILE

    def start(self) -> Mesh:
        """Starts every process and blocks until the mesh is ready.

        Raises:
            MeshError: a service exited or did not become ready in time (everything started
                so far is stopped again; the message holds the tail of its log).
        """
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if mesh_running(self.run_dir):
            raise MeshError(f"a mesh already runs in {self.run_dir} (slomesh down first)")
        self.mesh_file.unlink(missing_ok=True)
        if self.spans_out:
            Path(self.spans_out).parent.mkdir(parents=True, exist_ok=True)
        self._stopped = False
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        self.started_at_unix_s = time.time()
        self.write_mesh_file("ready")
        logger.info(
            "mesh ready",
            extra={"startup_s": round(time.monotonic() - t0, 2), "run_dir": str(self.run_dir)},
        )
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stops every process (scheduler first, NATS last). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        order = ["scheduler", "agent", "kv-transfer", "wan-relay", "emulator"]
        for kind in order:
            group = [c for c in self.children if c.kind == kind and c.popen is not None]
            for child in group:
                if child.alive():
                    _signal_group(child.popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for child in group:
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    child.popen.wait(timeout=remaining)
                except subprocess.TimeoutExpired:
                    logger.warning("killing service", extra={"service": child.name})
                    _signal_group(child.popen.pid, signal.SIGKILL)
                    child.popen.wait()
                # Children of the service (if any) share its process group.
                _signal_group(child.popen.pid, signal.SIGKILL)
        for server in (self.redis, self.nats):
            if server is not None:
                server.stop(timeout_s)
        if self.plan is not None and self.mesh_file.exists():
            with contextlib.suppress(OSError, ValueError):
                self.write_mesh_file("stopped")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dead_children(self) -> list[ChildProcess]:
        """Services that have exited."""
        return [c for c in self.children if c.popen is not None and not c.alive()]

    def info(self, status: str) -> dict[str, Any]:
        """What mesh.json holds (see the module docstring)."""
        plan = self.plan
        assert plan is not None
        processes = list(self._infra.values())
        for c in self.children:
            if c.pid is not None:
                processes.append(
                    {"name": c.name, "kind": c.kind, "pid": c.pid, "cmd": c.cmd,
                     "log": str(c.log_path), "endpoint": c.endpoint}
                )
        return {
            "status": status,
            "supervisor_pid": os.getpid(),
            "supervisor_cmd": _own_cmdline(),
            "run_dir": str(self.run_dir),
            "topology": str(self.topology_path),
            "scheduler_address": self.scheduler_address,
            "scheduler_metrics": f"http://127.0.0.1:{plan.scheduler_metrics_port}/metrics",
            "nats_url": self.nats_url,
            "redis_url": self.redis_url,
            "spans_out": self.spans_out,
            "started_at_unix_s": self.started_at_unix_s,
            "regions": {
                r.name: {
                    "location": r.location,
                    "agent": plan.agent_address(r.name),
                    "agent_metrics": f"http://127.0.0.1:{plan.agent_metrics_ports[r.name]}/metrics",
                    "kv_transfer": plan.kv_transfer_address(r.name),
                    "kv_transfer_metrics": (
                        f"http://127.0.0.1:{plan.kv_transfer_metrics_ports[r.name]}/metrics"
                    ),
                    "instances": {
                        i.id: {
                            "gpu_type": i.gpu_type,
                            "url": plan.instances[i.id].url,
                            "kv_events": plan.instances[i.id].kv_events_endpoint,
                            "kv_store": str(self.kv_store_dir(i.id)),
                        }
                        for i in r.instances
                    },
                }
                for r in self.topology.regions
            },
            "relays": [
                {"origin": x.origin, "target": x.target, "service": x.service,
                 "listen": x.address, "target_address": x.target_address,
                 "one_way_delay_ms": x.one_way_delay_ms,
                 "bandwidth_bytes_per_s": x.bandwidth_bytes_per_s}
                for x in plan.relays
            ],
            "routes": plan.routes(),
            "kv_transfer_routes": plan.kv_transfer_routes(),
            "kv_store_scale": self.kv_store_scale,
            "processes": processes,
        }

    def write_mesh_file(self, status: str) -> None:
        tmp = self.mesh_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.info(status), indent=2))
        tmp.replace(self.mesh_file)

    # -- internals ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.spans_out:
            env["SLOMESH_SPANS_OUT"] = self.spans_out
        # Services are started from the checkout, wherever the CWD is.
        repo_root = str(DEFAULT_TOPOLOGY_PATH.parents[1])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, env.get("PYTHONPATH", "")) if p
        )
        return env

    def _child(self, name: str, kind: str, module: str, args: list[str], endpoint: str) -> ChildProcess:
        cmd = [self.python, "-m", module, *args, *self.extra_args.get(kind, [])]
        child = ChildProcess(name, kind, cmd, self.logs_dir / f"{name}.log", endpoint=endpoint)
        self.children.append(child)
        return child

    def _start_all(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        topo = self.topology
        self.plan = plan = MeshPlan.build(topo, self.topology_path, self.kv_store_scale)
        env = self._env()

        if not self._external_nats_url:
            self.nats = NatsServerProcess(
                port=plan.nats_port,
                jetstream=True,
                store_dir=str(self.run_dir / "nats-store"),
                log_path=str(self.logs_dir / "nats.log"),
            )
        if not self._external_redis_url:
            self.redis = RedisServerProcess(
                port=plan.redis_port, log_path=str(self.logs_dir / "redis.log")
            )
        for name, server in (("nats", self.nats), ("redis", self.redis)):
            if server is None:
                continue
            server.start()
            self._infra[name] = {
                "name": name, "kind": name, "pid": server.pid, "cmd": _cmdline(server.pid),
                "log": str(self.logs_dir / f"{name}.log"),
                "endpoint": server.url,
            }

        for inst in plan.instances.values():
            model = topo.instance_model(inst.id)
            self._child(
                f"emulator-{inst.id}",
                "emulator",
                "slomesh.emulator",
                [
                    "--port", str(inst.http_port),
                    "--gpu-type", inst.gpu_type,
                    "--instance-id", inst.id,
                    "--kv-events-endpoint", inst.kv_events_endpoint,
                    "--model", model.name,
                    "--served-model-name", model.name,
                    "--max-model-len", str(self._max_model_len(inst.id)),
                    "--stream-interval", str(model.stream_interval),
                    "--block-size", str(EMULATOR_BLOCK_SIZE),
                    "--kv-store-path", str(self.kv_store_dir(inst.id)),
                    "--kv-store-scale", f"{self.kv_store_scale:.12g}",
                ],
                inst.url,
            ).start(env)

        for region in topo.regions:
            args = [
                "--region", region.name,
                "--port", str(plan.kv_transfer_ports[region.name]),
                "--metrics-port", str(plan.kv_transfer_metrics_ports[region.name]),
                "--nats-url", self.nats_url,
            ]
            for peer in topo.regions:
                if peer.name == region.name:
                    continue
                relay = plan.relay(region.name, peer.name, RELAY_KV_TRANSFER)
                capacity = topo.link_capacity_bytes_per_s(region.name, peer.name)
                args += ["--peer", f"{peer.name}={relay.address}",
                         "--link", f"{peer.name}={capacity:.12g}"]
            for inst in region.instances:
                store = emulator_kv_store_config(topo, inst.id, self.kv_store_dir(inst.id))
                args += ["--kv-store", store.model_dump_json()]
            if self.spans_out:
                args += ["--spans-out", self.spans_out]
            self._child(
                f"kv-transfer-{region.name}", "kv-transfer", "services.kv_transfer", args,
                plan.kv_transfer_address(region.name),
            ).start(env)

        if plan.relays:  # none in a mesh of one region
            relay_args: list[str] = ["--metrics-port", str(plan.relay_metrics_port)]
            for r in plan.relays:
                relay_args += ["--relay", r.relay_arg]
            self._child("wan-relay", "wan-relay", "slomesh.wan_relay", relay_args, "").start(env)

        self._wait(
            "emulators",
            [c for c in self.children if c.kind == "emulator"],
            lambda c: check_http_health(f"{c.endpoint}/health"),
            deadline,
        )

        for region in topo.regions:
            args = [
                "--region", region.name,
                "--topology", str(self.topology_path),
                "--port", str(plan.agent_ports[region.name]),
                "--nats-url", self.nats_url,
                "--advertise", plan.agent_address(region.name),
                "--metrics-port", str(plan.agent_metrics_ports[region.name]),
            ]
            for inst in region.instances:
                p = plan.instances[inst.id]
                args += [
                    "--instance",
                    f"id={p.id},url={p.url},kv_events={p.kv_events_endpoint},gpu={p.gpu_type}",
                ]
            for peer in topo.regions:
                if peer.name != region.name:
                    args += ["--peer", f"{peer.name}={plan.relay(region.name, peer.name).address}"]
            if self.spans_out:
                args += ["--spans-out", self.spans_out]
            self._child(
                f"agent-{region.name}", "agent", "services.region_agent", args,
                plan.agent_address(region.name),
            ).start(env)

        routes_path = self.run_dir / "routes.json"
        routes_path.write_text(json.dumps(plan.routes(), indent=2))
        kv_routes_path = self.run_dir / "kv_transfer_routes.json"
        kv_routes_path.write_text(json.dumps(plan.kv_transfer_routes(), indent=2))
        sched_args = [
            "--port", str(plan.scheduler_port),
            "--nats-url", self.nats_url,
            "--redis-url", self.redis_url,
            "--topology", str(self.topology_path),
            "--routes-json", str(routes_path),
            "--kv-transfer-routes-json", str(kv_routes_path),
            "--metrics-port", str(plan.scheduler_metrics_port),
        ]
        if self.policy:
            sched_args += ["--policy", self.policy]
        if self.slo_config:
            sched_args += ["--slo-config", self.slo_config]
        if self.spans_out:
            sched_args += ["--spans-out", self.spans_out]
        self._child(
            "scheduler", "scheduler", "services.global_scheduler", sched_args,
            f"127.0.0.1:{plan.scheduler_port}",
        ).start(env)

        self._wait(
            "WAN relays",
            [c for c in self.children if c.kind == "wan-relay"],
            lambda c: all(check_tcp(r.address) for r in plan.relays),
            deadline,
        )
        self._wait(
            "region agents",
            [c for c in self.children if c.kind == "agent"],
            lambda c: check_grpc_health(c.endpoint),
            deadline,
        )
        self._wait(
            "KV transfer services",
            [c for c in self.children if c.kind == "kv-transfer"],
            lambda c: check_grpc_health(c.endpoint),
            deadline,
        )
        self._wait(
            "scheduler",
            [c for c in self.children if c.kind == "scheduler"],
            lambda c: check_grpc_health(c.endpoint),
            deadline,
        )
        self._wait_agents_report_instances(deadline)
        self._wait_routable(deadline)

    def _max_model_len(self, instance_id: str) -> int:
        return self.topology.instance_max_model_len(instance_id)

    def _check_alive(self) -> None:
        dead = self.dead_children()
        for server in (self.nats, self.redis):
            if server is not None and not server.running:
                raise MeshError(f"{server.name} exited")
        if dead:
            c = dead[0]
            raise MeshError(
                f"{c.name} exited with code {c.popen.returncode} during start-up; "
                f"log {c.log_path}:\n{c.log_tail()}"
            )

    def _wait(
        self,
        what: str,
        children: list[ChildProcess],
        ready: Callable[[ChildProcess], bool],
        deadline: float,
    ) -> None:
        pending = list(children)
        while pending:
            self._check_alive()
            pending = [c for c in pending if not ready(c)]
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                tails = "\n".join(f"--- {c.name}:\n{c.log_tail(10)}" for c in pending)
                raise MeshError(f"{what} not ready in time: {names}\n{tails}")
            time.sleep(0.2)
        logger.info(f"{what} ready", extra={"services": [c.name for c in children]})

    def _wait_agents_report_instances(self, deadline: float) -> None:
        """Waits until every agent's GetState lists all its instances healthy."""
        import grpc

        from slomesh.v1 import region_agent_pb2, region_agent_pb2_grpc

        plan = self.plan
        assert plan is not None
        pending = {r.name: {i.id for i in r.instances} for r in self.topology.regions}
        last: dict[str, str] = {}
        while pending:
            self._check_alive()
            for region in list(pending):
                try:
                    with grpc.insecure_channel(plan.agent_address(region)) as ch:
                        state = region_agent_pb2_grpc.RegionAgentStub(ch).GetState(
                            region_agent_pb2.GetStateRequest(), timeout=2.0
                        )
                except grpc.RpcError as exc:
                    last[region] = f"GetState: {exc.code().name}"
                    continue
                healthy = {i.instance_id for i in state.instances if i.healthy}
                if pending[region] <= healthy:
                    del pending[region]
                else:
                    last[region] = f"unhealthy instances {sorted(pending[region] - healthy)}"
            if not pending:
                break
            if time.monotonic() > deadline:
                raise MeshError(f"agents not reporting healthy instances: {last}")
            time.sleep(0.2)

    def _wait_routable(self, deadline: float) -> None:
        """Waits until the scheduler places a probe request from every origin region.

        A probe is a `Place` (decision only, nothing runs) of a 16-token prompt with one
        output token; UNAVAILABLE (no routable region yet), RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED
        and FAILED_PRECONDITION are retried, other errors fail at once.
        """
        import grpc

        from slomesh.v1 import scheduler_pb2, scheduler_pb2_grpc

        retry_codes = {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.FAILED_PRECONDITION,
        }
        pending = list(self.regions)
        last = ""
        n = 0
        with grpc.insecure_channel(self.scheduler_address) as ch:
            stub = scheduler_pb2_grpc.GlobalSchedulerStub(ch)
            while pending:
                self._check_alive()
                origin = pending[0]
                n += 1
                try:
                    placement = stub.Place(
                        scheduler_pb2.GenerateRequest(
                            request_id=f"mesh-probe-{origin}-{n}",
                            model=self.topology.model.name,
                            prompt_token_ids=list(range(3, 19)),
                            max_tokens=1,
                            ignore_eos=True,
                            origin_region=origin,
                        ),
                        timeout=5.0,
                    )
                    logger.info(
                        "scheduler probe placed",
                        extra={"origin": origin, "region": placement.region,
                               "instance": placement.instance_id},
                    )
                    pending.pop(0)
                    continue
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                    if exc.code() not in retry_codes:
                        raise MeshError(f"scheduler refused the probe from {origin}: {last}")
                if time.monotonic() > deadline:
                    raise MeshError(f"scheduler cannot place from {origin}: {last}")
                time.sleep(0.3)


def _cmdline(pid: int) -> list[str]:
    """argv of process `pid` from /proc ([] when unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _own_cmdline() -> list[str]:
    return _cmdline(os.getpid()) or [sys.executable, *sys.argv]


# --------------------------------------------------------------------------------------------
# up / down


def read_mesh_file(run_dir: str | Path = DEFAULT_RUN_DIR) -> dict[str, Any]:
    """The mesh.json of a run directory.

    Raises:
        FileNotFoundError: no mesh.json in `run_dir`.
    """
    path = Path(run_dir) / MESH_FILE
    return json.loads(path.read_text())


def mesh_running(run_dir: str | Path) -> bool:
    """True when `run_dir` holds a ready mesh whose supervisor process is alive."""
    try:
        info = read_mesh_file(run_dir)
        sup = int(info.get("supervisor_pid") or 0)
    except (OSError, ValueError):
        return False
    return (
        info.get("status") == "ready"
        and sup != os.getpid()
        and pid_alive(sup)
        and _pid_matches(sup, info.get("supervisor_cmd") or [])
    )


def print_summary(info: dict[str, Any], console: Any = None) -> None:
    """Prints the endpoints of a running mesh as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"slomesh local mesh — {info['run_dir']}")
    for col in ("service", "endpoint", "pid"):
        table.add_column(col)
    pids = {p["name"]: p["pid"] for p in info["processes"]}
    table.add_row("scheduler", info["scheduler_address"], str(pids.get("scheduler", "")))
    table.add_row("nats", info["nats_url"], str(pids.get("nats", "")))
    table.add_row("redis", info["redis_url"], str(pids.get("redis", "")))
    for region, r in info["regions"].items():
        table.add_row(f"agent {region}", r["agent"], str(pids.get(f"agent-{region}", "")))
        table.add_row(f"kv-transfer {region}", r["kv_transfer"],
                      str(pids.get(f"kv-transfer-{region}", "")))
        for iid, inst in r["instances"].items():
            table.add_row(
                f"  emulator {iid} ({inst['gpu_type']})", inst["url"],
                str(pids.get(f"emulator-{iid}", "")),
            )
    table.add_row("wan-relay", f"{len(info['relays'])} links", str(pids.get("wan-relay", "")))
    console.print(table)
    links = Table(title="emulated WAN links (one-way delay = RTT / 2)")
    for col in ("origin", "target", "service", "relay", "one-way ms", "bytes/s"):
        links.add_column(col)
    for r in info["relays"]:
        bandwidth = r.get("bandwidth_bytes_per_s")
        links.add_row(r["origin"], r["target"], r.get("service", RELAY_AGENT), r["listen"],
                      f"{r['one_way_delay_ms']:g}", f"{bandwidth:.3g}" if bandwidth else "-")
    console.print(links)


def run_foreground(mesh: Mesh, on_ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Starts `mesh`, then blocks until SIGINT/SIGTERM and stops it. Returns an exit code."""
    stop = threading.Event()
    previous = {}

    def _handler(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _handler)
    try:
        try:
            mesh.start()
        except MeshError as exc:
            print(f"slomesh up: {exc}", file=sys.stderr)
            return 1
        if stop.is_set():
            return 0
        if on_ready is not None:
            on_ready(mesh.info("ready"))
        warned: set[str] = set()
        while not stop.wait(0.5):
            for child in mesh.dead_children():
                if child.name not in warned:
                    warned.add(child.name)
                    logger.error(
                        "service exited",
                        extra={"service": child.name, "code": child.popen.returncode,
                               "log": str(child.log_path)},
                    )
        return 0
    finally:
        mesh.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def up(args: argparse.Namespace) -> int:
    """`slomesh up`: start the mesh (foreground, or detached under a supervisor)."""
    from rich.console import Console

    run_dir = Path(args.run_dir).resolve()
    if args.detach:
        return _up_detached(args, run_dir)
    console = Console(stderr=True)
    mesh = Mesh(
        args.topology, run_dir, args.spans_out, policy=args.policy,
        slo_config=args.slo_config, log_level=args.log_level,
        startup_timeout_s=args.startup_timeout_s, nats_url=args.nats_url,
        redis_url=args.redis_url,
    )

    def ready(info: dict[str, Any]) -> None:
        print_summary(info, console)
        if not args.quiet:
            console.print("[bold green]mesh ready[/] — Ctrl-C (or `slomesh down`) stops it")

    return run_foreground(mesh, ready)


def _up_detached(args: argparse.Namespace, run_dir: Path) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh_file = run_dir / MESH_FILE
    if mesh_running(run_dir):
        console.print(f"slomesh up: a mesh already runs in {run_dir} (slomesh down first)")
        return 1
    mesh_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "slomesh.cli", "up", "--run-dir", str(run_dir), "--quiet",
           "--log-level", args.log_level, "--startup-timeout-s", str(args.startup_timeout_s)]
    for flag, value in (("--topology", args.topology), ("--spans-out", args.spans_out),
                        ("--policy", args.policy), ("--slo-config", args.slo_config),
                        ("--nats-url", args.nats_url), ("--redis-url", args.redis_url)):
        if value:
            is_path = flag in ("--topology", "--spans-out", "--slo-config")
            cmd += [flag, str(Path(value).resolve()) if is_path else value]
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "logs" / "supervisor.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + args.startup_timeout_s + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            console.print(f"slomesh up: the mesh failed to start; {log_path}:\n{tail}")
            return 1
        if mesh_file.exists():
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(mesh_file.read_text())
                if info.get("status") == "ready":
                    print_summary(info, console)
                    console.print(f"[bold green]mesh running in the background[/] "
                                  f"(supervisor pid {proc.pid}); stop it with "
                                  f"`slomesh down --run-dir {run_dir}`")
                    return 0
        time.sleep(0.3)
    stop_pids([(proc.pid, cmd)])
    console.print("slomesh up: timed out waiting for the mesh")
    return 1


def down(args: argparse.Namespace) -> int:
    """`slomesh down`: stop a detached mesh and everything it started."""
    run_dir = Path(args.run_dir).resolve()
    try:
        info = read_mesh_file(run_dir)
    except FileNotFoundError:
        print(f"slomesh down: no {MESH_FILE} in {run_dir}", file=sys.stderr)
        return 1
    remaining = down_from_info(info, args.timeout_s)
    if remaining:
        print(f"slomesh down: processes still alive: {remaining}", file=sys.stderr)
        return 1
    print(f"slomesh down: stopped the mesh in {run_dir}")
    return 0


def down_from_info(info: dict[str, Any], timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """Stops the supervisor of mesh.json `info` (it stops its children), then any leftover.

    Returns:
        pids still alive afterwards (empty on success).
    """
    sup = int(info.get("supervisor_pid") or 0)
    sup_cmd = info.get("supervisor_cmd") or []
    if sup and sup != os.getpid() and pid_alive(sup) and _pid_matches(sup, sup_cmd):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s * 5 + 10
        while time.monotonic() < deadline and pid_alive(sup):
            time.sleep(0.1)
    entries = [(int(p["pid"]), p.get("cmd") or []) for p in info.get("processes", [])]
    if sup and sup != os.getpid():
        entries.append((sup, sup_cmd))
    return stop_pids(entries, timeout_s)


# --------------------------------------------------------------------------------------------
# docker-compose


COMPOSE_SCHEDULER_PORT = 50050
COMPOSE_AGENT_PORT = 50051
COMPOSE_EMULATOR_PORT = 8000
COMPOSE_KV_EVENTS_PORT = 5557
COMPOSE_METRICS_PORT = 9100
COMPOSE_RELAY_BASE_PORT = 41000
COMPOSE_KV_TRANSFER_PORT = 50052
COMPOSE_KV_TRANSFER_RELAY_BASE_PORT = 41100
COMPOSE_KV_DIR = "/kv"
COMPOSE_IMAGE = "slomesh:local"


def compose_relays(topology: Topology) -> list[RelayPlan]:
    """The WAN relays of the compose deployment, one per ordered region pair, fixed ports."""
    out = []
    port = COMPOSE_RELAY_BASE_PORT
    for o in topology.regions:
        for t in topology.regions:
            if o.name == t.name:
                continue
            out.append(RelayPlan(o.name, t.name, port,
                                 f"agent-{t.name}:{COMPOSE_AGENT_PORT}",
                                 topology.rtt_ms(o.name, t.name) / 2.0))
            port += 1
    return out


def compose_kv_transfer_relays(
    topology: Topology, kv_store_scale: float = DEFAULT_KV_STORE_SCALE
) -> list[RelayPlan]:
    """The relays between the compose deployment's KV transfer services, one per ordered
    region pair (origin -> target's service), fixed ports from 41100, bandwidth as in the
    local mesh (`MeshPlan.build`)."""
    out = []
    port = COMPOSE_KV_TRANSFER_RELAY_BASE_PORT
    for o in topology.regions:
        for t in topology.regions:
            if o.name == t.name:
                continue
            out.append(RelayPlan(
                o.name, t.name, port, f"kv-transfer-{t.name}:{COMPOSE_KV_TRANSFER_PORT}",
                topology.rtt_ms(o.name, t.name) / 2.0,
                topology.link_capacity_bytes_per_s(t.name, o.name) * kv_store_scale,
                RELAY_KV_TRANSFER,
            ))
            port += 1
    return out


def compose_kv_transfer_routes(topology: Topology) -> dict[str, dict[str, str]]:
    """--kv-transfer-routes-json content of the compose deployment."""
    relays = {
        (r.origin, r.target): f"wan-relay:{r.listen_port}"
        for r in compose_kv_transfer_relays(topology)
    }
    return routes_for(
        topology,
        lambda t: f"kv-transfer-{t}:{COMPOSE_KV_TRANSFER_PORT}",
        lambda o, t: relays[(o, t)],
    )


def compose_routes(topology: Topology) -> dict[str, dict[str, str]]:
    """--routes-json content of the compose deployment (relays live in service `wan-relay`)."""
    relays = {(r.origin, r.target): f"wan-relay:{r.listen_port}" for r in compose_relays(topology)}
    return routes_for(
        topology,
        lambda t: f"agent-{t}:{COMPOSE_AGENT_PORT}",
        lambda o, t: relays[(o, t)],
    )


def _slomesh_service(command: list[str], healthcheck: list[str], depends_on: dict) -> dict:
    svc: dict[str, Any] = {
        "image": COMPOSE_IMAGE,
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": command,
        "environment": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "SLOMESH_SHARED_DATA": "/shared/data",
        },
        "volumes": ["../shared/data:/shared/data:ro"],
        "healthcheck": {
            "test": ["CMD", *healthcheck],
            "interval": "5s",
            "timeout": "3s",
            "retries": 12,
            "start_period": "10s",
        },
        "restart": "unless-stopped",
    }
    if depends_on:
        svc["depends_on"] = depends_on
    return svc


def compose_from_topology(
    topology: Topology, topology_file: str = "configs/topology.default.yaml"
) -> dict[str, Any]:
    """The docker-compose description of `topology` (as a dict ready for yaml.safe_dump).

    Services: ``nats`` (JetStream), ``redis`` (valkey), ``otel-collector`` (OTLP in, traces to
    ``jaeger``, Prometheus scrape of every slomesh service), ``jaeger`` (trace viewer, UI on
    16686), ``scheduler`` (gRPC on 50050, published), per region ``agent-<region>`` and
    ``kv-transfer-<region>`` (KV transfer service on 50052, its instances' stores in the
    region's volume ``kv-<region>`` at ``/kv/<instance id>``, shared with the region's
    emulators), per instance ``emulator-<instance id>`` (``--kv-store-path``), and
    ``wan-relay`` hosting one relay per ordered region pair to the target's agent on ports
    41000+ and one to the target's KV transfer service on ports 41100+ (one-way delay RTT/2
    from the RTT matrix; the latter capped like the local mesh's). Shared data (RTT matrix,
    prices) is mounted from ``../shared/data``; the topology file is read inside the image at
    ``/app/<topology_file>``, the routes from ``/app/deploy/routes.compose.json`` and
    ``/app/deploy/kv_transfer_routes.compose.json``.

    Args:
        topology: the mesh.
        topology_file: path of the topology file inside the repository.
    """
    topo_in_image = f"/app/{topology_file}"
    metrics = str(COMPOSE_METRICS_PORT)
    services: dict[str, Any] = {
        "nats": {
            "image": "nats:2.10-alpine",
            "command": ["-js", "-sd", "/data", "-m", "8222"],
            "ports": ["4222:4222"],
            "healthcheck": {
                "test": ["CMD", "wget", "-q", "-O", "-", "http://127.0.0.1:8222/healthz"],
                "interval": "5s", "timeout": "3s", "retries": 12,
            },
            "restart": "unless-stopped",
        },
        "redis": {
            "image": "valkey/valkey:8",
            "command": ["valkey-server", "--save", "", "--appendonly", "no"],
            "ports": ["6379:6379"],
            "healthcheck": {
                "test": ["CMD", "valkey-cli", "ping"],
                "interval": "5s", "timeout": "3s", "retries": 12,
            },
            "restart": "unless-stopped",
        },
        "jaeger": {
            "image": "jaegertracing/all-in-one:1.62.0",
            "environment": {"COLLECTOR_OTLP_ENABLED": "true"},
            "ports": ["16686:16686"],
            "restart": "unless-stopped",
        },
        "otel-collector": {
            "image": "otel/opentelemetry-collector-contrib:0.116.1",
            "command": ["--config=/etc/otelcol/config.yaml"],
            "volumes": ["./deploy/otel-collector.yaml:/etc/otelcol/config.yaml:ro"],
            "ports": ["4317:4317", "8889:8889"],
            "depends_on": {"jaeger": {"condition": "service_started"}},
            "restart": "unless-stopped",
        },
    }
    collector_dep = {"otel-collector": {"condition": "service_started"}}
    for region in topology.regions:
        for inst in region.instances:
            model = topology.instance_model(inst.id)
            services[f"emulator-{inst.id}"] = _slomesh_service(
                [
                    "slomesh", "emulator",
                    "--host", "0.0.0.0",
                    "--port", str(COMPOSE_EMULATOR_PORT),
                    "--gpu-type", inst.gpu_type,
                    "--instance-id", inst.id,
                    "--kv-events-endpoint", f"tcp://*:{COMPOSE_KV_EVENTS_PORT}",
                    "--model", model.name,
                    "--served-model-name", model.name,
                    "--max-model-len", str(topology.instance_max_model_len(inst.id)),
                    "--stream-interval", str(model.stream_interval),
                    "--block-size", str(EMULATOR_BLOCK_SIZE),
                    "--kv-store-path", f"{COMPOSE_KV_DIR}/{inst.id}",
                    "--kv-store-scale", f"{DEFAULT_KV_STORE_SCALE:.12g}",
                ],
                ["slomesh", "health", "--http",
                 f"http://127.0.0.1:{COMPOSE_EMULATOR_PORT}/health"],
                dict(collector_dep),
            )
            services[f"emulator-{inst.id}"]["volumes"].append(
                f"kv-{region.name}:{COMPOSE_KV_DIR}"
            )
    relays = compose_relays(topology)
    kv_relays = compose_kv_transfer_relays(topology)
    for region in topology.regions:
        cmd = [
            "slomesh", "kv-transfer",
            "--region", region.name,
            "--host", "0.0.0.0",
            "--port", str(COMPOSE_KV_TRANSFER_PORT),
            "--nats-url", "nats://nats:4222",
            "--metrics-port", metrics,
        ]
        for r in kv_relays:
            if r.origin == region.name:
                capacity = topology.link_capacity_bytes_per_s(region.name, r.target)
                cmd += ["--peer", f"{r.target}=wan-relay:{r.listen_port}",
                        "--link", f"{r.target}={capacity:.12g}"]
        for inst in region.instances:
            store = emulator_kv_store_config(topology, inst.id, f"{COMPOSE_KV_DIR}/{inst.id}")
            cmd += ["--kv-store", store.model_dump_json()]
        svc = _slomesh_service(
            cmd,
            ["slomesh", "health", "--grpc", f"127.0.0.1:{COMPOSE_KV_TRANSFER_PORT}"],
            {"nats": {"condition": "service_healthy"}, **collector_dep},
        )
        svc["volumes"].append(f"kv-{region.name}:{COMPOSE_KV_DIR}")
        services[f"kv-transfer-{region.name}"] = svc
    for region in topology.regions:
        cmd = [
            "slomesh", "agent",
            "--region", region.name,
            "--topology", topo_in_image,
            "--host", "0.0.0.0",
            "--port", str(COMPOSE_AGENT_PORT),
            "--nats-url", "nats://nats:4222",
            "--advertise", f"agent-{region.name}:{COMPOSE_AGENT_PORT}",
            "--metrics-port", metrics,
        ]
        deps: dict[str, Any] = {"nats": {"condition": "service_healthy"}, **collector_dep}
        for inst in region.instances:
            host = f"emulator-{inst.id}"
            cmd += [
                "--instance",
                (
                    f"id={inst.id},url=http://{host}:{COMPOSE_EMULATOR_PORT},"
                    f"kv_events=tcp://{host}:{COMPOSE_KV_EVENTS_PORT},gpu={inst.gpu_type}"
                ),
            ]
            deps[host] = {"condition": "service_healthy"}
        for r in relays:
            if r.origin == region.name:
                cmd += ["--peer", f"{r.target}=wan-relay:{r.listen_port}"]
        services[f"agent-{region.name}"] = _slomesh_service(
            cmd,
            ["slomesh", "health", "--grpc", f"127.0.0.1:{COMPOSE_AGENT_PORT}"],
            deps,
        )
    relay_cmd = ["slomesh", "wan-relay", "--listen-host", "0.0.0.0", "--metrics-port", metrics]
    for r in [*relays, *kv_relays]:
        relay_cmd += ["--relay", r.relay_arg]
    services["wan-relay"] = _slomesh_service(
        relay_cmd,
        ["slomesh", "health", "--tcp", f"127.0.0.1:{relays[0].listen_port}"]
        if relays else ["slomesh", "health", "--http", f"http://127.0.0.1:{metrics}/metrics"],
        {
            f"{kind}-{r.name}": {"condition": "service_started"}
            for kind in ("agent", "kv-transfer")
            for r in topology.regions
        },
    )
    sched_deps = {
        "nats": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "wan-relay": {"condition": "service_healthy"},
        **{
            f"{kind}-{r.name}": {"condition": "service_healthy"}
            for kind in ("agent", "kv-transfer")
            for r in topology.regions
        },
    }
    sched = _slomesh_service(
        [
            "slomesh", "scheduler",
            "--host", "0.0.0.0",
            "--port", str(COMPOSE_SCHEDULER_PORT),
            "--nats-url", "nats://nats:4222",
            "--redis-url", "redis://redis:6379/0",
            "--topology", topo_in_image,
            "--routes-json", "/app/deploy/routes.compose.json",
            "--kv-transfer-routes-json", "/app/deploy/kv_transfer_routes.compose.json",
            "--metrics-port", metrics,
        ],
        ["slomesh", "health", "--grpc", f"127.0.0.1:{COMPOSE_SCHEDULER_PORT}"],
        sched_deps,
    )
    sched["ports"] = [f"{COMPOSE_SCHEDULER_PORT}:{COMPOSE_SCHEDULER_PORT}"]
    services["scheduler"] = sched
    return {
        "name": "slomesh",
        "services": services,
        "volumes": {f"kv-{r.name}": {} for r in topology.regions},
    }


def collector_config_from_topology(topology: Topology) -> dict[str, Any]:
    """OpenTelemetry collector config for the compose deployment.

    Traces: OTLP/gRPC in on 4317, batched, out to ``jaeger:4317``. Metrics: the collector
    scrapes every slomesh service's Prometheus endpoint and re-exposes them on 8889.
    """
    slomesh_services = [
        name for name, svc in compose_from_topology(topology)["services"].items()
        if svc.get("image") == COMPOSE_IMAGE and not name.startswith("emulator-")
    ]
    emulators = [f"emulator-{i.id}" for r in topology.regions for i in r.instances]
    return {
        "receivers": {
            "otlp": {"protocols": {"grpc": {"endpoint": "0.0.0.0:4317"}}},
            "prometheus": {
                "config": {
                    "scrape_configs": [
                        {
                            "job_name": "slomesh",
                            "scrape_interval": "5s",
                            "static_configs": [
                                {"targets": [f"{s}:{COMPOSE_METRICS_PORT}" for s in slomesh_services]}
                            ],
                        },
                        {
                            "job_name": "vllm-emulators",
                            "scrape_interval": "5s",
                            "static_configs": [
                                {"targets": [f"{e}:{COMPOSE_EMULATOR_PORT}" for e in emulators]}
                            ],
                        },
                    ]
                }
            },
        },
        "processors": {"batch": {}},
        "exporters": {
            "otlp/jaeger": {"endpoint": "jaeger:4317", "tls": {"insecure": True}},
            "prometheus": {"endpoint": "0.0.0.0:8889"},
        },
        "service": {
            "pipelines": {
                "traces": {"receivers": ["otlp"], "processors": ["batch"],
                           "exporters": ["otlp/jaeger"]},
                "metrics": {"receivers": ["prometheus"], "processors": ["batch"],
                            "exporters": ["prometheus"]},
            }
        },
    }


COMPOSE_HEADER = (
    "# Generated by `slomesh compose` (slomesh.launcher.compose_from_topology) from\n"
    "# configs/topology.default.yaml. Do not edit by hand: regenerate it.\n"
)


def write_compose_files(topology: Topology, repo_root: Path) -> list[Path]:
    """Writes docker-compose.yml, deploy/otel-collector.yaml, deploy/routes.compose.json and
    deploy/kv_transfer_routes.compose.json."""
    import yaml

    compose = repo_root / "docker-compose.yml"
    compose.write_text(
        COMPOSE_HEADER + yaml.safe_dump(compose_from_topology(topology), sort_keys=False,
                                        width=120)
    )
    deploy = repo_root / "deploy"
    deploy.mkdir(exist_ok=True)
    collector = deploy / "otel-collector.yaml"
    collector.write_text(
        COMPOSE_HEADER + yaml.safe_dump(collector_config_from_topology(topology),
                                        sort_keys=False, width=120)
    )
    routes = deploy / "routes.compose.json"
    routes.write_text(json.dumps(compose_routes(topology), indent=2) + "\n")
    kv_routes = deploy / "kv_transfer_routes.compose.json"
    kv_routes.write_text(json.dumps(compose_kv_transfer_routes(topology), indent=2) + "\n")
    return [compose, collector, routes, kv_routes]


__all__ = [
    "DEFAULT_RUN_DIR",
    "Mesh",
    "MeshError",
    "MeshPlan",
    "check_grpc_health",
    "check_http_health",
    "check_tcp",
    "collector_config_from_topology",
    "compose_from_topology",
    "compose_kv_transfer_relays",
    "compose_kv_transfer_routes",
    "compose_routes",
    "down",
    "down_from_info",
    "emulator_kv_store_config",
    "mesh_running",
    "read_mesh_file",
    "routes_for",
    "run_foreground",
    "stop_pids",
    "up",
    "write_compose_files",
]
