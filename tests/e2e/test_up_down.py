"""`slomesh up --detach`, `slomesh replay --run-dir` (a Mooncake slice), `slomesh down`.

The detached mesh must answer a replay found through its run directory, serve shared Mooncake
prefixes from the prefix cache, and leave no process behind after `down`. It runs on a NATS
and a Redis given by URL (the fixtures' servers), which `down` must leave running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slomesh.launcher import pid_alive
from slomesh.topology import shared_data_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def _slomesh(args: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slomesh.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False,
    )


def test_up_replay_down(tmp_path: Path, nats_server, redis_server) -> None:
    run_dir = tmp_path / ".slomesh" / "run"
    up = _slomesh(
        ["up", "--detach", "--nats-url", nats_server.url, "--redis-url", redis_server.url],
        tmp_path, 240,
    )
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads((run_dir / "mesh.json").read_text())
    pids = [p["pid"] for p in info["processes"]] + [info["supervisor_pid"]]
    try:
        assert info["status"] == "ready"
        assert (info["nats_url"], info["redis_url"]) == (nats_server.url, redis_server.url)
        assert {p["kind"] for p in info["processes"]}.isdisjoint({"nats", "redis"})
        assert set(info["regions"]) == {"washington-dc", "frankfurt", "tokyo"}
        assert all(pid_alive(p) for p in pids)
        # A second `up` in the same run dir refuses instead of starting a second mesh.
        again = _slomesh(["up", "--detach"], tmp_path, 60)
        assert again.returncode == 1
        assert "already runs" in again.stderr

        trace = shared_data_dir() / "traces" / "mooncake_conversation_part1.jsonl"
        report_path = tmp_path / "report.json"
        replay = _slomesh(
            ["replay", "--trace", str(trace), "--limit", "24", "--rate-scale", "2",
             "--run-dir", str(run_dir), "--report-json", str(report_path), "--no-progress"],
            tmp_path, 300,
        )
        assert replay.returncode == 0, replay.stderr[-3000:]
        report = json.loads(report_path.read_text())
        assert report["requests"] == 24
        assert report["trace"] == "mooncake_conversation_part1"
        # Prompts above the model's context or without a feasible placement may be refused;
        # most complete, and the shared conversation prefixes hit the prefix cache.
        assert report["completed"] >= 12, report["errors"]
        assert report["completed"] + report["failed"] == 24
        assert report["cached_prompt_tokens"] > 0
        assert 0 < report["prefix_hit_rate"] < 1
    finally:
        down = _slomesh(["down"], tmp_path, 120)
    assert down.returncode == 0, down.stderr[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if pid_alive(p)] == []
    assert nats_server.running and redis_server.running
    assert json.loads((run_dir / "mesh.json").read_text())["status"] == "stopped"


def test_replay_without_mesh_is_a_setup_error(tmp_path: Path) -> None:
    trace = shared_data_dir() / "traces" / "azure_llm_2023_conv.csv"
    res = _slomesh(
        ["replay", "--trace", str(trace), "--limit", "5", "--run-dir", str(tmp_path / "none"),
         "--report-json", str(tmp_path / "r.json"), "--no-progress"],
        tmp_path, 60,
    )
    assert res.returncode == 2
    assert "no running mesh" in res.stderr
    assert not (tmp_path / "r.json").exists()
