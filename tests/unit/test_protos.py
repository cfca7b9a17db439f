"""The committed generated protobuf code matches the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_has_no_drift(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted((tmp_path / "slomesh" / "v1").glob("*"))
    assert generated, "protoc produced nothing"
    committed_dir = ROOT / "slomesh" / "v1"
    committed = sorted(p.name for p in committed_dir.glob("*") if p.is_file())
    assert sorted(p.name for p in generated) == committed
    for path in generated:
        assert path.read_bytes() == (committed_dir / path.name).read_bytes(), (
            f"{path.name} drifted from protos/; run scripts/gen_protos.py"
        )


def test_services_are_declared():
    from slomesh.v1 import kv_transfer_pb2, region_agent_pb2, scheduler_pb2

    assert set(scheduler_pb2.DESCRIPTOR.services_by_name["GlobalScheduler"].methods_by_name) == {
        "Generate", "Place", "ReportOutcome"}
    assert set(region_agent_pb2.DESCRIPTOR.services_by_name["RegionAgent"].methods_by_name) == {
        "Generate", "Ping", "GetState"}
    assert "KVTransfer" in kv_transfer_pb2.DESCRIPTOR.services_by_name
