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


# -- several models (issue 4, item 5) --------------------------------------------------------

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"


def _two_model_dict(**region_overrides):
    data = _topology_dict(
        instances=[
            {"id": "a-0", "gpu_type": "H100"},
            {"id": "a-1", "gpu_type": "H100", "model": QWEN, "swappable": True},
        ],
        **region_overrides,
    )
    data["models"] = [{"name": LLAMA, "max_model_len": 131072}, {"name": QWEN}]
    return data


def test_the_single_model_form_still_works_and_lists_one_model():
    for data in (
        {**_topology_dict(), "model": {"name": LLAMA, "max_model_len": 4096}},
        {**_topology_dict(), "model": LLAMA},  # a bare name is short for {name: ...}
        _topology_dict(),  # no model at all: the default model
    ):
        topo = Topology.model_validate(data)
        assert topo.model_names == [LLAMA]
        assert topo.models == [topo.model]
        assert topo.instance_model("a-0") == topo.model
    topo = Topology.model_validate(
        {**_topology_dict(), "model": {"name": LLAMA, "max_model_len": 4096}}
    )
    assert topo.instance_max_model_len("a-0") == 4096
    # No swaps without a second model, and the defaults of the load settings.
    region = topo.regions[0]
    assert not region.instances[0].swappable
    assert (region.weight_cache_gb_per_s, region.remote_weights_gb_per_s) == (2.0, 0.5)
    assert region.model_load_overhead_s == 20.0


def test_default_topology_keeps_one_model():
    topo = Topology.default()
    assert topo.model_names == [LLAMA]
    assert all(not i.swappable for r in topo.regions for i in r.instances)


def test_models_list_sets_each_instances_model_and_the_weight_cache():
    topo = Topology.model_validate(_two_model_dict(weight_cache=[QWEN]))
    assert topo.model.name == LLAMA  # the first model is the default
    assert topo.model_names == [LLAMA, QWEN]
    assert topo.instance_model("a-0").name == LLAMA
    assert topo.instance_model("a-1").name == QWEN
    assert topo.instance_max_model_len("a-0") == 131072
    assert topo.instance_max_model_len("a-1") == 32768  # ModelSpecRef's default
    assert topo.weight_cache_models("washington-dc") == [LLAMA, QWEN]
    assert topo.model_load_overhead_s("a-1") == 20.0
    # weights_bytes defaults to the engine model's num_params x dtype_bytes.
    assert topo.model_ref(QWEN).resolved_weights_bytes == int(7.61e9 * 2)
    # A dump validates back to the same topology (both model and models in it).
    assert Topology.model_validate(topo.model_dump(mode="json")) == topo


def test_instance_overhead_overrides_the_regions():
    data = _two_model_dict(model_load_overhead_s=5.0)
    data["regions"][0]["instances"][1]["model_load_overhead_s"] = 1.5
    topo = Topology.model_validate(data)
    assert topo.model_load_overhead_s("a-0") == 5.0
    assert topo.model_load_overhead_s("a-1") == 1.5


def test_weight_cache_lists_served_models_even_when_not_configured():
    topo = Topology.model_validate(_two_model_dict())
    assert topo.weight_cache_models("washington-dc") == [LLAMA, QWEN]  # both served at start


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["regions"][0]["instances"][0].update(model="nope/model"), "instances.model"),
        (lambda d: d["regions"][0].update(weight_cache=["nope/model"]), "weight_cache"),
        (lambda d: d["models"].append({"name": QWEN}), "duplicate model names"),
        (lambda d: d["models"].append({"name": "org/unknown-7b"}), "weights_bytes"),
        (lambda d: d.update(model={"name": QWEN}), "first of models"),
        (lambda d: d["regions"][0].update(weight_cache_gb_per_s=0), "weight_cache_gb_per_s"),
        (lambda d: d["regions"][0].update(remote_weights_gb_per_s=-1), "remote_weights_gb_per_s"),
        (lambda d: d.update(models=[]), "models"),
    ],
)
def test_invalid_model_settings_name_the_field(mutate, match):
    data = _two_model_dict()
    mutate(data)
    with pytest.raises(pydantic.ValidationError, match=match):
        Topology.model_validate(data)


def test_an_unknown_model_is_fine_alone_or_with_its_size():
    # A real vLLM may serve a model the engine model does not know.
    topo = Topology.model_validate({**_topology_dict(), "model": {"name": "org/unknown-7b"}})
    assert topo.model.resolved_weights_bytes is None
    data = _two_model_dict()
    data["models"].append({"name": "org/unknown-7b", "weights_bytes": 14_000_000_000})
    topo = Topology.model_validate(data)
    assert topo.model_ref("org/unknown-7b").resolved_weights_bytes == 14_000_000_000
    with pytest.raises(KeyError):
        topo.model_ref("org/other")


def test_multimodel_config_loads():
    from slomesh.topology import DEFAULT_TOPOLOGY_PATH

    topo = Topology.load(DEFAULT_TOPOLOGY_PATH.parent / "topology.multimodel.yaml")
    assert topo.model_names == [LLAMA, QWEN]
    assert topo.region_names == Topology.default().region_names
    assert topo.instance_model("fra-l40s-0").name == QWEN
    assert QWEN in topo.weight_cache_models("washington-dc")
    assert QWEN not in topo.weight_cache_models("tokyo")


def test_model_load_s_reads_the_weights_from_the_cache_when_it_holds_them():
    from slomesh.engine.profiles import MODELS
    from slomesh.topology import DEFAULT_TOPOLOGY_PATH

    topo = Topology.load(DEFAULT_TOPOLOGY_PATH.parent / "topology.multimodel.yaml")
    weights_gb = MODELS[QWEN].weight_bytes / 1e9
    # Washington DC: 20 s start-up, its cache at 2 GB/s, the remote store at 0.5 GB/s.
    load_s, cached = topo.model_load_s("wdc-a10g-0", QWEN, [LLAMA, QWEN])
    assert cached and load_s == pytest.approx(20.0 + weights_gb / 2.0)
    load_s, cached = topo.model_load_s("wdc-a10g-0", QWEN, [LLAMA])
    assert not cached and load_s == pytest.approx(20.0 + weights_gb / 0.5)
    with pytest.raises(KeyError, match="unknown model"):
        topo.model_load_s("wdc-a10g-0", "acme/other", [])
    with pytest.raises(KeyError):
        topo.model_load_s("no-such-instance", QWEN, [])


def _default_dict() -> dict:
    from slomesh.topology import DEFAULT_TOPOLOGY_PATH

    return yaml.safe_load(DEFAULT_TOPOLOGY_PATH.read_text())


def test_link_capacity_per_pair_then_reverse_then_default():
    from slomesh.topology import DEFAULT_LINK_CAPACITY_BYTES_PER_S

    topo = Topology.default()
    assert topo.link_capacity_bytes_per_s("tokyo", "frankfurt") == DEFAULT_LINK_CAPACITY_BYTES_PER_S
    data = {
        **_default_dict(),
        "default_link_capacity_bytes_per_s": 3e8,
        "links": [
            {"src": "washington-dc", "dst": "frankfurt", "capacity_bytes_per_s": 1e8},
            {"src": "frankfurt", "dst": "washington-dc", "capacity_bytes_per_s": 2e8},
            {"src": "tokyo", "dst": "frankfurt", "capacity_bytes_per_s": 5e7},
        ],
    }
    topo = Topology.model_validate(data)
    assert topo.link_capacity_bytes_per_s("washington-dc", "frankfurt") == 1e8
    assert topo.link_capacity_bytes_per_s("frankfurt", "washington-dc") == 2e8
    assert topo.link_capacity_bytes_per_s("frankfurt", "tokyo") == 5e7  # the other direction
    assert topo.link_capacity_bytes_per_s("tokyo", "washington-dc") == 3e8
    for src, dst in [("tokyo", "tokyo"), ("tokyo", "nowhere")]:
        with pytest.raises(KeyError):
            topo.link_capacity_bytes_per_s(src, dst)


@pytest.mark.parametrize(
    ("links", "match"),
    [
        ([{"src": "tokyo", "dst": "mars", "capacity_bytes_per_s": 1e8}], "unknown region"),
        ([{"src": "tokyo", "dst": "tokyo", "capacity_bytes_per_s": 1e8}], "two regions"),
        ([{"src": "tokyo", "dst": "frankfurt", "capacity_bytes_per_s": 0}], "capacity"),
        ([{"src": "tokyo", "dst": "frankfurt", "capacity_bytes_per_s": 1e8}] * 2, "twice"),
    ],
)
def test_invalid_links_name_the_field(links, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        Topology.model_validate({**_default_dict(), "links": links})
