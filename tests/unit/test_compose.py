"""The committed docker-compose.yml and deploy/ files match the default topology, and so does
the local launcher's plan."""

from __future__ import annotations

import json

import pytest
import yaml

from slomesh.cli import build_parser as cli_parser
from slomesh.launcher import (
    COMPOSE_AGENT_PORT,
    MeshPlan,
    collector_config_from_topology,
    compose_from_topology,
    compose_relays,
    compose_routes,
)
from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology
from slomesh.wan_relay import RelaySpec
from slomesh.wan_relay import build_parser as relay_parser

REPO = DEFAULT_TOPOLOGY_PATH.parents[1]


@pytest.fixture(scope="module")
def topology() -> Topology:
    return Topology.default()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _flag_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def test_committed_files_are_generated_output(topology: Topology, compose: dict) -> None:
    assert compose == compose_from_topology(topology), "regenerate with `slomesh compose`"
    collector = yaml.safe_load((REPO / "deploy" / "otel-collector.yaml").read_text())
    assert collector == collector_config_from_topology(topology)
    routes = json.loads((REPO / "deploy" / "routes.compose.json").read_text())
    assert routes == compose_routes(topology)


def test_every_piece_has_a_service(topology: Topology, compose: dict) -> None:
    services = compose["services"]
    for name in ("nats", "redis", "otel-collector", "jaeger", "scheduler", "wan-relay"):
        assert name in services
    expected = {"nats", "redis", "otel-collector", "jaeger", "scheduler", "wan-relay"}
    for region in topology.regions:
        expected.add(f"agent-{region.name}")
        for inst in region.instances:
            expected.add(f"emulator-{inst.id}")
    assert set(services) == expected


def test_depends_on_names_existing_services(compose: dict) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name


def test_agents_list_their_instances_and_peers(topology: Topology, compose: dict) -> None:
    services = compose["services"]
    relays = {(r.origin, r.target): r for r in compose_relays(topology)}
    for region in topology.regions:
        svc = services[f"agent-{region.name}"]
        cmd = svc["command"]
        assert cmd[:2] == ["slomesh", "agent"]
        assert _flag_values(cmd, "--region") == [region.name]
        assert _flag_values(cmd, "--port") == [str(COMPOSE_AGENT_PORT)]
        instances = _flag_values(cmd, "--instance")
        assert len(instances) == len(region.instances)
        for inst, spec in zip(region.instances, instances, strict=True):
            fields = dict(kv.split("=", 1) for kv in spec.split(","))
            assert fields["id"] == inst.id and fields["gpu"] == inst.gpu_type
            assert fields["url"] == f"http://emulator-{inst.id}:8000"
            assert fields["kv_events"] == f"tcp://emulator-{inst.id}:5557"
            assert f"emulator-{inst.id}" in svc["depends_on"]
        peers = dict(p.split("=", 1) for p in _flag_values(cmd, "--peer"))
        assert set(peers) == set(topology.region_names) - {region.name}
        for peer, address in peers.items():
            assert address == f"wan-relay:{relays[(region.name, peer)].listen_port}"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in svc["environment"]
        assert svc["healthcheck"]["test"][0] == "CMD"


def test_emulator_commands_parse(topology: Topology, compose: dict) -> None:
    from slomesh.emulator.__main__ import build_parser

    for region in topology.regions:
        for inst in region.instances:
            cmd = compose["services"][f"emulator-{inst.id}"]["command"]
            assert cmd[:2] == ["slomesh", "emulator"]
            args = build_parser().parse_args(cmd[2:])
            assert args.gpu_type == inst.gpu_type
            assert args.instance_id == inst.id
            assert args.host == "0.0.0.0"
            assert args.port == 8000


def test_agent_and_scheduler_commands_parse(topology: Topology, compose: dict) -> None:
    from services.global_scheduler.__main__ import build_parser as scheduler_parser
    from services.region_agent.__main__ import build_parser as agent_parser

    for region in topology.regions:
        cmd = compose["services"][f"agent-{region.name}"]["command"]
        args = agent_parser().parse_args(cmd[2:])
        assert args.region == region.name
        assert args.host == "0.0.0.0"
        assert [i.instance_id for i in args.instance] == [i.id for i in region.instances]
        assert {p.region for p in args.peer} == set(topology.region_names) - {region.name}
    args = scheduler_parser().parse_args(compose["services"]["scheduler"]["command"][2:])
    assert (args.host, args.port) == ("0.0.0.0", 50050)
    assert args.topology == "/app/configs/topology.default.yaml"


def test_relay_for_every_ordered_pair_with_half_rtt(topology: Topology, compose: dict) -> None:
    cmd = compose["services"]["wan-relay"]["command"]
    assert cmd[:2] == ["slomesh", "wan-relay"]
    args = relay_parser().parse_args(cmd[2:])
    specs = [RelaySpec.parse(s) for s in args.relay]
    pairs = {}
    for spec in specs:
        origin, target = spec.name.split("->")
        pairs[(origin, target)] = spec
        assert spec.target_host == f"agent-{target}"
        assert spec.target_port == COMPOSE_AGENT_PORT
        assert spec.one_way_delay_ms == pytest.approx(topology.rtt_ms(origin, target) / 2)
    names = topology.region_names
    assert set(pairs) == {(o, t) for o in names for t in names if o != t}
    assert len({s.listen_port for s in specs}) == len(specs)


def test_scheduler_routes_and_ports(topology: Topology, compose: dict) -> None:
    sched = compose["services"]["scheduler"]
    cmd = sched["command"]
    assert cmd[:2] == ["slomesh", "scheduler"]
    assert _flag_values(cmd, "--routes-json") == ["/app/deploy/routes.compose.json"]
    assert _flag_values(cmd, "--nats-url") == ["nats://nats:4222"]
    assert _flag_values(cmd, "--redis-url") == ["redis://redis:6379/0"]
    assert sched["ports"] == ["50050:50050"]
    for region in topology.regions:
        assert f"agent-{region.name}" in sched["depends_on"]
    routes = compose_routes(topology)
    relays = {f"wan-relay:{r.listen_port}": r for r in compose_relays(topology)}
    for origin, table in routes.items():
        assert set(table) == set(topology.region_names)
        for target, address in table.items():
            if origin == target:
                assert address == f"agent-{target}:{COMPOSE_AGENT_PORT}"
            else:
                relay = relays[address]
                assert (relay.origin, relay.target) == (origin, target)


def test_healthchecks_use_the_cli(compose: dict) -> None:
    parser = cli_parser()
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        if test and test[1] == "slomesh":
            args = parser.parse_args(test[2:])
            assert args.command == "health", name


def test_local_plan_routes_through_relays(topology: Topology) -> None:
    plan = MeshPlan.build(topology, DEFAULT_TOPOLOGY_PATH)
    names = topology.region_names
    assert len(plan.relays) == len(names) * (len(names) - 1)
    routes = plan.routes()
    ports = [*plan.agent_ports.values(), *plan.agent_metrics_ports.values(),
             *(r.listen_port for r in plan.relays),
             *(i.http_port for i in plan.instances.values()),
             *(i.kv_events_port for i in plan.instances.values()),
             plan.relay_metrics_port, plan.scheduler_port, plan.scheduler_metrics_port,
             plan.nats_port, plan.redis_port]
    assert len(set(ports)) == len(ports)
    for origin in names:
        assert routes[origin][origin] == plan.agent_address(origin)
        for target in names:
            if target == origin:
                continue
            relay = plan.relay(origin, target)
            assert routes[origin][target] == relay.address
            assert relay.target_address == plan.agent_address(target)
            assert relay.one_way_delay_ms == pytest.approx(topology.rtt_ms(origin, target) / 2)


def test_dockerfile_installs_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install --no-deps -e ." in text
    for path in ("slomesh", "services", "configs", "deploy", "protos"):
        assert f"COPY {path} ./{path}" in text
        assert (REPO / path).exists()


def test_default_topology_gpus_are_priced(topology: Topology) -> None:
    assert topology.region_names == ["washington-dc", "frankfurt", "tokyo"]
    for region in topology.regions:
        assert len({i.gpu_type for i in region.instances}) >= 2  # heterogeneous
        for inst in region.instances:
            on_demand, spot = topology.gpu_price_usd_per_hour(inst.gpu_type, region.cloud_region)
            assert on_demand > 0 and spot > 0
