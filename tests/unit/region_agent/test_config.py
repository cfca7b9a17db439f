"""Tests of the region agent's CLI parsing."""

from __future__ import annotations

import pytest

from services.region_agent.__main__ import build_parser, main
from services.region_agent.config import AgentConfig, InstanceConfig, parse_instance, parse_peer


def test_parse_instance_full_and_minimal():
    inst = parse_instance(
        "id=a-0,url=http://127.0.0.1:8001/,kv_events=tcp://127.0.0.1:5557,gpu=H100"
    )
    assert inst == InstanceConfig(
        "a-0", "http://127.0.0.1:8001", "tcp://127.0.0.1:5557", False, "H100"
    )
    assert parse_instance("id=b,url=http://h:1") == InstanceConfig("b", "http://h:1")
    bound = parse_instance("id=c,url=http://h:1,kv_events=bind:tcp://127.0.0.1:5557")
    assert bound.kv_events == "tcp://127.0.0.1:5557" and bound.kv_events_bind


@pytest.mark.parametrize(
    "spec, message",
    [
        ("url=http://h:1", "missing id"),
        ("id=a", "missing url"),
        ("id=a,url=ftp://h:1", "url"),
        ("id=a,url=http://h:1,colour=red", "unknown key"),
        ("id=a,id=b,url=http://h:1", "duplicate"),
        ("id=a,url", "key=value"),
        ("id=a,url=http://h:1,kv_events=localhost:5557", "kv_events"),
    ],
)
def test_parse_instance_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_instance(spec)


def test_parse_peer():
    peer = parse_peer("frankfurt=127.0.0.1:7001")
    assert (peer.region, peer.address) == ("frankfurt", "127.0.0.1:7001")
    for bad in ("frankfurt", "frankfurt=host", "=h:1", "f=h:port"):
        with pytest.raises(ValueError, match="REGION=HOST:PORT"):
            parse_peer(bad)


def test_agent_config_validation():
    inst = InstanceConfig("a", "http://h:1")
    with pytest.raises(ValueError, match="instances"):
        AgentConfig(region="r", instances=[], nats_url="nats://x")
    with pytest.raises(ValueError, match="duplicate"):
        AgentConfig(region="r", instances=[inst, inst], nats_url="nats://x")
    with pytest.raises(ValueError, match="state_hz"):
        AgentConfig(region="r", instances=[inst], nats_url="nats://x", state_hz=0)
    with pytest.raises(ValueError, match="kv_flush_interval_s"):
        AgentConfig(region="r", instances=[inst], nats_url="nats://x", kv_flush_interval_s=0)


def test_cli_parser_accepts_the_documented_flags():
    args = build_parser().parse_args(
        [
            "--region",
            "washington-dc",
            "--topology",
            "t.yaml",
            "--port",
            "7000",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--instance",
            "id=wdc-h100-0,url=http://127.0.0.1:8001,kv_events=tcp://127.0.0.1:5557,gpu=H100",
            "--instance",
            "id=wdc-a10g-0,url=http://127.0.0.1:8002",
            "--peer",
            "frankfurt=127.0.0.1:7101",
            "--advertise",
            "10.0.0.1:7000",
            "--metrics-port",
            "0",
            "--spans-out",
            "/tmp/s.jsonl",
            "--state-hz",
            "20",
        ]
    )
    assert [i.instance_id for i in args.instance] == ["wdc-h100-0", "wdc-a10g-0"]
    assert args.peer[0].region == "frankfurt"
    assert args.state_hz == 20 and args.port == 7000 and args.metrics_port == 0


def test_main_returns_2_on_bad_configuration(tmp_path, monkeypatch, capsys):
    # Keep the test process's logging as pytest set it up.
    monkeypatch.setattr("services.region_agent.__main__.setup_logging", lambda *a, **k: None)
    base = ["--topology", "configs/topology.default.yaml", "--nats-url", "nats://127.0.0.1:1"]
    assert main([*base, "--region", "atlantis", "--instance", "id=a,url=http://h:1"]) == 2
    assert main([*base, "--region", "tokyo", "--instance", "id=a"]) == 2
    assert main([*base, "--region", "tokyo"]) == 2
    assert (
        main(
            [
                "--topology",
                str(tmp_path / "missing.yaml"),
                "--nats-url",
                "nats://x:1",
                "--region",
                "tokyo",
                "--instance",
                "id=a,url=http://h:1",
            ]
        )
        == 2
    )
