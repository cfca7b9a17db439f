from __future__ import annotations

import pydantic
import pytest
import yaml

from slomesh.topology import Topology, shared_data_dir


def test_default_topology_has_three_regions_with_two_heterogeneous_instances():
    topo = Topology.default()
    assert topo.region_names == ["washington-dc", "frankfurt", "tokyo"]
    for region in topo.regions:
        assert len(region.instances) == 2
        assert len({i.gpu_type for i in region.instances}) == 2


def test_rtt_comes_from_the_shared_matrix_and_is_zero_within_a_region():
    topo = Topology.default()
    assert topo.rtt_ms("washington-dc", "frankfurt") == 86.0
    assert topo.rtt_ms("frankfurt", "washington-dc") == 86.0
    assert topo.rtt_ms("tokyo", "frankfurt") == 228.0
    assert topo.rtt_ms("tokyo", "tokyo") == 0.0


def test_prices_are_per_gpu():
    topo = Topology.default()
    on_demand, spot = topo.gpu_price_usd_per_hour("H100", "us-east-1")
    assert on_demand == pytest.approx(98.32 / 8)
    assert spot == pytest.approx(20.9934 / 8)
    assert topo.gpu_price_usd_per_hour("L4", "ap-northeast-1") == pytest.approx((1.1672, 0.4569))


def test_missing_spot_price_falls_back_to_on_demand():
    topo = Topology.default()
    on_demand, spot = topo.gpu_price_usd_per_hour("A100", "ap-south-1")
    assert spot == on_demand == pytest.approx(39.32 / 8)


def _topology_dict(**region_overrides):
    region = {
        "name": "washington-dc", "location": "Washington DC", "cloud_region": "us-east-1",
        "instances": [{"id": "a-0", "gpu_type": "H100"}],
    }
    region.update(region_overrides)
    return {"regions": [region]}


@pytest.mark.parametrize(
    "override, field",
    [
        ({"location": "Atlantis"}, "location"),
        ({"cloud_region": "eu-central-1"}, "gpu_type"),  # no H100 listed in eu-central-1
        ({"name": "Bad Name"}, "name"),
        ({"instances": [{"id": "a-0", "gpu_type": "TPU"}]}, "gpu_type"),
        ({"instances": []}, "instances"),
    ],
)
def test_invalid_topologies_name_the_field(override, field):
    with pytest.raises(pydantic.ValidationError) as err:
        Topology.model_validate(_topology_dict(**override))
    assert field in str(err.value)


def test_duplicate_instance_ids_are_refused(tmp_path):
    data = _topology_dict()
    data["regions"].append({**data["regions"][0], "name": "other"})
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(pydantic.ValidationError, match="duplicate instance ids"):
        Topology.load(path)


def test_instance_price_uses_spot_when_asked():
    data = _topology_dict(instances=[{"id": "a-0", "gpu_type": "H100", "spot": True}])
    topo = Topology.model_validate(data)
    assert topo.instance_price_usd_per_hour("a-0") == pytest.approx(20.9934 / 8)
    with pytest.raises(KeyError):
        topo.instance_price_usd_per_hour("nope")


def test_shared_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLOMESH_SHARED_DATA", str(tmp_path))
    # tmp_path lacks regions/rtt_ms.csv, so resolution falls through to the checkout's.
    assert shared_data_dir() != tmp_path
    (tmp_path / "regions").mkdir()
    (tmp_path / "regions" / "rtt_ms.csv").write_text("src_region,dst_region,rtt_ms\n")
    assert shared_data_dir() == tmp_path
