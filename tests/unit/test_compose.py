"""The committed docker-compose.yml and deploy/ files match the default topology, and so does
the local launcher's plan."""

from __future__ import annotations

import json

import pytest
import yaml

from slomesh.cli import build_parser as cli_parser
from slomesh.launcher import (
    COMPOSE_AGENT_PORT,
    COMPOSE_KV_TRANSFER_PORT,
    DEFAULT_KV_STORE_SCALE,
    EMULATOR_BLOCK_SIZE,
    RELAY_AGENT,
    RELAY_KV_TRANSFER,
    MeshPlan,
    collector_config_from_topology,
    compose_from_topology,
    compose_kv_transfer_relays,
    compose_kv_transfer_routes,
    compose_relays,
    compose_routes,
)
from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology
from slomesh.transfer.stores import KvStoreConfig
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
    kv_routes = json.loads((REPO / "deploy" / "kv_transfer_routes.compose.json").read_text())
    assert kv_routes == compose_kv_transfer_routes(topology)


def test_every_piece_has_a_service(topology: Topology, compose: dict) -> None:
    services = compose["services"]
    for name in ("nats", "redis", "otel-collector", "jaeger", "scheduler", "wan-relay"):
        assert name in services
    expected = {"nats", "redis", "otel-collector", "jaeger", "scheduler", "wan-relay"}
    for region in topology.regions:
        expected.add(f"agent-{region.name}")
        expected.add(f"kv-transfer-{region.name}")
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
            assert args.block_size == EMULATOR_BLOCK_SIZE
            assert args.kv_store_path == f"/kv/{inst.id}"
            assert args.kv_store_scale == pytest.approx(DEFAULT_KV_STORE_SCALE)


def test_kv_transfer_services_hold_their_region_stores_and_peer_through_relays(
    topology: Topology, compose: dict
) -> None:
    from services.kv_transfer.__main__ import build_parser as kv_transfer_parser

    services = compose["services"]
    relays = {(r.origin, r.target): r for r in compose_kv_transfer_relays(topology)}
    assert set(compose["volumes"]) == {f"kv-{r.name}" for r in topology.regions}
    for region in topology.regions:
        svc = services[f"kv-transfer-{region.name}"]
        cmd = svc["command"]
        assert cmd[:2] == ["slomesh", "kv-transfer"]
        args = kv_transfer_parser().parse_args(cmd[2:])
        assert (args.region, args.host, args.port) == (region.name, "0.0.0.0", 50052)
        assert args.nats_url == "nats://nats:4222"
        peers = dict(args.peer)
        assert set(peers) == set(topology.region_names) - {region.name}
        for peer, address in peers.items():
            assert address == f"wan-relay:{relays[(region.name, peer)].listen_port}"
        assert dict(args.link) == {
            peer: topology.link_capacity_bytes_per_s(region.name, peer) for peer in peers
        }
        # Its stores are its emulators' (store id = instance id), in the region's volume.
        volume = f"kv-{region.name}:/kv"
        assert volume in svc["volumes"]
        stores = {s.id: s for s in args.kv_store}
        assert set(stores) == {i.id for i in region.instances}
        for inst in region.instances:
            emulator = services[f"emulator-{inst.id}"]
            assert volume in emulator["volumes"]
            assert stores[inst.id] == KvStoreConfig(
                id=inst.id, kind="emulator", path=f"/kv/{inst.id}",
                model=topology.instance_model(inst.id).name,
                block_size=EMULATOR_BLOCK_SIZE, num_layers=32,
            )
        assert svc["healthcheck"]["test"][1:4] == ["slomesh", "health", "--grpc"]
        assert f"kv-transfer-{region.name}" in services["scheduler"]["depends_on"]
        assert f"kv-transfer-{region.name}" in services["wan-relay"]["depends_on"]


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
    pairs = {RELAY_AGENT: {}, RELAY_KV_TRANSFER: {}}
    for spec in specs:
        link, _, service = spec.name.partition("/")
        origin, target = link.split("->")
        pairs[service or RELAY_AGENT][(origin, target)] = spec
        assert spec.one_way_delay_ms == pytest.approx(topology.rtt_ms(origin, target) / 2)
        if service == RELAY_KV_TRANSFER:
            assert (spec.target_host, spec.target_port) == (
                f"kv-transfer-{target}", COMPOSE_KV_TRANSFER_PORT
            )
            # KV flows target -> origin, in files DEFAULT_KV_STORE_SCALE of the real size.
            assert spec.bandwidth_bytes_per_s == pytest.approx(
                topology.link_capacity_bytes_per_s(target, origin) * DEFAULT_KV_STORE_SCALE
            )
        else:
            assert (spec.target_host, spec.target_port) == (f"agent-{target}", COMPOSE_AGENT_PORT)
            assert spec.bandwidth_bytes_per_s is None
    names = topology.region_names
    for by_pair in pairs.values():
        assert set(by_pair) == {(o, t) for o in names for t in names if o != t}
    assert len({s.listen_port for s in specs}) == len(specs)


def test_scheduler_routes_and_ports(topology: Topology, compose: dict) -> None:
    sched = compose["services"]["scheduler"]
    cmd = sched["command"]
    assert cmd[:2] == ["slomesh", "scheduler"]
    assert _flag_values(cmd, "--routes-json") == ["/app/deploy/routes.compose.json"]
    assert _flag_values(cmd, "--kv-transfer-routes-json") == [
        "/app/deploy/kv_transfer_routes.compose.json"
    ]
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
    kv_relays = {f"wan-relay:{r.listen_port}": r for r in compose_kv_transfer_relays(topology)}
    for origin, table in compose_kv_transfer_routes(topology).items():
        assert set(table) == set(topology.region_names)
        for target, address in table.items():
            if origin == target:
                assert address == f"kv-transfer-{target}:{COMPOSE_KV_TRANSFER_PORT}"
            else:
                relay = kv_relays[address]
                assert (relay.origin, relay.target, relay.service) == (
                    origin, target, RELAY_KV_TRANSFER
                )


def test_healthchecks_use_the_cli(compose: dict) -> None:
    parser = cli_parser()
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        if test and test[1] == "slomesh":
            args = parser.parse_args(test[2:])
            assert args.command == "health", name


def test_local_plan_routes_through_relays(topology: Topology) -> None:
    plan = MeshPlan.build(topology, DEFAULT_TOPOLOGY_PATH, kv_store_scale=0.125)
    names = topology.region_names
    assert len(plan.relays) == 2 * len(names) * (len(names) - 1)
    routes = plan.routes()
    kv_routes = plan.kv_transfer_routes()
    ports = [*plan.agent_ports.values(), *plan.agent_metrics_ports.values(),
             *plan.kv_transfer_ports.values(), *plan.kv_transfer_metrics_ports.values(),
             *(r.listen_port for r in plan.relays),
             *(i.http_port for i in plan.instances.values()),
             *(i.kv_events_port for i in plan.instances.values()),
             plan.relay_metrics_port, plan.scheduler_port, plan.scheduler_metrics_port,
             plan.nats_port, plan.redis_port]
    assert len(set(ports)) == len(ports)
    assert set(plan.kv_transfer_ports) == set(names)
    for origin in names:
        assert routes[origin][origin] == plan.agent_address(origin)
        assert kv_routes[origin][origin] == plan.kv_transfer_address(origin)
        for target in names:
            if target == origin:
                continue
            relay = plan.relay(origin, target)
            assert routes[origin][target] == relay.address
            assert relay.target_address == plan.agent_address(target)
            assert relay.one_way_delay_ms == pytest.approx(topology.rtt_ms(origin, target) / 2)
            assert relay.bandwidth_bytes_per_s is None
            kv = plan.relay(origin, target, RELAY_KV_TRANSFER)
            assert kv_routes[origin][target] == kv.address
            assert kv.target_address == plan.kv_transfer_address(target)
            assert kv.one_way_delay_ms == relay.one_way_delay_ms
            assert kv.bandwidth_bytes_per_s == pytest.approx(
                topology.link_capacity_bytes_per_s(target, origin) * 0.125
            )
            assert RelaySpec.parse(kv.relay_arg).name == f"{origin}->{target}/kv-transfer"


def test_local_plan_refuses_a_kv_store_scale_out_of_range(topology: Topology) -> None:
    for scale in (0.0, 1.5):
        with pytest.raises(ValueError, match="kv_store_scale"):
            MeshPlan.build(topology, DEFAULT_TOPOLOGY_PATH, kv_store_scale=scale)


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
