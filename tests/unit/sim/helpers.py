"""Plain factories for simulator tests: small topologies and traces written to a tmp dir."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from slomesh.topology import Topology
from slomesh.traces import Trace, load_trace


def make_topology(
    tmp: Path,
    regions: Sequence[tuple[str, str, str, Sequence[tuple[str, str]]]],
    *,
    max_model_len: int = 32768,
) -> Topology:
    """A topology from (name, location, cloud_region, [(instance id, gpu type), ...])."""
    data = {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "max_model_len": max_model_len},
        "regions": [
            {
                "name": name,
                "location": location,
                "cloud_region": cloud,
                "egress_usd_per_gb": 0.02,
                "instances": [{"id": iid, "gpu_type": gpu} for iid, gpu in instances],
            }
            for name, location, cloud, instances in regions
        ],
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return Topology.load(path)


WDC = ("washington-dc", "Washington DC", "us-east-1")
TYO = ("tokyo", "Tokyo", "ap-northeast-1")


def one_h100(tmp: Path, **kw) -> Topology:
    """Washington DC with one H100."""
    return make_topology(tmp, [(*WDC, [("wdc-h100-0", "H100")])], **kw)


def wdc_and_tokyo(tmp: Path) -> Topology:
    """Washington DC (one H100) and Tokyo (one L4)."""
    return make_topology(tmp, [(*WDC, [("wdc-h100-0", "H100")]), (*TYO, [("tyo-l4-0", "L4")])])


def azure_trace(
    tmp: Path,
    rows: Sequence[tuple[float, int, int]],
    topology: Topology,
    *,
    shares: dict[str, float] | None = None,
    name: str = "tiny_conv",
) -> Trace:
    """An Azure-format trace of (arrival s, prompt tokens, output tokens) rows."""
    path = tmp / f"{name}.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t, prompt, out in rows:
        whole, frac = divmod(t, 1.0)
        lines.append(f"2023-11-16 18:{int(whole) // 60:02d}:{int(whole) % 60:02d}.{round(frac * 1e6):06d},{prompt},{out}")
    path.write_text("\n".join(lines) + "\n")
    return load_trace(path, regions=topology.region_names, region_shares=shares)


def mooncake_trace(
    tmp: Path,
    rows: Sequence[tuple[float, int, int, Sequence[int]]],
    topology: Topology,
    *,
    shares: dict[str, float] | None = None,
    name: str = "tiny_mooncake",
) -> Trace:
    """A Mooncake-format trace of (arrival s, input length, output length, hash ids) rows."""
    path = tmp / f"{name}.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(
                    {
                        "timestamp": int(t * 1000),
                        "input_length": n_in,
                        "output_length": n_out,
                        "hash_ids": list(hashes),
                    }
                )
                + "\n" for t, n_in, n_out, hashes in rows)
    return load_trace(path, regions=topology.region_names, region_shares=shares)
